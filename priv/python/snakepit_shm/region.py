"""The Region class: one attached region, its mappings and its hold."""

import contextlib
import copy
import ctypes
import errno
import fcntl
import math
import operator
import os
import struct
import threading
import time
import weakref

from . import _announce
from . import errors
from . import _format as F
from . import _native
from . import _proc

__all__ = ["Region"]

_STATE = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def state_bits(header_mm):
    """Return the live ``state`` word of a mapped header."""
    return _STATE.unpack_from(header_mm, F.FIELD["state"][0])[0]


def expiry_problem(header_mm, now_ns=None):
    """Return a message if the region's idle timeout has passed, else None."""
    last = _U64.unpack_from(header_mm, F.FIELD["last_access_ns"][0])[0]
    timeout = _U64.unpack_from(header_mm, F.FIELD["idle_timeout_ns"][0])[0]
    now = time.time_ns() if now_ns is None else now_ns
    if timeout and now > last and now - last > timeout:
        return (f"idle for {(now - last) / 1e9:.3f} s, longer than its timeout of "
                f"{timeout / 1e9:.3f} s; the manager will free it. Ask the Elixir side "
                "for a fresh region, or allocate it with a longer :timeout.")
    return None


def creator_alive(header):
    """True if the header's creator process runs, with its start time, on this boot."""
    boot = _proc.boot_id()
    if boot is not None and boot != header.boot_id:
        return False
    return _proc.running(header.creator_pid, header.creator_start_time)


def deallocated_message(header, state=0):
    """Say who freed a region and what to do, for RegionDeallocated."""
    if state & F.STATE_ADOPTED:
        who = "the VM that adopted it (adopt_region/2)"
    elif creator_alive(header):
        who = f"its owner (OS process {header.creator_pid}, the VM that created it)"
    else:
        who = f"its owner's cleanup (the creating process {header.creator_pid} is gone)"
    return (f"region {header.region_id} was deallocated by {who}: its memory is no "
            "longer anybody's, so anything written now would be lost and anything read "
            "may be zeroed. Ask the Elixir side for a fresh region (and keep a region "
            "allocated until the worker has answered).")


def touch(header_mm):
    """Record an access time in a writable header.

    One aligned 8-byte copy, a single store on x86-64 and arm64, so peers never see a
    torn value; the field is an idleness hint, so a racing peer's slightly later time
    being overwritten does not matter.
    """
    _U64.pack_into(header_mm, F.FIELD["last_access_ns"][0], time.time_ns())


