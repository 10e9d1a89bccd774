"""The Region class: one attached region, its mappings and its hold."""

import contextlib
import ctypes
import math
import os
import struct
import threading
import time
import weakref

from . import errors
from . import _format as F
from . import _native

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

    def __init__(self, header_mm, library, writable, fd):
        """Wrap a mapped header; ``writable`` if it is mapped for writing.

        ``fd`` is a descriptor of this attachment's own open of the control object
        (owned from now on): it carries the liveness lock and the lock of the holder
        slot, and is closed by close().
        """
        self.header_mm = header_mm
        self.library = library
        self.writable = writable
        self.fd = fd
        self.slot = ctypes.c_int(-1)  # the holder slot this open owns (-1: none)
        self.identity = None  # (pid, start_time) while a hold is registered
        self._lock = threading.Lock()

    def hold(self, identity, writable):
        """Register one hold of ``identity`` in the header, in this open's slot."""
        with _native.buffer_address(self.header_mm, writable=True) as (address, _):
            self.library.hold_fd(address, self.fd, self.slot, identity[0], identity[1],
                                 writable)
        self.identity = identity

    def release(self):
        """Release the hold if this process registered one (idempotent, fork-safe)."""
        with self._lock:
            identity, self.identity = self.identity, None
            # After a fork the child inherits the mapping but not the hold: only the
            # process that registered the hold may release it.
            if identity is None or identity[0] != os.getpid():
                return
            with _native.buffer_address(self.header_mm, writable=True) as (address, _):
                self.library.release_fd(address, self.fd, self.slot)

    def close(self):
        """Release the hold, then unmap the header and close the control descriptor."""
        try:
            self.release()
        finally:
            try:
                self.header_mm.close()
            finally:
                fd, self.fd = self.fd, -1
                if fd >= 0:
                    os.close(fd)

    def close_quietly(self):
        """close() for finalizers, where nobody could handle an exception."""
        try:
            self.close()
        except Exception:  # noqa: BLE001 - a finalizer must not raise
            pass


class Region:
    """A region attached to this process; obtain one with :func:`snakepit_shm.attach`.

    Use it as a context manager, or call :meth:`close` when done.  ``close()``
    refuses (raising :class:`~snakepit_shm.ViewsStillAlive`, a BufferError) while
    memoryviews or numpy arrays of the region are alive: delete them first, then call
    ``close()`` again; the region stays attached and usable until then.  A Region that
    is garbage collected while arrays of it are alive keeps its hold until the last of
    them is gone.
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
        return dict(self._header.metadata)

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
        """True once close() succeeded."""
        return self._closed

    @property
    def buf(self):
        """A memoryview of the data (read-only in mode "r"); no copy."""
        self._check_plaintext(".buf")
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
        dtype = numpy.dtype(self._default("dtype", dtype) or "uint8")
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
            with _exported(buffer, True, "readinto() needs a writable, C-contiguous "
                           "buffer") as (target, length):
                offset, length = _check_range(offset, length, self.size)
                if self.encrypted:
                    self._decrypt_into(target, offset, length)
                else:
                    with _native.buffer_address(self._data_mm) as (data, _):
                        ctypes.memmove(target, data + self._view_offset + offset, length)
            self._touch()
            return length

    def write(self, offset, data):
        """Copy ``data`` (bytes-like) into the region at ``offset`` (mode "rw" only).

        Encrypted regions are encrypted chunk by chunk with fresh nonces (needs the
        key).  Sealed regions refuse with PermissionError.
        """
        with self._lock:
            self._check_open()
            if self._mode != "rw":
                raise errors.PermissionError(
                    f"region {self.region_id} is attached read-only: attach it with "
                    "mode='rw' to write")
            if self.sealed:
                raise errors.PermissionError(
                    f"region {self.region_id} is sealed (immutable): write results into "
                    "another region")
            with _exported(data, False, "write() needs C-contiguous bytes-like data") \
                    as (source, length):
                offset, length = _check_range(offset, length, self.size)
                if self.encrypted:
                    self._encrypt(offset, source, length)
                else:
                    with _native.buffer_address(self._data_mm, writable=True) as (out, _):
                        ctypes.memmove(out + self._view_offset + offset, source, length)
            self._touch()

    # ---- lifecycle ----

    def close(self):
        """Unmap the region and release this process's hold (idempotent).

        Raises ViewsStillAlive (a BufferError) if memoryviews or numpy arrays of the
        region still exist: the region then stays attached; delete them and call
        close() again.
        """
        with self._lock:
            if self._closed:
                return
            try:
                self._data_mm.close()
            except BufferError:
                raise errors.ViewsStillAlive(
                    f"cannot close region {self.region_id}: memoryviews or numpy arrays "
                    "made from its .buf or .ndarray() are still alive. Delete them "
                    "(`del arr`, `view.release()`) and call close() again; the region "
                    "stays attached and usable until then.") from None
            self._closed = True
            self._attachment.close()

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
        """Close the region (see close() about live views)."""
        self.close()

    def __del__(self):
        """Close on garbage collection; defer the hold release while views live."""
        if getattr(self, "_closed", True):
            return
        try:
            self.close()
        except BufferError:  # ViewsStillAlive; a builtin name works even at shutdown
            # Arrays of the region are alive: keep the hold until the data mapping
            # itself is freed with the last of them.
            weakref.finalize(self._data_mm, self._attachment.close_quietly)
        except Exception:  # noqa: BLE001 - __del__ must not raise
            pass

    def __repr__(self):
        """Return a short description (id, size, mode, backend, state)."""
        state = "closed" if self._closed else ("held" if self.held else "unheld")
        return (f"<snakepit_shm.Region {self.region_id} size={self.size} "
                f"mode={self._mode!r} backend={self.backend} {state}>")

    # ---- helpers ----

    def _check_open(self):
        if self._closed:
            raise ValueError(f"region {self.region_id} is closed; attach it again")

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
        return self._header.metadata.get(name)

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
        with _native.buffer_address(self._attachment.header_mm) as (header, _), \
                _native.buffer_address(self._data_mm) as (data, data_len):
            lib.decrypt(header, data + self._view_offset, data_len - self._view_offset,
                        key, offset, out_address, length)

    def _encrypt(self, offset, source_address, length):
        key = self._key()
        if length == 0:
            return
        lib = _native.library()
        with _native.buffer_address(self._attachment.header_mm) as (header, _), \
                _native.buffer_address(self._data_mm, writable=True) as (data, data_len):
            lib.encrypt(header, data + self._view_offset, data_len - self._view_offset,
                        key, offset, source_address, length)

    def _touch(self):
        if self._attachment.writable:
            touch(self._attachment.header_mm)


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


def _normalize_shape(shape):
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") \
            from None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"shape must hold non-negative ints, got {shape!r}")
    return shape
