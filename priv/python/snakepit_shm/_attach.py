"""attach() and inspect(): from a ref or region id to a validated, mapped Region."""

import contextlib
import copy
import errno
import fcntl
import mmap
import os
import struct
import time
import warnings

from . import _announce
from . import errors
from . import _format as F
from . import _header
from . import _locate
from . import _native
from . import _proc
from .region import (Attachment, Region, creator_alive, expiry_problem, state_bits,
                     touch)

_SECURITY_LEVELS = {0: "standard", 1: "high", 2: "maximum"}


def attach(ref_or_region_id, mode="r"):
    """Attach a region and register this process as one of its holders.

    ``ref_or_region_id`` is the map returned by Elixir's ``export_ref/2`` (a dict, or
    that map as a JSON string), that map wrapped in a Snakepit ``ZeroCopyRef`` marker
    (``to_zero_copy_ref/1``), or a bare region id.  ``mode`` is "r" (read-only data)
    or "rw".  Returns a :class:`Region`; use it as a context manager or call close().

    Raises RegionNotFound, CorruptRegion, RegionExpired or PermissionError (all
    subclasses of SnakepitShmError) with a message that says what to do; TypeError or
    ValueError for a malformed argument; LibraryNotFound if libsnakepit_shm.so is
    missing.
    """
    if mode not in ("r", "rw"):
        raise ValueError(f"mode must be 'r' or 'rw', got {mode!r}")
    try:
        return _attach(ref_or_region_id, mode)
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        # Every open, dup (mmap duplicates what it maps), pidfd and /proc read here
        # needs a descriptor: say which limit, not a bare OSError.
        raise errors.SnakepitShmError(
            f"cannot attach the region: {exc.strerror}: this worker is out of file "
            "descriptors; raise the limit (ulimit -n, LimitNOFILE=) or close regions "
            "and files it no longer uses") from None


def _attach(ref_or_region_id, mode):
    library = _native.library()
    # A bare id listed in the runtime index: one C call checks the entry while opening
    # the region (the memfd links before and after the open, the owner; for an arena
    # region, that the chunk holds this id); anything refused goes the usual way below
    # (which verifies the entry again, or scans).
    location = _locate.index_hint(ref_or_region_id)
    fast = None
    if location is not None:
        if location.control_offset is not None:
            fast = _fast_open_arena(library, location)
        else:
            fast = _fast_open(library, location, mode)
    if fast is None:
        location = _locate.parse_target(ref_or_region_id)
        if location.control_offset is not None:
            fast = _fast_open_arena(library, location)
        else:
            fast = _fast_open(library, location, mode)
    if location.backend == F.BACKEND_POSIX:
        # A peer of our uid may truncate the segment while we map it: its lost pages
        # become zeros (Region checks the size) instead of a SIGBUS that kills us.
        library.guard_faults(os.path.dirname(location.control_path))
    identity = _proc.self_identity()
    # Plain try blocks rather than ExitStacks: this is the per-request path of a worker.
    if fast is not None:
        control_fd, _, data_fd, data_size, snapshot = fast
        header_writable = True
    else:
        control_fd, control_size, header_writable = _open_control(location, mode)
        data_fd = None
    attachment = data_mm = None
    base = 0
    try:
        if fast is not None:
            # Opened, locked and validated by the core in one call.
            base = location.control_offset or 0
            header = _header.from_valid(snapshot, where=location.control_path,
                                        region_id=location.region_id)
        else:
            # An arena region (docs/FORMAT.md "Arenas"): its control block sits `base`
            # bytes into the arena, and each of its locks is shifted by `base`.
            base = _arena_base(location, control_size)
            # The shared liveness lock first: from here on no sweeper removes it. The
            # header is read once: it also names the data memfd.
            library.liveness_lock(control_fd, base)
            snapshot = os.pread(control_fd, F.HEADER_SIZE, base)
            data_fd, data_size = _open_data(location, mode, control_fd, control_size,
                                            snapshot, library)
            try:
                header = _validated(library, snapshot, location, control_size - base,
                                    data_size - base)
            except errors.CorruptRegion:
                if location.control_offset is not None:
                    _raise_if_freed_chunk(location, snapshot, control_fd, base)
                if base == 0 and _being_created(control_fd, snapshot):
                    # (A header overwritten with zeros by another process, while its
                    # VM holds the region, looks the same: a creator may sit seconds
                    # between its lock and its header (a large fallocate, a pooled
                    # object zeroed), so no wait can tell them apart. Said both ways.)
                    raise errors.RegionBusy(
                        f"region {location.region_id} has no header yet while a process "
                        "holds it: its creator is still creating it (a large encrypted "
                        "region takes a while); retry in a moment. If it stays so for "
                        "more than a few seconds, another process of this user overwrote "
                        "its header: the region is damaged; ask the Elixir side to "
                        "deallocate it and for a fresh one") from None
                raise
        _check_matches_ref(location, header, base)

        header_mm = _map_header(control_fd, base, header_writable)
        # The attachment owns the control descriptor from here: its locks (liveness,
        # holder slot) live as long as this open file description, and die with the
        # process. Encrypted: one more descriptor of the control object for the data lock.
        lock_fd = os.dup(control_fd) if header.encrypted else None
        attachment = Attachment(header_mm, library, header_writable, control_fd, lock_fd,
                                lock_base=base)
        control_fd = -1
        # Hold first, then look at the state bits: seal() sets the sealed bit before
        # it looks for writable holders, so either it sees this hold or we see the bit.
        if header_writable:
            _hold(attachment, identity, location.region_id, mode)
            # Tell the VM(s) at once (one non-blocking datagram): no polling finds it.
            attachment.bell = (_announce.targets(header.creator_pid,
                                                 header.creator_start_time),
                               location.region_id)
            _announce.announce(attachment.bell[0], _announce.PREFIX_ATTACH,
                               location.region_id)
        else:
            warnings.warn(errors.UnheldAttachWarning(
                f"{location.control_path} cannot be opened for writing (sealed POSIX "
                "regions are mode 0400), so region "
                f"{location.region_id} is attached read-only without a hold. Keep it "
                "allocated on the Elixir side while this worker uses it, or use the "
                "memfd backend."), stacklevel=2)
        _check_state(location.region_id, header_mm, mode)
        _warn_if_orphaned(header, header_mm)

        data_mm, view_offset = _map_data(location.region_id, data_fd, header, mode, base)
        region = Region(location=location, header=header, attachment=attachment,
                        data_mm=data_mm, view_offset=view_offset, mode=mode)
        if header_writable:
            touch(header_mm)
        data_mm = attachment = None
        return region
    finally:
        if data_mm is not None:
            data_mm.close()
        if attachment is not None:
            attachment.close_quietly()
        # A dedicated memfd region's data descriptor is its own (POSIX and arena
        # regions read their data through the control descriptor).
        if data_fd is not None and location.backend == F.BACKEND_MEMFD and \
                location.control_offset is None:
            os.close(data_fd)
        if control_fd >= 0:
            os.close(control_fd)