class Attachment:
    """The header mapping and this process's hold on it.

    Separate from Region so that a hold can outlive the Region object: when a Region
    is garbage collected while numpy arrays of it are alive, the hold is released
    only once the data mapping itself goes away (see Region.__del__).
    """

    def __init__(self, header_mm, library, writable, fd, lock_fd=None, lock_base=0):
        """Wrap a mapped header; ``writable`` if it is mapped for writing.

        ``fd`` is a descriptor of this attachment's own open of the control object
        (owned from now on): it carries the liveness lock and the lock of the holder
        slot, and is closed by close().

        ``lock_fd`` (encrypted regions) is a descriptor of the control object kept open
        for the cross-process data lock (reopened in forked children); closed with the
        attachment.
        """
        self.header_mm = header_mm
        # Taken once (an open mmap never moves); used only under self._lock or before
        # the attachment is shared, and close() unmaps only after the release.
        self.address = _native.address_of(header_mm, writable=writable) if writable \
            else None
        self.library = library
        self.writable = writable
        self.fd = fd
        self.slot = ctypes.c_int(-1)  # the holder slot this open owns (-1: none)
        self.lock_fd = lock_fd
        self.lock_base = lock_base  # an arena region's control block offset (else 0)
        self.identity = None  # (pid, start_time) while a hold is registered
        self.bell = None  # (event socket paths, region id): announce the release
        self._lock = threading.Lock()
        if lock_fd is not None:
            _lock_holders.add(self)

    @contextlib.contextmanager
    def data_lock(self, exclusive, region_id):
        """Hold the data lock of an encrypted region (OFD lock of F.DATA_LOCK_BYTE).

        Writers lock it exclusively, readers shared, never waiting: a conflict raises
        RegionBusy. The kernel drops the lock if this process dies.
        """
        if self.lock_fd is None:
            yield
            return
        if self.lock_fd < 0:
            raise errors.RegionBusy(
                f"encrypted region {region_id} cannot be locked in this forked process "
                "(its lock descriptor could not be reopened): attach it again here")
        _ofd_lock(self.lock_fd, fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, region_id)
        try:
            yield
        finally:
            _ofd_lock(self.lock_fd, fcntl.F_UNLCK, region_id)

    def hold(self, identity, writable):
        """Register one hold of ``identity`` in the header, in this open's slot."""
        with self._lock:
            self.library.hold_fd(self.address, self.fd, self.slot, identity[0],
                                 identity[1], writable, self.lock_base)
            self.identity = identity

    def clear_stale_sealing(self):
        """Clear a sealing bit left by a sealer killed mid-seal (the core's check of the
        seal lock through this open): True if the bit is clear now, False while a live
        process is sealing (or the header is not writable here)."""
        with self._lock:
            if self.address is None or self.fd is None or self.fd < 0:
                return False
            return self.library.clear_stale_sealing(self.address, self.fd, self.lock_base)

    def release(self, closing=False):
        """Release the hold if this process registered one (idempotent, fork-safe).

        ``closing``: the control descriptor is closed right after (close()), which drops
        the slot's lock with every other lock of this open: no unlock call of its own.
        """
        with self._lock:
            identity, self.identity = self.identity, None
            # After a fork the child inherits the mapping but not the hold: only the
            # process that registered the hold may release it.
            if identity is None or identity[0] != _proc.pid():
                return
            try:
                if closing:
                    self.library.release_fd_closing(self.address, self.fd, self.slot,
                                                    self.lock_base)
                else:
                    self.library.release_fd(self.address, self.fd, self.slot,
                                            self.lock_base)
            except errors.CorruptRegion:
                # A peer truncated the segment below its header (the hold was in the
                # lost page, which reads as zeros now), or overwrote the header: its
                # slot's lock goes with the descriptor closed next, which is the hold
                # (a slot whose lock is free is dead), and a header that is no longer
                # one has nothing to give back. Raising here would lose the result of
                # the `with` block that closes the region.
                if not closing and \
                        os.fstat(self.fd).st_size >= self.lock_base + F.HEADER_SIZE:
                    raise
            if self.bell is not None:
                _announce.announce(self.bell[0], _announce.PREFIX_RELEASE, self.bell[1])

    def close(self):
        """Release the hold, then unmap the header and close the control descriptor."""
        try:
            self.release(closing=True)
        finally:
            try:
                self.header_mm.close()
            finally:
                fd, self.fd = self.fd, -1
                if fd >= 0:
                    os.close(fd)
                fd, self.lock_fd = self.lock_fd, None
                if fd is not None and fd >= 0:
                    os.close(fd)

    def reopen_lock_after_fork(self):
        """In a forked child: give the data lock a descriptor of its own.

        An OFD lock belongs to the open file description, which fork() shares: parent
        and child would both "hold" the exclusive lock at once and write one encrypted
        chunk together, destroying it. The child's descriptor is replaced by a fresh
        open of the same object (the parent's lock and descriptor are untouched).
        """
        fd = self.lock_fd
        if fd is None or fd < 0:
            return
        try:
            mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
            fresh = os.open(f"/proc/self/fd/{fd}", mode | os.O_CLOEXEC)
        except OSError:
            self.lock_fd = -1  # refuse locked access rather than share the parent's lock
            try:
                os.close(fd)
            except OSError:
                pass
            return
        try:
            os.dup2(fresh, fd, inheritable=False)
        finally:
            os.close(fresh)

    def close_quietly(self):
        """close() for finalizers, where nobody could handle an exception."""
        try:
            self.close()
        except Exception:  # noqa: BLE001 - a finalizer must not raise
            pass


