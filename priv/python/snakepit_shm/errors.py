"""Exceptions raised by :mod:`snakepit_shm`.

Every exception derives from :class:`SnakepitShmError`; the ones that have a natural
builtin counterpart also derive from it, so ``except PermissionError`` (the builtin)
and ``except BufferError`` keep working.  Messages say what went wrong and what to do.
"""

import builtins

__all__ = [
    "SnakepitShmError",
    "RegionNotFound",
    "ForeignHostRegion",
    "CorruptRegion",
    "RegionExpired",
    "RegionDeallocated",
    "PermissionError",
    "ViewsStillAlive",
    "LibraryNotFound",
    "UnheldAttachWarning",
    "OrphanedRegionWarning",
    "RegionBusy",
]


class SnakepitShmError(Exception):
    """Base class of every error of this package."""


class RegionNotFound(SnakepitShmError):
    """No region with that id exists (never did, was deallocated, or is not visible)."""


class ForeignHostRegion(RegionNotFound):
    """The ref names a region of another host (its ``boot_id`` is not this host's).

    Shared memory does not cross hosts: fetch the region to a node on this host first
    (``Snakepit.SharedMemory.fetch/2`` there) and attach the ref of the local copy.
    """


class CorruptRegion(SnakepitShmError):
    """The segment is not a valid snakepit_shm region: foreign, truncated or damaged."""


class RegionExpired(SnakepitShmError):
    """The region has been idle longer than its timeout and will be freed."""


class RegionDeallocated(RegionExpired):
    """The owner freed the region while this worker had it attached.

    Raised by ``read``, ``write``, ``ndarray`` and ``buf`` instead of silently reading
    freed (maybe zeroed) memory or writing results nobody will read.  A subclass of
    RegionExpired, so ``except RegionExpired`` catches both ways a region ends.
    """


class PermissionError(SnakepitShmError, builtins.PermissionError):
    """Access refused: sealed region opened for writing, missing key, other owner..."""


class ViewsStillAlive(SnakepitShmError, builtins.BufferError):
    """close() refused: memoryviews or numpy arrays of the region still exist."""


class LibraryNotFound(SnakepitShmError, builtins.OSError):
    """The C ABI library libsnakepit_shm.so could not be found or loaded."""


class RegionBusy(SnakepitShmError):
    """Another process is writing (or reading) an encrypted region right now.

    Encrypted regions admit one writer at a time across processes (an OFD lock on byte
    1 of the control object); a concurrent write or read is refused rather than left
    to corrupt or misread a chunk. Retry shortly.
    """


class UnheldAttachWarning(UserWarning):
    """A region was attached read-only without registering a hold.

    This happens only when the header cannot be opened for writing, in practice for a
    sealed POSIX region (the manager makes it mode 0400) attached by a non-root worker.
    The data is immutable and stays mapped, but the manager does not know this worker
    uses it: keep the region allocated on the Elixir side until the worker is done, or
    use the memfd backend, whose header stays writable after sealing.
    """


class OrphanedRegionWarning(UserWarning):
    """An attached region's creator (the Elixir VM) is no longer running.

    Its data is intact, but nobody will read results written into it and the next
    orphan sweep of a VM on this host frees it (memfd regions go when their last
    descriptor closes).  Finish quickly or ask a live VM for a fresh region.
    """


class UnadoptedOutputWarning(UserWarning):
    """A worker output (``allocate``/``from_array``) was given up unadopted.

    No VM adopted it within its ``keep_seconds`` (600 s by default), so the worker closed
    its descriptors (a POSIX output: removed its name) and the result is gone; a later
    ``adopt_region/2`` of its ref fails with ``:not_found``.  Adopt outputs promptly, or
    allocate them with a larger ``keep_seconds`` (``math.inf``: until adopted or
    ``discard()``-ed).
    """
