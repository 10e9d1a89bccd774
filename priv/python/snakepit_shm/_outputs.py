"""Worker outputs: regions a worker creates and hands back for ``adopt_region/2``.

A tool that only learns the size of its result while computing allocates the output
itself, fills it and returns ``region.ref`` (or ``region.zero_copy_ref()``); Elixir's
``Snakepit.SharedMemory.adopt_region/2`` then takes the region over.

Until then the worker owns it.  A memfd region (the default) lives as long as some
process has one of its descriptors open, and it is reached by other processes through
``/proc/<worker pid>/fd/<n>``: so this module keeps the two descriptors open after the
Region object is closed or garbage collected, until the VM marks the region adopted
(or deallocates it), ``discard()`` is called, or ``keep_seconds`` pass (600 s by default:
an output given up unadopted then is freed, with an ``UnadoptedOutputWarning``).  A
background daemon thread looks at the header's state every 50 ms while outputs are
pending.  A worker that exits normally with outputs pending (``atexit``) waits for their
adoption, at most ``SNAKEPIT_SHM_EXIT_GRACE`` seconds (5).  If the worker dies before
adoption, the kernel closes its descriptors and the memory is
gone: nothing is left behind.  A POSIX region (``backend="posix"``) is a file in
/dev/shm ($SNAKEPIT_SHM_PATH if set) whose creator is the worker: given up
(``discard()``, ``keep_seconds``) its name is removed; if the worker dies before
adoption, the VMs running on the host remove it at once (the worker is connected to
their presence sockets: ``_presence``), else the next VM start's orphan sweep does.
"""

import atexit
import errno
import json
import math
import mmap
import operator
import os
import threading
import time
import warnings

from . import _format as F
from . import _native
from . import _presence
from ._locate import shm_dir
from .errors import SnakepitShmError, UnadoptedOutputWarning
from .region import state_bits

__all__ = ["allocate", "from_array", "discard", "pending_outputs"]

DEFAULT_KEEP_SECONDS = 600.0
_POLL_SECONDS = 0.05
# How long a worker that exits (normally: atexit) with outputs pending waits for their
# adoption; SNAKEPIT_SHM_EXIT_GRACE (seconds, 0: no wait) overrides it.
DEFAULT_EXIT_GRACE = 5.0
_BACKENDS = {"memfd": F.BACKEND_MEMFD, "posix": F.BACKEND_POSIX}
_FORMATS = ("numpy", "arrow", "raw")
# The dtypes the VM knows (Snakepit.SharedMemory.Dtype), with their item sizes.
_SIZES = {"bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "float16": 2,
          "int32": 4, "uint32": 4, "float32": 4, "int64": 8, "uint64": 8,
          "float64": 8, "complex64": 8, "complex128": 16}

_lock = threading.Lock()
_pending = {}
_reaper = None