class Region:
    """A region attached to this process; obtain one with :func:`snakepit_shm.attach`.

    Lifetime rules:

    * Use it as a context manager, or call :meth:`close` when done.  Leaving the
      ``with`` block (or ``close()``) while numpy arrays or memoryviews of the region
      are still alive never raises and never throws a result away: the Region is
      closed for new calls at once, and the mapping and this process's hold last
      until the last of those views is gone.  Return a slice, keep an array: both
      stay valid.
    * ``close(strict=True)`` is the strict variant: it raises
      :class:`~snakepit_shm.ViewsStillAlive` (a BufferError) while views are alive and
      leaves the region attached and usable.
    * A Region that is garbage collected behaves like ``close()``.
    * Once the Elixir side deallocated the region, ``read``, ``write``, ``ndarray`` and
      ``buf`` raise :class:`~snakepit_shm.RegionDeallocated`; :attr:`deallocated` and
      :attr:`owner_alive` tell without raising.  Arrays made earlier still point at
      the old memory: their contents are no longer anybody's results.
    """

    def __init__(self, *, location, header, attachment, data_mm, view_offset, mode):
        """Internal: use :func:`snakepit_shm.attach`."""
        self._location = location
        self._header = header
        self._attachment = attachment
        self._data_mm = data_mm
        self._view_offset = view_offset
        self._mode = mode
        self._lock = threading.RLock()
        self._closed = False
        self._output_ref = None

    # ---- properties ----

    @property
    def region_id(self):
        """The region id ("spshm_...")."""
        return self._header.region_id

    @property
    def size(self):
        """Number of bytes usable by the user (the plaintext size)."""
        return self._header.data_size

    @property
    def mode(self):
        """"r" or "rw", as passed to attach()."""
        return self._mode

    @property
    def backend(self):
        """"posix" or "memfd"."""
        return F.BACKEND_NAMES[self._header.backend]

    @property
    def encrypted(self):
        """True if the data is encrypted: use read() and write(), not buf."""
        return self._header.encrypted

    @property
    def metadata(self):
        """The JSON metadata object the Elixir side stored in the header (a dict)."""
        return copy.deepcopy(self._header.metadata)

    @property
    def sealed(self):
        """True if the region is sealed (immutable); read live from the header."""
        self._check_open()
        return bool(state_bits(self._attachment.header_mm) & F.STATE_SEALED)

    @property
    def held(self):
        """True if this process is registered as a holder of the region."""
        return self._attachment.identity is not None and not self._closed

    @property
    def closed(self):
        """True once close() was called (even if live views defer the unmapping)."""
        return self._closed

    @property
    def released(self):
        """True once the mapping is gone and the hold released (no view left)."""
        return self._closed and self._attachment.identity is None

    @property
    def deallocated(self):
        """True if the owner deallocated the region: its data is no longer anybody's."""
        self._check_open()
        return bool(state_bits(self._attachment.header_mm) & F.STATE_DEALLOCATED)

    @property
    def owner_alive(self):
        """True if the process that created the region (the VM) is still running.

        A region whose creator died (kill -9 of the VM) is an orphan: the next orphan
        sweep of a VM on this host frees it.  For a region a worker created and a VM
        adopted, the creator is the worker.
        """
        return creator_alive(self._header)

    @property
    def ref(self):
        """A JSON-encodable ref to this region, for another process or the VM.

        For an output made by :func:`snakepit_shm.allocate` it is what Elixir's
        ``adopt_region/2`` takes; for an attached region it locates the same region.
        """
        if self._output_ref is not None:
            return dict(self._output_ref)
        loc = self._location
        return {"v": 1, "region_id": self.region_id, "backend": self.backend,
                "control_path": loc.control_path, "data_path": loc.data_path,
                "size": self.size, "dtype": self._default("dtype", None),
                "shape": self._default("shape", None), "metadata": self.metadata,
                "format": self.metadata.get("format") or (
                    "numpy" if self._default("dtype", None) else "raw")}

    def zero_copy_ref(self):
        """:attr:`ref` wrapped in Snakepit's ZeroCopyRef wire marker (kind "shm")."""
        from ._resolve import to_zero_copy_ref  # late import: _resolve imports _attach
        return to_zero_copy_ref(self.ref)

    @property
    def buf(self):
        """A memoryview of the data (read-only in mode "r"); no copy."""
        self._check_plaintext(".buf")
        self._check_live()
        start = self._view_offset
        return memoryview(self._data_mm)[start:start + self.size]

    # ---- data access ----

    def ndarray(self, dtype=None, shape=None, *, offset=0):
        """Return a zero-copy numpy array over the data.

        ``dtype`` and ``shape`` default to those of the ref, then to the "dtype" and
        "shape" keys of the metadata, then to uint8 and the whole region.  The array is
        read-only in mode "r".  Delete it before close().
        """
        numpy = _import_numpy()
        self._check_plaintext(".ndarray()")
        self._check_live()
        dtype = numpy.dtype(self._default("dtype", dtype) or "uint8")
        if dtype.itemsize == 0:
            raise ValueError(
                f"dtype {dtype.str!r} has 0 bytes per item: give a sized one (such as "
                "'S16' or 'V8') or a numeric dtype")
        shape = self._default("shape", shape)
        available = self.size - _check_offset(offset, self.size)
        if shape is None:
            if available % dtype.itemsize:
                raise ValueError(
                    f"{available} bytes are not a whole number of {dtype} items: pass "
                    "shape= (or a dtype whose size divides the region size)")
            count = available // dtype.itemsize
            shape = (count,)
        else:
            shape = _normalize_shape(shape)
            count = math.prod(shape)
            if count * dtype.itemsize > available:
                raise ValueError(
                    f"shape {shape} of {dtype} needs {count * dtype.itemsize} bytes, "
                    f"the region has {available} from offset {offset}")
        start = self._view_offset + offset
        view = memoryview(self._data_mm)[start:start + count * dtype.itemsize]
        return numpy.frombuffer(view, dtype=dtype, count=count).reshape(shape)

    def read(self, offset=0, length=None):
        """Return a copy of the data as bytes, decrypting and verifying if encrypted.

        Reads ``length`` bytes from ``offset`` (default: to the end).  For an
        encrypted region this needs the key (``export_ref(id, include_key: true)``);
        tampered data raises CorruptRegion.
        """
        with self._lock:
            self._check_open()
            self._check_live()
            offset, length = _check_range(offset, length, self.size)
            if self.encrypted:
                out = bytearray(length)
                with _native.buffer_address(out, writable=True) as (address, _):
                    self._decrypt_into(address, offset, length)
                data = bytes(out)
            else:
                start = self._view_offset + offset
                with memoryview(self._data_mm) as view:
                    data = bytes(view[start:start + length])
            self._check_not_truncated(offset, length)
            self._touch()
            return data

    def readinto(self, buffer, offset=0):
        """Copy (decrypting if needed) the data from ``offset`` into ``buffer``.

        ``buffer`` is any writable, C-contiguous bytes-like object (bytearray, numpy
        array, memoryview); it is filled completely.  Returns the number of bytes.
        The way to get encrypted data into a numpy array without an extra copy.
        """
        with self._lock:
            self._check_open()
            self._check_live()
            with _exported(buffer, True, "readinto() needs a writable, C-contiguous "
                           "buffer") as (target, length):
                offset, length = _check_range(offset, length, self.size)
                if self.encrypted:
                    self._decrypt_into(target, offset, length)
                else:
                    with _native.buffer_address(self._data_mm) as (data, _):
                        ctypes.memmove(target, data + self._view_offset + offset, length)
            self._check_not_truncated(offset, length)
            self._touch()
            return length

    def write(self, offset, data):
        """Copy ``data`` (bytes-like) into the region at ``offset`` (mode "rw" only).

        Encrypted regions are encrypted chunk by chunk with fresh nonces (needs the
        key).  Sealed regions refuse with PermissionError.
        """
        with self._lock:
            self._check_open()
            self._check_live()
            if self._mode != "rw":
                raise errors.PermissionError(
                    f"region {self.region_id} is attached read-only: attach it with "
                    "mode='rw' to write")
            if self.sealed:
                raise errors.PermissionError(
                    f"region {self.region_id} is sealed (immutable): write results into "
                    "another region")
            if state_bits(self._attachment.header_mm) & F.STATE_SEALING \
                    and not self._attachment.clear_stale_sealing():
                raise errors.RegionBusy(
                    f"region {self.region_id} is being sealed: writes are refused (the "
                    "seal fails while this worker maps it writable: close it)")
            with _exported(data, False, "write() needs C-contiguous bytes-like data") \
                    as (source, length):
                offset, length = _check_range(offset, length, self.size)
                if self.encrypted:
                    self._encrypt(offset, source, length)
                else:
                    with _native.buffer_address(self._data_mm, writable=True) as (out, _):
                        ctypes.memmove(out + self._view_offset + offset, source, length)
            self._check_not_truncated(offset, length)
            self._touch()

    def _check_not_truncated(self, offset, length):
        """After a copy: a POSIX segment shrunk by a peer (same uid) lost those pages.
        The fault guard (attach) made them read as zeros, and writes to them vanish, so
        the copy must not count: CorruptRegion."""
        if self._location.backend != F.BACKEND_POSIX or length == 0:
            return
        if self.encrypted:  # plaintext offsets: the chunks are anywhere in the capacity
            offset, length = 0, self._header.data_capacity
        end = (self._location.control_offset or 0) + self._header.data_offset + offset + length
        size = os.fstat(self._attachment.fd).st_size
        if size < end:
            raise errors.CorruptRegion(
                f"region {self.region_id} was truncated by another process: its segment "
                f"{self._location.control_path} now has {size} bytes, bytes [{offset}, "
                f"{offset + length}) of the data need {end}; they are lost. Close it; the "
                "Elixir side answers :truncated for it too.")

    # ---- asyncio ----

    async def read_async(self, offset=0, length=None):
        """:meth:`read` in the event loop's default executor (decryption of a large
        encrypted region takes about 1.5 s per GB: never block the loop with it)."""
        return await _in_executor(self.read, offset, length)

    async def readinto_async(self, buffer, offset=0):
        """:meth:`readinto` in the default executor."""
        return await _in_executor(self.readinto, buffer, offset)

    async def write_async(self, offset, data):
        """:meth:`write` in the default executor."""
        return await _in_executor(self.write, offset, data)

    # ---- lifecycle ----

    def close(self, strict=False):
        """Close the region: unmap it and release this process's hold (idempotent).

        If memoryviews or numpy arrays of the region are still alive, the Region is
        closed for further calls now and the unmapping and the hold release happen when
        the last of them is garbage collected; the views stay valid until then.
        Returns True if everything was released now, False if it was deferred.

        ``strict=True`` refuses instead: it raises ViewsStillAlive (a BufferError)
        while views exist, and the region stays attached and usable.
        """
        with self._lock:
            if self._closed:
                return self.released
            try:
                self._data_mm.close()
            except BufferError:
                if not strict:
                    self._closed = True
                    weakref.finalize(self._data_mm, self._attachment.close_quietly)
                    # The views keep the mmap alive; this Region must not, or the
                    # finalizer would wait for the Region too.
                    self._data_mm = None
                    return False
                raise errors.ViewsStillAlive(
                    f"cannot close region {self.region_id}: memoryviews or numpy arrays "
                    "made from its .buf or .ndarray() are still alive. Delete them "
                    "(`del arr`, `view.release()`) and call close() again; the region "
                    "stays attached and usable until then.") from None
            self._closed = True
            self._attachment.close()
            return True

    def close_now(self):
        """close(strict=True): raise ViewsStillAlive rather than defer."""
        return self.close(strict=True)

    def info(self):
        """Return a snapshot of the header as a JSON-encodable dict."""
        from . import _attach  # late import: _attach imports this module
        with self._lock:
            self._check_open()
            return _attach.describe(self._header, bytes(self._attachment.header_mm),
                                    self._location)

    def __enter__(self):
        """Return the region itself."""
        return self

    def __exit__(self, exc_type, exc, traceback):
        """Close the region; live views defer the unmapping (see close())."""
        self.close()

    def __del__(self):
        """Close on garbage collection; defer the hold release while views live."""
        if getattr(self, "_closed", True):
            return
        try:
            # Arrays of the region still alive: the hold lasts until the data mapping
            # itself is freed with the last of them.
            self.close()
        except Exception:  # noqa: BLE001 - __del__ must not raise
            pass

    # A copy would share the mappings and the hold: closing either would unmap the
    # other's memory behind its back.  Hand over the ref instead.
    def __copy__(self):
        raise TypeError("a Region cannot be copied: attach its ref again "
                        "(snakepit_shm.attach(region.ref)) for a second handle")

    def __deepcopy__(self, memo):
        self.__copy__()

    def __reduce__(self):
        raise TypeError("a Region cannot be pickled: send region.ref (JSON-encodable) and "
                        "attach it on the other side")

    def __repr__(self):
        """Return a short description (id, size, mode, backend, state)."""
        state = "closed" if self._closed else ("held" if self.held else "unheld")
        return (f"<snakepit_shm.Region {self.region_id} size={self.size} "
                f"mode={self._mode!r} backend={self.backend} {state}>")

    # ---- helpers ----

    def _check_open(self):
        if self._closed:
            raise ValueError(f"region {self.region_id} is closed; attach it again")

    def _check_live(self):
        """Refuse a region the owner deallocated (a read-only peek at the header)."""
        state = state_bits(self._attachment.header_mm)
        if state & F.STATE_DEALLOCATED:
            raise errors.RegionDeallocated(deallocated_message(self._header, state))

    def _check_plaintext(self, what):
        self._check_open()
        if self.encrypted:
            raise errors.PermissionError(
                f"region {self.region_id} is encrypted: {what} would expose ciphertext. "
                "Use .read() to get the decrypted bytes (and .write() to store results).")

    def _default(self, name, given):
        if given is not None:
            return given
        from_ref = getattr(self._location, name)
        if from_ref is not None:
            return from_ref
        value = self._header.metadata.get(name)
        # the decoded metadata is shared by the regions with the same bytes: copies out
        return copy.deepcopy(value) if isinstance(value, (list, dict)) else value

    def _key(self):
        key = self._location.key
        if key is None:
            raise errors.PermissionError(
                f"region {self.region_id} is encrypted and the ref carries no key: on "
                "the Elixir side export it with export_ref(id, include_key: true) and "
                "pass that ref to attach().")
        return key

    def _decrypt_into(self, out_address, offset, length):
        key = self._key()
        if length == 0:
            return
        lib = _native.library()
        # A sealed region has no writer left: no lock needed.
        locking = not state_bits(self._attachment.header_mm) & F.STATE_SEALED
        with self._attachment.data_lock(False, self.region_id) if locking \
                else contextlib.nullcontext(), \
                _native.buffer_address(self._attachment.header_mm) as (header, _), \
                _native.buffer_address(self._data_mm) as (data, data_len):
            try:
                lib.decrypt(header, data + self._view_offset, data_len - self._view_offset,
                            key, offset, out_address, length)
            except errors.CorruptRegion:
                self._check_not_truncated(offset, length)  # the likelier cause, if so
                raise

    def _encrypt(self, offset, source_address, length):
        key = self._key()
        if length == 0:
            return
        lib = _native.library()
        with self._attachment.data_lock(True, self.region_id), \
                _native.buffer_address(self._attachment.header_mm) as (header, _), \
                _native.buffer_address(self._data_mm, writable=True) as (data, data_len):
            try:
                lib.encrypt(header, data + self._view_offset, data_len - self._view_offset,
                            key, offset, source_address, length)
            except errors.CorruptRegion:
                self._check_not_truncated(offset, length)  # the likelier cause, if so
                raise

    def _touch(self):
        if self._attachment.writable:
            touch(self._attachment.header_mm)


