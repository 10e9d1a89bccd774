"""Python client of snakepit_shm: zero-copy access to regions shared by Elixir.

The Elixir side allocates a region, writes into it, and hands the worker a small ref
(``Snakepit.SharedMemory.export_ref/2``).  The worker attaches it::

    import snakepit_shm

    with snakepit_shm.attach(ref) as region:          # ref: dict, JSON string or id
        weights = region.ndarray()                     # zero-copy, dtype/shape from ref
        total = float(weights.sum())
    # Leaving the block with `weights` still alive is fine: the mapping and the hold
    # last until the last view of the region is gone (close(strict=True) refuses).

Attaching registers this process as a holder in the region's header, so the manager
knows the region is in use; the manager also releases the hold if the worker dies,
even by SIGKILL.  Only the standard library is needed (numpy for ``ndarray()``), plus
the project's C library ``libsnakepit_shm.so`` for the atomic holder-table updates and
decryption.  Linux only (POSIX shm and memfd backends).
"""

from ._attach import attach, attach_async, inspect
from ._outputs import allocate, discard, from_array, pending_outputs
from ._resolve import resolve, to_zero_copy_ref
from .channel import Channel, ChannelClosed, ChannelProtocolError, WouldBlock
from .errors import (CorruptRegion, ForeignHostRegion, LibraryNotFound,
                     OrphanedRegionWarning, PermissionError, RegionDeallocated,
                     RegionExpired, RegionNotFound, SnakepitShmError, UnadoptedOutputWarning,
                     UnheldAttachWarning, ViewsStillAlive)
from .errors import RegionBusy
from .quota import (HostQuota, QuotaError, QuotaExceeded, QuotaUnavailable, Reservation,
                    UnknownQuota)
from .region import Region
from .board import BoardFull, StatusBoard

__version__ = "0.1.0"

__all__ = [
    "attach",
    "attach_async",
    "allocate",
    "from_array",
    "discard",
    "pending_outputs",
    "resolve",
    "to_zero_copy_ref",
    "inspect",
    "Region",
    "StatusBoard",
    "BoardFull",
    "SnakepitShmError",
    "RegionNotFound",
    "ForeignHostRegion",
    "CorruptRegion",
    "RegionExpired",
    "RegionDeallocated",
    "RegionBusy",
    "PermissionError",
    "ViewsStillAlive",
    "LibraryNotFound",
    "UnheldAttachWarning",
    "UnadoptedOutputWarning",
    "OrphanedRegionWarning",
    "HostQuota",
    "Reservation",
    "QuotaError",
    "QuotaExceeded",
    "UnknownQuota",
    "QuotaUnavailable",
    "Channel",
    "ChannelClosed",
    "ChannelProtocolError",
    "WouldBlock",
]