class _Pending:
    """An unadopted output: the descriptors that keep a memfd output alive, or the
    name of a POSIX one (removed if the worker gives it up unadopted)."""

    def __init__(self, region_id, control_fd, data_fd, deadline, posix_path=None,
                 keep_seconds=None):
        self.region_id = region_id
        self.keep_seconds = keep_seconds
        self.fds = [fd for fd in (control_fd, data_fd) if fd >= 0]
        self.header_mm = mmap.mmap(self.fds[0], F.HEADER_SIZE, access=mmap.ACCESS_READ)
        self.deadline = deadline
        self.posix_path = posix_path

    def finished(self, now):
        state = state_bits(self.header_mm)
        return bool(state & (F.STATE_ADOPTED | F.STATE_DEALLOCATED)) or now > self.deadline

    def _give_up(self):
        """Claims the output as given up, unless a VM adopted it first: one
        compare-and-swap in the header (spshm_give_up_output), so that an adoption racing
        this give-up (discard(), keep_seconds, exit) either wins, and the worker leaves
        the output alone, or fails with :deallocated. (Deciding from a read of the state
        let a VM adopt a POSIX output between that read and the unlink: it held a region
        no other process could open by name any more, while the worker warned that the
        result was lost.) True if given up."""
        fd = None
        try:
            if self.posix_path:
                # The held open is read-only: the name, checked to be the same object.
                fd = os.open(self.posix_path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
                             | os.O_NONBLOCK)
                named, held = os.fstat(fd), os.fstat(self.fds[0])
                if (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
                    return False
            mm = mmap.mmap(fd if fd is not None else self.fds[0], F.HEADER_SIZE,
                           access=mmap.ACCESS_WRITE)
        except (OSError, ValueError):
            # Not writable here (or the name is gone): decide from the state, as before.
            return not state_bits(self.header_mm) & (F.STATE_ADOPTED | F.STATE_DEALLOCATED)
        finally:
            if fd is not None:
                os.close(fd)
        try:
            with _native.buffer_address(mm, writable=True) as (address, _):
                return _native.library().give_up_output(address)
        finally:
            mm.close()

    def close(self, give_up=True):
        """Closes the descriptors; True if the output was given up unadopted (a forked
        child's copy: ``give_up=False``, its parent's output is not touched)."""
        unadopted = give_up and self._give_up()
        if self.posix_path and unadopted:
            # Given up before any VM took it: a POSIX name would outlive the worker.
            _unlink_quietly(self.posix_path)
        self.header_mm.close()
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        return unadopted


def allocate(size, dtype=None, shape=None, metadata=None, *, backend="memfd",
             timeout=None, keep_seconds=DEFAULT_KEEP_SECONDS):
    """Create a region owned by this worker, attached read-write; return the Region.

    ``dtype`` (a numpy dtype or its name) and ``shape`` describe the contents: they go
    into the ref and the header's metadata (with ``format``: "numpy" when a dtype is
    given, else "raw"; pass ``metadata={"format": "arrow"}`` for Arrow buffers), and are
    checked against ``size``.  ``timeout`` (seconds) is the idle timeout the VM applies
    after adoption unless it gives its own.  Hand ``region.ref`` back to Elixir, which
    adopts it with ``adopt_region/2``; the ``with`` block or ``close()`` of the Region
    does not free the output (see the module docs).
    """
    given, size = size, _integer(size)
    if size is None or size <= 0:
        raise ValueError(f"size must be a positive int number of bytes, got {given!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be 'memfd' or 'posix', got {backend!r}")
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict (a JSON object), got {type(metadata).__name__}")
    meta = dict(metadata or {})
    dtype_name, itemsize = _dtype(dtype if dtype is not None else meta.get("dtype"))
    shape = _shape(shape if shape is not None else meta.get("shape"))
    _check_fits(size, dtype_name, itemsize, shape)
    if dtype_name is not None:
        meta["dtype"] = dtype_name
    if shape is not None:
        meta["shape"] = list(shape)
    meta.setdefault("format", "numpy" if dtype_name else "raw")
    if meta["format"] not in _FORMATS:
        raise ValueError(f"metadata format must be one of {_FORMATS}, got {meta['format']!r}")
    text = _metadata_json(meta)
    if len(text.encode()) > F.METADATA_CAPACITY:
        raise ValueError(f"metadata encodes to {len(text.encode())} bytes of JSON, the "
                         f"header holds {F.METADATA_CAPACITY}: keep it small")
    idle_ns = 0 if timeout is None else int(_seconds("timeout", timeout, 1.8e10) * 1e9)
    if keep_seconds != math.inf:  # inf: until adopted or discarded
        _seconds("keep_seconds", keep_seconds, math.inf)
    lib = _native.library()
    if backend == "posix":
        # Before the file exists: the VMs must learn of this worker's death (SIGKILL
        # included) to sweep an output it leaves unadopted (_presence).
        _presence.join(shm_dir())
    try:
        region_id, control_fd, data_fd = lib.create(size, _BACKENDS[backend], text, idle_ns)
    except (OSError, SnakepitShmError) as exc:
        _raise_with_pending_hint(exc)
        raise
    ref = {"v": 1, "region_id": region_id, "backend": backend, "size": size,
           "sealed": False, "encrypted": False, "dtype": dtype_name,
           "shape": list(shape) if shape is not None else None,
           "format": meta["format"], "owner": "python", "metadata": meta,
           "creator_pid": os.getpid()}
    deadline = time.monotonic() + keep_seconds
    if backend == "memfd":
        pid = os.getpid()
        ref["control_path"] = f"/proc/{pid}/fd/{control_fd}"
        ref["data_path"] = f"/proc/{pid}/fd/{data_fd}"
        _keep(_Pending(region_id, control_fd, data_fd, deadline,
                       keep_seconds=keep_seconds))
    else:
        # Where the C library created it: $SNAKEPIT_SHM_PATH (the VM's shm_path), else
        # /dev/shm.
        path = os.path.join(shm_dir(), region_id)
        fd = control_fd
        try:
            if fd < 0:  # a library older than the one that hands its held open over
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
                _hold_name(lib, fd, path, region_id)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            _unlink_quietly(path)
            raise
        _keep(_Pending(region_id, fd, -1, deadline, posix_path=path,
                       keep_seconds=keep_seconds))
    # Imported here: _attach imports the region module too.
    from ._attach import attach
    try:
        region = attach(ref, mode="rw")
    except BaseException as exc:
        discard(region_id)
        _raise_with_pending_hint(exc)
        raise
    region._output_ref = ref
    return region


def _raise_with_pending_hint(exc):
    """Out of descriptors with outputs pending: say that each holds two until adopted
    (a worker making outputs faster than the VM adopts them runs out; the generic advice
    "close regions and files it no longer uses" named nothing it could close)."""
    out_of_fds = getattr(exc, "errno", None) in (errno.EMFILE, errno.ENFILE) \
        or "Too many open files" in str(exc)
    with _lock:
        pending = len(_pending)
    if out_of_fds and pending and isinstance(exc, (OSError, SnakepitShmError)):
        raise SnakepitShmError(
            f"{exc} ({pending} unadopted outputs of this worker hold their descriptors "
            "(2 for memfd, 1 for posix) until a VM adopts them: adopt them sooner, "
            "discard() the ones given up, or lower keep_seconds)") from exc


def _hold_name(lib, fd, path, region_id):
    """Take the shared liveness lock of a pending POSIX output through the open ``fd``
    the worker keeps until adoption: orphan sweeps (of any VM, in any PID namespace, and
    ``mix snakepit.shm.cleanup``) judge a segment by that lock alone, so without it a
    live worker's output was removed once its Region was closed, before the VM adopted
    it. Only for a library whose create does not hand over its held open (the current
    one does: no sweep can take the name in between): if a sweep took the name, say so
    now rather than hand back a ref that names nothing."""
    lib.liveness_lock(fd)
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        named = None
    held = os.fstat(fd)
    if named is None or (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
        raise OSError(f"output {region_id} was removed by an orphan sweep while it was "
                      "being created; allocate it again")


def from_array(array, metadata=None, *, backend="memfd", timeout=None,
               keep_seconds=DEFAULT_KEEP_SECONDS):
    """Copy a numpy array into a new worker-owned region; return the Region.

    The region has the array's dtype and shape (C order); hand ``region.ref`` back.
    """
    import numpy
    array = numpy.asarray(array)
    region = allocate(max(1, array.nbytes), array.dtype, array.shape, metadata,
                      backend=backend, timeout=timeout, keep_seconds=keep_seconds)
    if array.nbytes:
        try:
            # Straight into the region, whatever the strides (no contiguous temporary).
            target = region.ndarray()
            numpy.copyto(target, array, casting="no")
            del target
        except BaseException:
            region.close()
            discard(region.region_id)
            raise
    return region


def discard(region_or_id):
    """Give up an output no VM adopted: a memfd output is freed once nothing else has
    it open, a POSIX output's name is removed. Idempotent; no effect once adopted."""
    region_id = getattr(region_or_id, "region_id", region_or_id)
    if isinstance(region_or_id, dict):
        region_id = region_or_id.get("region_id")
    with _lock:
        pending = _pending.pop(region_id, None)
    if pending is not None:
        pending.close()


def pending_outputs():
    """Ids of the outputs this worker still keeps alive, waiting for adoption."""
    with _lock:
        return sorted(_pending)


def _keep(pending):
    global _reaper
    with _lock:
        _pending[pending.region_id] = pending
        if _reaper is None or not _reaper.is_alive():
            _reaper = threading.Thread(target=_reap, name="snakepit_shm-outputs",
                                       daemon=True)
            _reaper.start()


def _reap():
    global _reaper
    while True:
        time.sleep(_POLL_SECONDS)
        now = time.monotonic()
        with _lock:
            done = [p for p in _pending.values() if p.finished(now)]
            for p in done:
                del _pending[p.region_id]
            if not _pending and not done:
                _reaper = None
                return
        for p in done:
            if p.close():
                # A result nobody adopted in time is lost: say so, else the VM's later
                # adopt_region/2 fails with :not_found and nothing tells why.
                warnings.warn(
                    f"snakepit_shm: output {p.region_id} was not adopted within "
                    f"keep_seconds={p.keep_seconds:g} and is given up (its memory freed): "
                    "adopt it sooner, or pass a larger keep_seconds= (math.inf: until "
                    "adopted or discarded)", UnadoptedOutputWarning, stacklevel=1)


def _after_fork_in_child():
    # The child inherited copies of the descriptors, not the outputs: drop its copies
    # (without removing the parent's POSIX outputs).
    global _reaper, _lock
    _lock = threading.Lock()
    for p in list(_pending.values()):
        p.posix_path = None
        p.close(give_up=False)
    _pending.clear()
    _reaper = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def _exit_grace():
    text = os.environ.get("SNAKEPIT_SHM_EXIT_GRACE")
    if text is None:
        return DEFAULT_EXIT_GRACE
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        warnings.warn(f"snakepit_shm: SNAKEPIT_SHM_EXIT_GRACE={text!r} is not a number of "
                      f"seconds >= 0; using {DEFAULT_EXIT_GRACE:g}", RuntimeWarning)
        return DEFAULT_EXIT_GRACE
    return value


def _at_exit():
    """A worker that exits with outputs pending (it returned a ref and its process ends:
    a recycled pool worker, a one-shot script) took them with it, often before the VM
    had read the reply and adopted them: the result was lost. Wait a little for the
    adoptions (at most SNAKEPIT_SHM_EXIT_GRACE seconds, 5 by default), then say which
    outputs are lost."""
    with _lock:
        if not _pending:
            return
    deadline = time.monotonic() + _exit_grace()
    while True:
        now = time.monotonic()
        with _lock:
            done = [p for p in _pending.values()
                    if state_bits(p.header_mm) & (F.STATE_ADOPTED | F.STATE_DEALLOCATED)]
            for p in done:
                del _pending[p.region_id]
            left = list(_pending.values()) if now >= deadline else None
            if left is not None:
                _pending.clear()
        for p in done:
            p.close()
        if left is not None:
            break
        with _lock:
            if not _pending:
                return
        time.sleep(_POLL_SECONDS)
    for p in left:
        if p.close():
            warnings.warn(f"snakepit_shm: output {p.region_id} was not adopted before this "
                          "worker exited and is lost: let the VM adopt its ref before the "
                          "worker exits (SNAKEPIT_SHM_EXIT_GRACE: seconds an exiting "
                          "worker waits for that)", UnadoptedOutputWarning, stacklevel=1)


atexit.register(_at_exit)


def _dtype(dtype):
    if dtype is None:
        return None, 1
    try:
        import numpy
    except ImportError:
        numpy = None
    if numpy is not None:
        try:
            dt = numpy.dtype(dtype)
        except TypeError as exc:
            raise ValueError(f"{dtype!r} is not a numpy dtype: {exc}") from None
        if dt.fields is not None or dt.subdtype is not None or dt.hasobject \
                or dt.byteorder == ">" or dt.kind not in "biufc":
            raise ValueError(f"dtype {dt} cannot be shared: use a plain little-endian "
                             "numeric or bool dtype")
        if dt.name not in _SIZES:
            # float128/complex256 (numpy.longdouble): the platform's padded x87 format,
            # which the VM (export_ref/2, to_nx/1) and Nx do not know.
            raise ValueError(f"dtype {dt.name} cannot be shared: the VM knows "
                             f"{', '.join(sorted(_SIZES))}; convert it first, e.g. "
                             "array.astype('float64')")
        return dt.name, dt.itemsize
    sizes = _SIZES
    if dtype not in sizes:
        raise ValueError(f"{dtype!r} is not a dtype name this client knows without "
                         f"numpy: use one of {sorted(sizes)}")
    return dtype, sizes[dtype]


def _metadata_json(meta):
    """The header's JSON text of ``meta``, refused where the VM would read something else.

    allow_nan=False: NaN/Infinity are not JSON. A lone surrogate (a file name decoded
    with surrogateescape, os.listdir of a non-UTF-8 name) became a "\\udcxx" escape the
    VM's JSON decoder rejects: the adopted output lost all its metadata (dtype and shape
    included) without a word, and a ref holding it failed to decode at all. Keys that
    collide once JSON makes them strings ({1: ..., "1": ...}) were written twice: the VM
    kept the first value, Python's json the last."""
    try:
        text = json.dumps(meta, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-encodable: {exc}") from None
    try:
        json.dumps(meta, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start:exc.end]
        raise ValueError(f"metadata holds a string that is not valid Unicode text ({bad!r}, "
                         "a lone surrogate: e.g. a file name decoded with surrogateescape); "
                         "the VM could not read it: pass "
                         "os.fsencode(name).decode('utf-8', 'replace') or drop it") from None

    def pairs(items):
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"metadata has two keys that are both {dup!r} in JSON (JSON "
                             "keys are strings: 1 and \"1\" collide): rename one")
        return dict(items)

    json.loads(text, object_pairs_hook=pairs)
    return text


def _seconds(name, value, limit):
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and 0 < value < limit)
    if not ok:
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return value


def _integer(value):
    """``value`` as a Python int if it is an integer (numpy's too, not bool), else None."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _shape(shape):
    if shape is None:
        return None
    if _integer(shape) is not None:
        shape = (shape,)
    shape = tuple(shape)
    dims = tuple(_integer(d) for d in shape)
    if not all(d is not None and d >= 0 for d in dims):
        raise ValueError(f"shape must hold non-negative ints, got {shape!r}")
    shape = dims
    if len(shape) > 64:
        raise ValueError(f"shape has {len(shape)} dimensions; numpy arrays have at most 64")
    if any(d >= 2 ** 63 for d in shape):
        # numpy's dimensions are signed 64-bit: such an array could never be made.
        raise ValueError(f"shape {shape!r} has a dimension of 2**63 or more")
    return shape


def _check_fits(size, dtype_name, itemsize, shape):
    if shape is not None:
        needed = math.prod(shape) * itemsize
        if needed > size:
            raise ValueError(f"shape {shape} of {dtype_name or 'uint8'} needs {needed} "
                             f"bytes, the region has {size}")
    elif size % itemsize:
        raise ValueError(f"{size} bytes are not a whole number of {dtype_name} items: "
                         "pass shape=")


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass
