"""Python client of snakepit_shm: zero-copy access to regions shared by Elixir.

The Elixir side allocates a region, writes into it, and hands the worker a small ref
(``Snakepit.SharedMemory.export_ref/2``).  The worker attaches it::

    import snakepit_shm

    with snakepit_shm.attach(ref) as region:          # ref: dict, JSON string or id
        weights = region.ndarray()                     # zero-copy, dtype/shape from ref
        total = weights.sum()
        del weights                                    # views must go before close()

Attaching registers this process as a holder in the region's header, so the manager
knows the region is in use; the manager also releases the hold if the worker dies,
even by SIGKILL.  Only the standard library is needed (numpy for ``ndarray()``), plus
the project's C library ``libsnakepit_shm.so`` for the atomic holder-table updates and
decryption.  Linux only (POSIX shm and memfd backends).
"""

from ._attach import attach, inspect
from .channel import Channel, ChannelClosed, ChannelProtocolError, WouldBlock
from .errors import (CorruptRegion, LibraryNotFound, PermissionError, RegionExpired,
                     RegionNotFound, SnakepitShmError, UnheldAttachWarning,
                     ViewsStillAlive)
from .region import Region

__version__ = "0.1.0"

__all__ = [
    "attach",
    "inspect",
    "Region",
    "SnakepitShmError",
    "RegionNotFound",
    "CorruptRegion",
    "RegionExpired",
    "PermissionError",
    "ViewsStillAlive",
    "LibraryNotFound",
    "UnheldAttachWarning",
    "Channel",
    "ChannelClosed",
    "ChannelProtocolError",
    "WouldBlock",
]
