"""ctypes binding of the C ABI library ``libsnakepit_shm.so`` (``c_src/capi``).

The client maps segments itself with :mod:`mmap`; it calls the library only for what
Python cannot do safely: atomic updates of the header's holder table and refcount, and
XChaCha20-Poly1305 decryption/encryption of encrypted regions.

The library is found through the environment variable ``SNAKEPIT_SHM_LIB``, next to
this package, or at ``priv/libsnakepit_shm.so`` (two directories above this package).  It is
loaded on first use and cached.
"""

import contextlib
import ctypes
import json
import os
import threading

from . import errors

ABI_VERSION = 2
_ERR_LEN = 512

# SPSHM_E_* codes of c_src/capi/snakepit_shm.h.
E_INVALID_ARGUMENT = -1
E_NOT_FOUND = -2
E_NO_SPACE = -5
E_TOO_LARGE = -6
E_PERMISSION_DENIED = -4
E_CORRUPT = -7
E_UNSUPPORTED_VERSION = -8
E_NOT_OURS = -9
E_SEALED = -10
E_EXPIRED = -12
E_DEALLOCATED = -13
E_OUT_OF_BOUNDS = -15
E_TAMPERED = -16
E_IO_ERROR = -20

_ERROR_CLASSES = {
    E_INVALID_ARGUMENT: ValueError,
    E_OUT_OF_BOUNDS: ValueError,
    E_NOT_FOUND: errors.RegionNotFound,
    E_DEALLOCATED: errors.RegionNotFound,
    E_PERMISSION_DENIED: errors.PermissionError,
    E_SEALED: errors.PermissionError,
    E_CORRUPT: errors.CorruptRegion,
    E_UNSUPPORTED_VERSION: errors.CorruptRegion,
    E_NOT_OURS: errors.CorruptRegion,
    E_TAMPERED: errors.CorruptRegion,
    E_EXPIRED: errors.RegionExpired,
    E_NO_SPACE: MemoryError,
    E_TOO_LARGE: ValueError,
}

_lock = threading.Lock()
_library = None


def library_path():
    """Return the path the C ABI library is loaded from.

    In order: ``SNAKEPIT_SHM_LIB``; ``libsnakepit_shm.so`` next to this package (an
    installed copy); ``priv/libsnakepit_shm.so`` of the source tree this package sits
    in.  The last one is returned (for the error message) when none exists.
    """
    configured = os.environ.get("SNAKEPIT_SHM_LIB")
    if configured:
        return configured
    here = os.path.dirname(os.path.abspath(__file__))
    beside = os.path.join(here, "libsnakepit_shm.so")
    if os.path.exists(beside):
        return beside
    return os.path.normpath(os.path.join(here, "..", "..", "libsnakepit_shm.so"))


def library():
    """Return the loaded library (a :class:`Library`), loading it on first use."""
    global _library
    with _lock:
        if _library is None:
            _library = Library(library_path())
        return _library


def available():
    """Return True if the C ABI library can be loaded."""
    try:
        library()
    except errors.LibraryNotFound:
        return False
    return True


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (stable ABI since 3.11); only ``buf`` is read."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_void_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_PyObject_GetBuffer = ctypes.pythonapi.PyObject_GetBuffer
_PyObject_GetBuffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer),
                                ctypes.c_int]
_PyObject_GetBuffer.restype = ctypes.c_int
_PyBuffer_Release = ctypes.pythonapi.PyBuffer_Release
_PyBuffer_Release.argtypes = [ctypes.POINTER(_PyBuffer)]
_PyBuffer_Release.restype = None
_PYBUF_SIMPLE = 0
_PYBUF_WRITABLE = 1


@contextlib.contextmanager
def buffer_address(obj, writable=False):
    """Yield the address of ``obj``'s buffer (an mmap), exported only meanwhile.

    Works for read-only buffers too (``ctypes.c_char.from_buffer`` does not).  While
    the block runs the buffer is exported, so a concurrent ``mmap.close()`` fails with
    BufferError instead of unmapping memory the library is using.
    """
    view = _PyBuffer()
    _PyObject_GetBuffer(obj, ctypes.byref(view),
                        _PYBUF_WRITABLE if writable else _PYBUF_SIMPLE)
    try:
        yield view.buf, view.len
    finally:
        _PyBuffer_Release(ctypes.byref(view))