def _raise_if_freed_chunk(location, snapshot, control_fd=None, base=0):
    """An arena region's ref (or index entry) whose chunk is free, or holds another
    region now: the region was freed and its space reused (a stale ref, like a memfd
    ref whose descriptor number was reused), not a damaged segment.

    A chunk whose control block reads as zeros while another open still holds its
    liveness lock is not free, though: the VM zeroes a freed chunk only once nobody
    holds that lock (docs/FORMAT.md "Arenas"), and keeps it for every live region.
    Another process overwrote it: CorruptRegion says so (a worker racing a reclaim
    holds the lock for microseconds: looked at twice, 10 ms apart)."""
    now = _header.reused_arena_chunk(snapshot)
    if now is None or now == location.region_id:
        return
    if now == "free" and control_fd is not None and _overwritten_chunk(control_fd, base):
        raise errors.CorruptRegion(
            f"region {location.region_id}: its control block at offset "
            f"{location.control_offset} of {location.control_path} reads as zeros while "
            "another process still holds the region (its owner VM holds every live "
            "region; a freed chunk is zeroed only once nobody does): another process of "
            "this user overwrote it. The region is damaged: ask the Elixir side to "
            "deallocate it and for a fresh one, and look for a process that writes "
            "outside its own regions.") from None
    what = ("is free" if now == "free" else
            f"holds region {now} (its space in the arena was reused)")
    raise errors.RegionNotFound(
        f"region {location.region_id} no longer exists: its arena chunk at offset "
        f"{location.control_offset} of {location.control_path} {what}. The owner freed "
        "the region (deallocated, or the owner exited); ask the Elixir side for a fresh "
        "region and ref.") from None


def _fast_open(library, location, mode):
    """Open, lock and validate a memfd region in one call of the library, or None (a
    POSIX region, or anything refused: the step-by-step path then says what)."""
    if location.backend != F.BACKEND_MEMFD or location.control_offset is not None:
        return None
    control_link, data_link = _locate.memfd_link_targets(location.region_id)
    opened = library.attach_memfd(location.control_path, control_link, location.data_path,
                                  data_link, mode == "rw")
    if opened == _native.E_DEALLOCATED:
        raise _deallocated_error(location.region_id)
    return opened


def _being_created(control_fd, snapshot):
    """True if the header is not published (zero magic) while another open holds the
    segment's liveness lock (byte 0): its creator is alive and still writing it."""
    if len(snapshot) >= 8 and snapshot[:8] != bytes(8):
        return False
    return _held_by_another(control_fd, 0)


def _held_by_another(fd, byte):
    """True if another open of the object holds a lock on ``byte`` (F_OFD_GETLK; our
    own open's locks never count)."""
    if not hasattr(fcntl, "F_OFD_GETLK"):
        return False
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks).
    query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
    try:
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query)
    except OSError:
        return False
    return struct.unpack("hhqqi4x", answer)[0] != fcntl.F_UNLCK


def _overwritten_chunk(fd, base):
    """An arena chunk whose magic reads zero although another open holds its liveness
    lock, twice 10 ms apart (see _raise_if_freed_chunk)."""
    for attempt in range(2):
        if attempt:
            time.sleep(0.01)
        try:
            if os.pread(fd, 8, base) != bytes(8):
                return False
        except OSError:
            return False
        if not _held_by_another(fd, base):
            return False
    return True


def _fast_open_arena(library, location):
    """The fast open of an arena region (a ref's or an index entry's offset), as
    :func:`_fast_open` returns it (the arena's one descriptor serves as control and
    data), or None."""
    if location.control_offset >= 1 << 63:
        return None  # (ctypes would silently wrap it): the step-by-step path says why
    opened = library.attach_arena(location.control_path, location.control_offset,
                                  location.region_id)
    if opened is None:
        return None
    fd, size, snapshot = opened
    return fd, size, fd, size, snapshot


def _validated(library, snapshot, location, control_size, data_size):
    """Validate a header snapshot: the core's checks (one C call), then what only this
    side knows (the id asked for, the metadata as JSON). A failure is explained by the
    Python twin of the checks, which names the problem in this API's words."""
    where, region_id = location.control_path, location.region_id
    if control_size < F.HEADER_SIZE or len(snapshot) < F.HEADER_SIZE:
        _header.validate(snapshot, where=where, region_id=region_id,
                         control_size=control_size, data_object_size=data_size)
    try:
        with _native.buffer_address(snapshot) as (address, _):
            library.validate_header(address, data_size)
    except errors.CorruptRegion:
        # Raises with a precise message; if the twin finds nothing, the core's error
        # stands.
        _header.validate(snapshot, where=where, region_id=region_id,
                         control_size=control_size, data_object_size=data_size)
        raise
    return _header.from_valid(snapshot, where=where, region_id=region_id)


async def attach_async(ref_or_region_id, mode="r"):
    """:func:`attach` in the event loop's default executor (finding a memfd region by
    bare id scans /proc, and the first load of the C library reads a file)."""
    import asyncio
    return await asyncio.get_running_loop().run_in_executor(None, attach,
                                                            ref_or_region_id, mode)


def inspect(ref_or_region_id):
    """Return a snapshot of a region's header as a dict, without attaching it.

    Opens the segment read-only, validates the header and registers no hold; needs
    no C library.  Used by ``python3 -m snakepit_shm info``.
    """
    location = _locate.parse_target(ref_or_region_id)
    with contextlib.ExitStack() as fds:
        fd, control_size = _locate.open_object(
            location.control_path, location.region_id, False,
            memfd_target=_memfd_target(location, 0))
        fds.callback(os.close, fd)
        base = _arena_base(location, control_size)
        snapshot = os.pread(fd, F.HEADER_SIZE, base)
        if location.control_offset is not None:
            data_size = control_size
        elif location.backend == F.BACKEND_MEMFD:
            data_fd, data_size = _locate.open_object(
                location.data_path, location.region_id, False,
                memfd_target=_data_target(location, snapshot))
            os.close(data_fd)
        else:
            data_size = control_size
        try:
            header = _header.validate(snapshot, where=location.control_path,
                                      region_id=location.region_id,
                                      control_size=control_size - base,
                                      data_object_size=data_size - base)
        except errors.CorruptRegion:
            if location.control_offset is not None:
                _raise_if_freed_chunk(location, snapshot, fd, base)
            raise
        return describe(header, snapshot, location)