async def _in_executor(function, *args):
    import asyncio
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


_lock_holders = weakref.WeakSet()  # Attachments with a data lock descriptor


def _reopen_locks_in_child():
    for attachment in list(_lock_holders):
        attachment.reopen_lock_after_fork()


os.register_at_fork(after_in_child=_reopen_locks_in_child)


def _ofd_lock(fd, kind, region_id):
    """Set (or drop) an OFD lock on byte F.DATA_LOCK_BYTE of ``fd`` without waiting."""
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks).
    request = struct.pack("hhqqi4x", kind, os.SEEK_SET, F.DATA_LOCK_BYTE, 1, 0)
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            who = "reading or writing" if kind == fcntl.F_WRLCK else "writing"
            raise errors.RegionBusy(
                f"encrypted region {region_id} is in use: another process is {who} it "
                "(one writer at a time, enforced across processes); retry") from None
        raise


@contextlib.contextmanager
def _exported(obj, writable, problem):
    """Yield (address, nbytes) of a contiguous buffer, or raise TypeError(problem)."""
    with contextlib.ExitStack() as stack:
        try:
            address, length = stack.enter_context(
                _native.buffer_address(obj, writable=writable))
        except (BufferError, TypeError, ValueError) as exc:
            raise TypeError(f"{problem}, got {type(obj).__name__} ({exc})") from None
        yield address, length


def _import_numpy():
    try:
        import numpy
    except ImportError:
        raise ModuleNotFoundError(
            "Region.ndarray() needs numpy, which is not installed for this interpreter: "
            "install it (Debian: apt-get install python3-numpy) or use Region.buf, a "
            "memoryview of the same bytes.") from None
    return numpy


def _check_offset(offset, size):
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if not 0 <= offset <= size:
        raise ValueError(f"offset {offset} is outside the region (size {size})")
    return offset


def _check_range(offset, length, size):
    offset = _check_offset(offset, size)
    if length is None:
        length = size - offset
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise ValueError(f"length must be a non-negative int, got {length!r}")
    if offset + length > size:
        raise ValueError(f"[{offset}, {offset + length}) is outside the region "
                         f"(size {size})")
    return offset, length


def _index(value):
    """``value`` as a Python int if it is an integer (numpy's too, not bool), else None."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _normalize_shape(shape):
    if _index(shape) is not None:
        shape = (shape,)
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") \
            from None
    dims = tuple(_index(d) for d in shape)
    if not all(d is not None and d >= 0 for d in dims):
        raise ValueError(f"shape must hold non-negative ints, got {shape!r}")
    return dims