def address_of(obj, writable=False):
    """Return the address of ``obj``'s buffer (an mmap) without keeping it exported.

    The address of an mmap never changes while it is open; the caller must make sure
    it is not closed while the address is in use (Attachment does, under its lock).
    """
    view = _PyBuffer()
    _PyObject_GetBuffer(obj, ctypes.byref(view),
                        _PYBUF_WRITABLE if writable else _PYBUF_SIMPLE)
    address = view.buf
    _PyBuffer_Release(ctypes.byref(view))
    return address


_errors = threading.local()


def _err_buffer():
    """A per-thread buffer for the library's error messages (cleared before use)."""
    buf = getattr(_errors, "buf", None)
    if buf is None:
        buf = _errors.buf = ctypes.create_string_buffer(_ERR_LEN)
    else:
        buf[0] = 0
    return buf


class Library:
    """The functions of ``snakepit_shm.h``, with errors turned into exceptions."""

    def __init__(self, path):
        """Load the library at ``path`` and declare its function signatures."""
        if not os.path.exists(path):
            raise errors.LibraryNotFound(
                f"the snakepit_shm C library is missing: {path} does not exist. "
                "Build it with `mix compile` (or `make build`) in the project root, "
                "and point SNAKEPIT_SHM_LIB at priv/libsnakepit_shm.so (Elixir: "
                "Snakepit.SharedMemory.python_env/0 gives the worker environment).")
        try:
            self._dll = ctypes.CDLL(path)
        except OSError as exc:
            raise errors.LibraryNotFound(
                f"cannot load the snakepit_shm C library {path}: {exc}. Rebuild it with "
                "`mix compile`; is libsodium installed (apt-get install libsodium23)?"
            ) from None
        self.path = path
        self._guarded_dir = None
        self._declare()
        version = self._dll.spshm_abi_version()
        if version != ABI_VERSION:
            raise errors.LibraryNotFound(
                f"{path} has C ABI version {version}, this package needs "
                f"{ABI_VERSION}: rebuild the library (`mix compile`) from the same "
                "checkout as this Python package.")

    def _declare(self):
        c = ctypes
        sig = {
            "spshm_abi_version": ([], c.c_int),
            "spshm_header_layout": ([c.c_char_p, c.c_size_t], c.c_size_t),
            "spshm_validate_header": ([c.c_void_p, c.c_uint64, c.c_char_p, c.c_size_t],
                                      c.c_int),
            "spshm_hold": ([c.c_void_p, c.c_uint32, c.c_uint64, c.c_int, c.c_char_p,
                            c.c_size_t], c.c_int),
            "spshm_release": ([c.c_void_p, c.c_uint32, c.c_uint64, c.c_char_p,
                               c.c_size_t], c.c_int),
            "spshm_liveness_lock": ([c.c_int, c.c_char_p, c.c_size_t], c.c_int),
            "spshm_clear_stale_sealing": ([c.c_void_p, c.c_int, c.c_uint64, c.c_char_p,
                                           c.c_size_t], c.c_int),
            "spshm_hold_fd": ([c.c_void_p, c.c_int, c.POINTER(c.c_int), c.c_uint32,
                               c.c_uint64, c.c_int, c.c_char_p, c.c_size_t], c.c_int),
            "spshm_release_fd": ([c.c_void_p, c.c_int, c.POINTER(c.c_int), c.c_char_p,
                                  c.c_size_t], c.c_int),
            "spshm_attach_memfd": ([c.c_char_p, c.c_char_p, c.c_char_p, c.c_char_p, c.c_int,
                                    c.c_void_p, c.POINTER(c.c_int),
                                    c.POINTER(c.c_uint64), c.POINTER(c.c_int),
                                    c.POINTER(c.c_uint64), c.c_char_p, c.c_size_t], c.c_int),
            "spshm_lock_data": ([c.c_int, c.c_char_p, c.c_size_t], c.c_int),
            "spshm_release_fd_closing": ([c.c_void_p, c.c_int, c.c_uint64,
                                          c.POINTER(c.c_int), c.c_char_p, c.c_size_t],
                                         c.c_int),
            "spshm_liveness_lock_at": ([c.c_int, c.c_uint64, c.c_char_p, c.c_size_t],
                                       c.c_int),
            "spshm_hold_fd_at": ([c.c_void_p, c.c_int, c.c_uint64, c.POINTER(c.c_int),
                                  c.c_uint32, c.c_uint64, c.c_int, c.c_char_p,
                                  c.c_size_t], c.c_int),
            "spshm_release_fd_at": ([c.c_void_p, c.c_int, c.c_uint64, c.POINTER(c.c_int),
                                     c.c_char_p, c.c_size_t], c.c_int),
            "spshm_attach_arena": ([c.c_char_p, c.c_uint64, c.c_char_p, c.c_void_p,
                                    c.POINTER(c.c_int), c.POINTER(c.c_uint64), c.c_char_p,
                                    c.c_size_t], c.c_int),
            "spshm_install_fault_guard": ([c.c_char_p, c.c_char_p, c.c_size_t], c.c_int),
            "spshm_process_start_time": ([c.c_uint32, c.POINTER(c.c_uint64),
                                          c.c_char_p, c.c_size_t], c.c_int),
            "spshm_decrypt": ([c.c_void_p, c.c_void_p, c.c_uint64, c.c_char_p,
                               c.c_uint64, c.c_void_p, c.c_uint64, c.c_char_p,
                               c.c_size_t], c.c_int),
            "spshm_encrypt": ([c.c_void_p, c.c_void_p, c.c_uint64, c.c_char_p,
                               c.c_uint64, c.c_void_p, c.c_uint64, c.c_char_p,
                               c.c_size_t], c.c_int),
            "spshm_create": ([c.c_uint64, c.c_int, c.c_char_p, c.c_uint64, c.c_char_p,
                              c.POINTER(c.c_int), c.POINTER(c.c_int), c.c_char_p,
                              c.c_size_t], c.c_int),
            "spshm_give_up_output": ([c.c_void_p, c.c_char_p, c.c_size_t], c.c_int),
        }
        for name, (argtypes, restype) in sig.items():
            try:
                function = getattr(self._dll, name)
            except AttributeError:
                raise errors.LibraryNotFound(
                    f"{self.path} does not export {name}(): it is out of date, rebuild "
                    "it with `mix compile`.") from None
            function.argtypes = argtypes
            function.restype = restype

    @staticmethod
    def _check(code, err, what):
        if code == 0:
            return
        message = err.value.decode("utf-8", "replace") or f"error code {code}"
        cls = _ERROR_CLASSES.get(code, errors.SnakepitShmError)
        exc = cls(f"{what}: {message}")
        exc.code = code  # the SPSHM_E_* code, for callers that translate it
        raise exc

    def header_layout(self):
        """Return the layout description of format.hpp as a dict."""
        needed = self._dll.spshm_header_layout(None, 0)
        buf = ctypes.create_string_buffer(needed + 1)
        self._dll.spshm_header_layout(buf, needed + 1)
        return json.loads(buf.value.decode("utf-8"))

    def validate_header(self, header_address, data_object_size):
        """Validate a mapped header with the core's own checks."""
        err = _err_buffer()
        code = self._dll.spshm_validate_header(header_address, data_object_size,
                                               err, _ERR_LEN)
        self._check(code, err, "the header failed validation")

    def hold(self, header_address, pid, start_time, writable):
        """Add one hold of (pid, start_time) to the mapped header."""
        err = ctypes.create_string_buffer(_ERR_LEN)
        code = self._dll.spshm_hold(header_address, pid, start_time,
                                    1 if writable else 0, err, _ERR_LEN)
        self._check(code, err, "cannot register this process as a holder")

    def give_up_output(self, header_address):
        """True if this worker gave its unadopted output up (the deallocated bit, set in
        one compare-and-swap), False if a VM adopted it (or it was deallocated) first."""
        err = ctypes.create_string_buffer(_ERR_LEN)
        code = self._dll.spshm_give_up_output(header_address, err, _ERR_LEN)
        if code < 0:
            self._check(code, err, "cannot give the output up")
        return code == 1

    def release(self, header_address, pid, start_time):
        """Remove one hold of (pid, start_time) from the mapped header."""
        err = ctypes.create_string_buffer(_ERR_LEN)
        code = self._dll.spshm_release(header_address, pid, start_time, err, _ERR_LEN)
        self._check(code, err, "cannot release this process's hold")

    def liveness_lock(self, fd, base=0):
        """Take the shared liveness lock on the control object open as ``fd``
        (``base``: an arena region's control block offset, docs/FORMAT.md "Arenas")."""
        err = _err_buffer()
        if base:
            code = self._dll.spshm_liveness_lock_at(fd, base, err, _ERR_LEN)
        else:
            code = self._dll.spshm_liveness_lock(fd, err, _ERR_LEN)
        self._check(code, err, "cannot take the liveness lock of the region")

    def hold_fd(self, header_address, fd, slot, pid, start_time, writable, base=0):
        """Add one hold through the open ``fd``; ``slot`` is its c_int slot index."""
        err = _err_buffer()
        if base:
            code = self._dll.spshm_hold_fd_at(header_address, fd, base, ctypes.byref(slot),
                                              pid, start_time, 1 if writable else 0, err,
                                              _ERR_LEN)
        else:
            code = self._dll.spshm_hold_fd(header_address, fd, ctypes.byref(slot), pid,
                                           start_time, 1 if writable else 0, err, _ERR_LEN)
        self._check(code, err, "cannot register this process as a holder")

    def release_fd(self, header_address, fd, slot, base=0):
        """Remove one hold of the slot owned by the open ``fd``."""
        err = _err_buffer()
        if base:
            code = self._dll.spshm_release_fd_at(header_address, fd, base,
                                                 ctypes.byref(slot), err, _ERR_LEN)
        else:
            code = self._dll.spshm_release_fd(header_address, fd, ctypes.byref(slot), err,
                                              _ERR_LEN)
        self._check(code, err, "cannot release this process's hold")

    def clear_stale_sealing(self, header_address, fd, base=0):
        """Clear the header's sealing bit if the sealer that set it is dead (nobody
        holds the seal lock, docs/FORMAT.md "Locks"), through the read-write open
        ``fd``. True if the bit is clear on return, False while a live sealer holds it."""
        err = _err_buffer()
        return self._dll.spshm_clear_stale_sealing(header_address, fd, base, err,
                                                   _ERR_LEN) == 0

    def lock_data(self, fd):
        """Take the shared lock of byte 0 of a data memfd open as ``fd`` (the core's
        own, retried while the creator's warm pool holds the object): E_DEALLOCATED
        (RegionNotFound) when the object went back to the pool."""
        err = _err_buffer()
        code = self._dll.spshm_lock_data(fd, err, _ERR_LEN)
        self._check(code, err, "cannot lock the data memfd")

    def release_fd_closing(self, header_address, fd, slot, base=0):
        """release_fd before closing ``fd``: the slot's lock goes with the close, which
        the caller makes right after (one lock system call fewer)."""
        err = _err_buffer()
        code = self._dll.spshm_release_fd_closing(header_address, fd, base,
                                                  ctypes.byref(slot), err, _ERR_LEN)
        self._check(code, err, "cannot release this process's hold")

    def attach_memfd(self, control_path, control_link, data_path, data_link,
                     data_writable):
        """The fast open of a memfd region (capi_attach.cpp): returns (control_fd,
        control_size, data_fd, data_size, header copy), None when anything was
        refused (the caller then redoes it step by step to say why), or the code
        E_DEALLOCATED when the data memfd went back to its creator's warm pool (the
        region is gone: nothing more to try)."""
        header = ctypes.create_string_buffer(4096)
        control_fd, data_fd = ctypes.c_int(-1), ctypes.c_int(-1)
        control_size, data_size = ctypes.c_uint64(), ctypes.c_uint64()
        code = self._dll.spshm_attach_memfd(
            control_path.encode(), control_link.encode(), data_path.encode(),
            data_link.encode(), 1 if data_writable else 0, header, ctypes.byref(control_fd),
            ctypes.byref(control_size), ctypes.byref(data_fd), ctypes.byref(data_size),
            None, 0)
        if code != 0:
            return E_DEALLOCATED if code == E_DEALLOCATED else None
        return (control_fd.value, control_size.value, data_fd.value, data_size.value,
                header.raw)

    def attach_arena(self, path, base, region_id):
        """The fast open of an arena region (capi_attach.cpp): returns (fd, size,
        header copy) once the chunk at ``base`` holds ``region_id`` and validates, or
        None when anything was refused (the caller then locates and opens it step by
        step, which says why)."""
        header = ctypes.create_string_buffer(4096)
        fd, size = ctypes.c_int(-1), ctypes.c_uint64()
        code = self._dll.spshm_attach_arena(path.encode(), base, region_id.encode(), header,
                                            ctypes.byref(fd), ctypes.byref(size), None, 0)
        if code != 0:
            return None
        return fd.value, size.value, header.raw

    def guard_faults(self, segment_dir):
        """Installs the core's SIGBUS handler (once) for segments in ``segment_dir``: a
        page of a POSIX segment a peer truncated under this process reads as zeros
        instead of killing it (Region checks the file's size after each copy)."""
        if self._guarded_dir == segment_dir:
            return
        err = _err_buffer()
        code = self._dll.spshm_install_fault_guard(os.fsencode(segment_dir), err, _ERR_LEN)
        self._check(code, err, "cannot install the SIGBUS guard")
        self._guarded_dir = segment_dir

    def process_start_time(self, pid):
        """Return the start time (clock ticks since boot) of process ``pid``."""
        err = ctypes.create_string_buffer(_ERR_LEN)
        out = ctypes.c_uint64()
        code = self._dll.spshm_process_start_time(pid, ctypes.byref(out), err, _ERR_LEN)
        self._check(code, err, f"cannot read the start time of process {pid}")
        return out.value

    def decrypt(self, header_address, data_address, data_len, key, offset, out_address,
                length):
        """Decrypt ``length`` plaintext bytes from ``offset`` into ``out_address``."""
        err = ctypes.create_string_buffer(_ERR_LEN)
        code = self._dll.spshm_decrypt(header_address, data_address, data_len, key,
                                       offset, out_address, length, err, _ERR_LEN)
        self._check(code, err, "cannot decrypt the region")

    def encrypt(self, header_address, data_address, data_len, key, offset, in_address,
                length):
        """Encrypt ``length`` bytes at ``in_address`` into the region at ``offset``."""
        err = ctypes.create_string_buffer(_ERR_LEN)
        code = self._dll.spshm_encrypt(header_address, data_address, data_len, key,
                                       offset, in_address, length, err, _ERR_LEN)
        self._check(code, err, "cannot encrypt into the region")

    def create(self, size, backend, metadata_json, idle_timeout_ns=0):
        """Create a region owned by this process with the core's own create.

        Returns (region_id, control_fd, data_fd). memfd: the two memfds. POSIX: data_fd
        is -1 and control_fd an open of the segment holding its liveness lock (-1 from
        a library older than that).
        """
        err = ctypes.create_string_buffer(_ERR_LEN)
        region_id = ctypes.create_string_buffer(64)
        control, data = ctypes.c_int(-1), ctypes.c_int(-1)
        code = self._dll.spshm_create(size, backend, metadata_json.encode("utf-8"),
                                      idle_timeout_ns, region_id, ctypes.byref(control),
                                      ctypes.byref(data), err, _ERR_LEN)
        self._check(code, err, f"cannot create a region of {size} bytes")
        return region_id.value.decode("ascii"), control.value, data.value