def describe(header, raw, location):
    """Return a JSON-encodable dict of a validated header and its live part ``raw``."""
    fields = F.unpack_fields(raw)
    state = fields["state"]
    problem = expiry_problem(raw)
    holders = F.unpack_holders(raw)
    return {
        "region_id": header.region_id,
        "backend": F.BACKEND_NAMES[header.backend],
        "format_version": header.format_version,
        "size": header.data_size,
        "capacity": header.data_capacity,
        "data_offset": header.data_offset,
        "encrypted": header.encrypted,
        "named": bool(header.flags & F.FLAG_NAMED),
        "security_level": _SECURITY_LEVELS.get(header.security_level,
                                               header.security_level),
        "sealed": bool(state & F.STATE_SEALED),
        "deallocated": bool(state & F.STATE_DEALLOCATED),
        # The number of holds is the sum of the slots' counts (the header's refcount
        # field is only a hint: a holder killed mid-update can leave it off).
        "refcount": sum(h["count"] for h in holders),
        "holders": holders,
        "creator_pid": header.creator_pid,
        "creator_start_time": header.creator_start_time,
        "boot_id": header.boot_id.hex(),
        "created_at_ns": header.created_at_ns,
        "last_access_ns": fields["last_access_ns"],
        "idle_timeout_ns": fields["idle_timeout_ns"],
        "expired": problem is not None,
        "metadata": copy.deepcopy(header.metadata),
        "control_path": location.control_path,
        "data_path": location.data_path,
    }


def _memfd_target(location, index):
    if location.backend != F.BACKEND_MEMFD:
        return None
    if location.control_offset is not None:
        return _locate.arena_link_target(location.control_path, location.region_id)
    return _locate.memfd_link_targets(location.region_id)[index]


def _arena_base(location, control_size):
    """The control block's offset of an arena region (0 for a dedicated one)."""
    base = location.control_offset
    if base is None:
        return 0
    if base + F.HEADER_SIZE > control_size:
        raise errors.CorruptRegion(
            f"region {location.region_id}: the ref's control_offset {base} lies beyond "
            f"its arena ({control_size} bytes); the ref is stale or was edited.")
    return base


def _open_control(location, mode):
    """Open the control object, writable if at all possible (holds need it)."""
    target = _memfd_target(location, 0)
    try:
        fd, size = _locate.open_object(location.control_path, location.region_id, True,
                                       memfd_target=target)
        return fd, size, True
    except _locate.OpenDenied:
        if mode == "rw":
            _raise_if_sealed(location, target)
            raise
    fd, size = _locate.open_object(location.control_path, location.region_id, False,
                                   memfd_target=target)
    return fd, size, False


def _raise_if_sealed(location, target):
    """Explain a refused writable open of a sealed POSIX region (mode 0400)."""
    fd, _ = _locate.open_object(location.control_path, location.region_id, False,
                                memfd_target=target)
    try:
        raw = os.pread(fd, F.HEADER_SIZE, 0)
    finally:
        os.close(fd)
    if len(raw) == F.HEADER_SIZE and raw[:8] == F.MAGIC \
            and state_bits(raw) & F.STATE_SEALED:
        raise _sealed_error(location.region_id)


def _open_data(location, mode, control_fd, control_size, snapshot, library):
    if location.backend != F.BACKEND_MEMFD or location.control_offset is not None:
        return control_fd, control_size
    fd, size = _locate.open_object(location.data_path, location.region_id, mode == "rw",
                                   memfd_target=_data_target(location, snapshot))
    try:
        _lock_data(library, location.region_id, fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, size


def _data_target(location, snapshot):
    """The /proc link target the data memfd must have: <id>.data, or the name the
    header's data_name gives (a data memfd reused from its creator's warm pool);
    ``snapshot`` is the header as read once by the caller."""
    name = _header.data_name(snapshot) if len(snapshot) == F.HEADER_SIZE else ""
    if not name:
        return _memfd_target(location, 1)
    return f"/memfd:{name} (deleted)"


def _lock_data(library, region_id, fd):
    """Take the shared lock of byte 0 of the data memfd, held while this open or a
    mapping of it lives: its creator's warm pool never takes back an object someone
    still maps (docs/ARCHITECTURE.md).  The core's own lock (one implementation for
    the NIF, the pool and workers); refused only while the pool holds the object: the
    region this ref named is gone."""
    try:
        library.lock_data(fd)
    except errors.SnakepitShmError as exc:
        if getattr(exc, "code", None) == _native.E_DEALLOCATED:
            raise _deallocated_error(region_id) from None
        raise


def _check_matches_ref(location, header, base=0):
    problems = []
    if header.backend != location.backend:
        problems.append(f"backend {F.BACKEND_NAMES.get(header.backend)}")
    if location.size is not None and location.size != header.data_size:
        problems.append(f"size {header.data_size}, the ref says {location.size}")
    if location.data_offset is not None and \
            location.data_offset != base + header.data_offset:
        problems.append(f"data_offset {base + header.data_offset}, the ref says "
                        f"{location.data_offset}")
    if problems:
        raise errors.CorruptRegion(
            f"region {location.region_id} does not match its ref ({'; '.join(problems)}):"
            " the ref is stale or was edited; ask the Elixir side for a fresh "
            "export_ref/2.")


def _hold(attachment, identity, region_id, mode):
    """Register the hold, translating the core's refusals into this API's words."""
    try:
        attachment.hold(identity, writable=(mode == "rw"))
    except errors.SnakepitShmError as exc:
        code = getattr(exc, "code", None)
        if code == _native.E_SEALED:
            raise _sealed_error(region_id) from None
        if code == _native.E_DEALLOCATED:
            raise _deallocated_error(region_id) from None
        raise


def _deallocated_error(region_id):
    return errors.RegionNotFound(
        f"region {region_id} was deallocated: its data is gone or being zeroed. Ask the "
        "Elixir side for a fresh region.")


def _warn_if_orphaned(header, header_mm):
    """Warn when the creator VM is gone (and no VM adopted the region)."""
    if state_bits(header_mm) & F.STATE_ADOPTED or creator_alive(header):
        return
    warnings.warn(errors.OrphanedRegionWarning(
        f"region {header.region_id} is an orphan: the process that created it "
        f"(OS pid {header.creator_pid}) is no longer running, so nobody will read what "
        "this worker writes into it and the next orphan sweep frees it. Finish "
        "quickly, or ask a live VM for a fresh region."), stacklevel=3)


def _check_state(region_id, header_mm, mode):
    state = state_bits(header_mm)
    if state & F.STATE_DEALLOCATED:
        raise _deallocated_error(region_id)
    if mode == "rw" and state & F.STATE_SEALED:
        raise _sealed_error(region_id)
    problem = expiry_problem(header_mm)
    if problem:
        raise errors.RegionExpired(f"region {region_id} expired: {problem}")


def _sealed_error(region_id):
    return errors.PermissionError(
        f"region {region_id} is sealed (immutable): attach it with mode='r' to read it, "
        "and write results into another region.")


# The header page is always touched at once (the hold, the state bits, the access
# time): MAP_POPULATE maps it in the mmap call itself instead of in a page fault, which
# costs more (a trap) where faults are expensive (virtual machines).
_POPULATE = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def _map_header(fd, base, writable):
    """Map the header page (read-write if ``writable``, else read-only, as
    ACCESS_WRITE / ACCESS_READ would: prot without PROT_WRITE is ACCESS_READ)."""
    prot = mmap.PROT_READ | mmap.PROT_WRITE if writable else mmap.PROT_READ
    return mmap.mmap(fd, F.HEADER_SIZE, flags=_POPULATE, prot=prot, offset=base)


def _map_data(region_id, fd, header, mode, base=0):
    """Map [data_offset, data_offset + capacity) of the data object (an arena region:
    only its own pages, base + data_offset onwards)."""
    data_offset = base + header.data_offset
    start = data_offset - data_offset % mmap.ALLOCATIONGRANULARITY
    view_offset = data_offset - start
    access = mmap.ACCESS_WRITE if mode == "rw" else mmap.ACCESS_READ
    length = view_offset + header.data_capacity
    if header.flags & F.FLAG_HUGE_PAGES:
        # hugetlbfs: munmap refuses lengths that are not whole huge pages.
        length = os.fstat(fd).st_size - start
    try:
        data_mm = mmap.mmap(fd, length, offset=start, access=access)
    except OSError as exc:
        if mode == "rw" and exc.errno in (errno.EPERM, errno.EACCES):
            raise _sealed_error(region_id) from None
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            # mmap.mmap duplicates the descriptor it maps.
            hint = ("This worker is out of file descriptors: raise the limit (ulimit -n, "
                    "LimitNOFILE=) or close regions and files it no longer uses.")
        else:
            hint = "Check the address space and memory limits (ulimit -v) of this worker."
        raise errors.SnakepitShmError(
            f"cannot map region {region_id}: {exc.strerror}. {hint}") from None
    return data_mm, view_offset
