"""Publishing a worker's load on a status board (``Snakepit.SharedMemory.StatusBoard``).

The Elixir side creates the board and hands each worker its ref (``export_ref/1``)::

    board = snakepit_shm.StatusBoard.join(ref, "worker-7")
    board.update(state="idle", queue=0)
    ...                                   # on every request:
    board.update(state="busy", in_flight=1, processed=n)
    board.leave()                         # or use it as a context manager

``update`` is a seqlock write into this worker's slot done by the C library: no lock,
no system call, about a microsecond from CPython.  Only the fields given change.
If the worker dies without ``leave()``, even by SIGKILL, the manager frees its slot
(it watches every process that holds a slot with a pidfd).

A slot has exactly one writer: the process that joined (``update`` holds the GIL for
its C call, so threads of the worker never write the slot at once).  After
``os.fork()`` the child's copies of the parent's boards refuse ``update`` (and their
``leave`` frees nothing): the child joins a slot of its own.
Joining maps the board's segment without registering a hold on the region (so any
number of processes may join, not only the 64 of a region's holder table); the board
lives as long as the Elixir side keeps it.
"""

import ctypes
import mmap
import os
import stat
import struct
import threading
import weakref

from . import _board_format as BF
from . import _format as F
from . import _announce, _locate, _native, _proc
from . import errors as _errors

_VALUES = struct.Struct("<6Q4q")  # state, queue, in_flight, memory, processed, errors, gauges
_FIELDS = ("state", "queue", "in_flight", "memory", "processed", "errors")
_U64_MAX = (1 << 64) - 1
_declared = {}
_declare_lock = threading.Lock()
_joined = weakref.WeakSet()  # StatusBoards of this process with a slot


def _forget_slots_in_child():
    # A forked child inherits the parent's StatusBoard objects but not its slots: two
    # writers of one seqlock slot can publish torn entries, and the child's leave() (a
    # ``with`` block unwinding in the child) would free the parent's slot.
    # Its copy of the lock descriptor is closed too: the slot's liveness lock belongs to
    # the open both share, and the child must not keep the parent's slot alive.
    for board in list(_joined):
        board._closed = True
        board._forked = True
        board._close_lock_fd()
    _joined.clear()


os.register_at_fork(after_in_child=_forget_slots_in_child)


class BoardFull(_errors.SnakepitShmError):
    """Every slot of the status board is taken."""


def _functions(library):
    """The board functions of the C library, with their signatures declared once."""
    with _declare_lock:
        functions = _declared.get(library.path)
        if functions is None:
            c = ctypes
            dll = library._dll
            sig = {
                "spshm_board_layout": ([c.c_char_p, c.c_size_t], c.c_size_t),
                "spshm_board_join": ([c.c_void_p, c.c_uint64, c.c_char_p, c.c_size_t,
                                      c.c_uint32, c.c_uint64, c.POINTER(c.c_uint32),
                                      c.POINTER(c.c_uint64), c.POINTER(c.c_uint32),
                                      c.c_char_p, c.c_size_t], c.c_int),
                "spshm_board_join_locked": ([c.c_int, c.c_void_p, c.c_uint64, c.c_char_p,
                                             c.c_size_t, c.c_uint32, c.c_uint64,
                                             c.POINTER(c.c_uint32), c.POINTER(c.c_uint64),
                                             c.POINTER(c.c_uint32), c.c_char_p, c.c_size_t],
                                            c.c_int),
                "spshm_board_update": ([c.c_void_p, c.c_uint64, c.c_void_p], c.c_int),
                "spshm_board_leave": ([c.c_void_p, c.c_uint64, c.c_uint32, c.c_uint64,
                                       c.c_char_p, c.c_size_t], c.c_int),
            }
            functions = {}
            # update runs through PyDLL: the GIL stays held during the call, so two
            # threads of one worker can never be inside the seqlock write at once.
            pydll = ctypes.PyDLL(library.path)
            for name, (argtypes, restype) in sig.items():
                try:
                    function = getattr(pydll if name == "spshm_board_update" else dll, name)
                except AttributeError:
                    raise _errors.LibraryNotFound(
                        f"{library.path} does not export {name}(): it is out of date, "
                        "rebuild it with `mix compile`.") from None
                function.argtypes = argtypes
                function.restype = restype
                functions[name] = function
            _declared[library.path] = functions
        return functions


def board_layout():
    """Return the board layout of ``board.hpp`` (``spshm_board_layout()``) as a dict."""
    import json
    layout = _functions(_native.library())["spshm_board_layout"]
    needed = layout(None, 0)
    buf = ctypes.create_string_buffer(needed + 1)
    layout(buf, needed + 1)
    return json.loads(buf.value.decode("utf-8"))


class StatusBoard:
    """This worker's slot on a status board; obtain one with :meth:`join`."""

    def __init__(self, *, region, size, anchor, slot_address, owner, index, worker_id,
                 gauges, capacity, functions, lock_fd=-1):
        """Internal: use :meth:`StatusBoard.join`."""
        self._lock_fd = lock_fd
        self._region = region
        self._size = size
        self._anchor = anchor
        self._data_address = ctypes.addressof(anchor)
        self._slot = slot_address
        self._owner = owner
        self._index = index
        self._worker_id = worker_id
        self._gauges = {name: 6 + i for i, name in enumerate(gauges)}
        self._capacity = capacity
        self._values = [0] * 10
        self._buffer = ctypes.create_string_buffer(_VALUES.size)
        self._buffer_address = ctypes.addressof(self._buffer)
        self._pack = _VALUES.pack_into
        self._update = functions["spshm_board_update"]
        self._leave = functions["spshm_board_leave"]
        self._closed = False
        self._forked = False
        _joined.add(self)

    @classmethod
    def join(cls, ref, worker_id):
        """Join the board of ``ref`` (Elixir's ``StatusBoard.export_ref/1``) as
        ``worker_id`` (1 to 64 bytes of UTF-8): claims a free slot, state "starting".
        ``ref`` may also be that map as JSON, the board's region id or its name.

        Raises BoardFull when every slot is taken, ValueError for a bad worker id,
        RegionNotFound when the board does not exist, CorruptRegion when the segment is
        not a valid board, PermissionError when it is not ours.
        """
        try:
            wid = worker_id.encode("utf-8") if isinstance(worker_id, str) else worker_id
            if isinstance(wid, bytes):
                wid.decode("utf-8")  # Elixir's join/3 refuses ids that are no UTF-8 too
        except UnicodeError:
            wid = None
        if not isinstance(wid, bytes) or not 1 <= len(wid) <= BF.WORKER_ID_CAPACITY:
            raise ValueError(f"worker_id must be 1 to {BF.WORKER_ID_CAPACITY} bytes of "
                             f"UTF-8, got {worker_id!r}")
        info = ref.get("board") if isinstance(ref, dict) else None
        if info is not None and not isinstance(info, dict):
            raise ValueError("the ref's \"board\" must be the map of Elixir's "
                             f"StatusBoard.export_ref/1, got {info!r:.80}")
        library = _native.library()
        functions = _functions(library)
        region, size, lock_fd = _map_board(ref, library)
        try:
            anchor = (ctypes.c_char * size).from_buffer(region, F.HEADER_SIZE)
        except BaseException:
            region.close()
            os.close(lock_fd)
            raise
        try:
            pid, start_time = _proc.self_identity()
            index, owner, capacity = ctypes.c_uint32(), ctypes.c_uint64(), ctypes.c_uint32()
            err = ctypes.create_string_buffer(512)
            # The slot's liveness lock is taken through lock_fd (this join's own open
            # of the segment), held until leave() closes it or this process dies.
            code = functions["spshm_board_join_locked"](
                lock_fd, ctypes.addressof(anchor), size, wid, len(wid), pid, start_time,
                ctypes.byref(index), ctypes.byref(owner), ctypes.byref(capacity), err, 512)
            if code == -100:
                raise BoardFull(err.value.decode("utf-8", "replace"))
            library._check(code, err, "cannot join the status board")
            gauges = _gauge_names(anchor)
            if info and info.get("gauges") and list(info["gauges"]) != gauges:
                raise _errors.CorruptRegion(
                    f"the board's gauges {gauges} differ from the ref's {info['gauges']}")
        except BaseException:
            anchor = None  # the export must end before the region can close
            region.close()
            os.close(lock_fd)
            raise
        _announce_join(region)
        address = ctypes.addressof(anchor) + BF.slot_offset(index.value)
        return cls(region=region, size=size, anchor=anchor, slot_address=address,
                   owner=owner.value, lock_fd=lock_fd,
                   index=index.value, worker_id=wid.decode("utf-8", "replace"),
                   gauges=gauges, capacity=capacity.value, functions=functions)

    @property
    def index(self):
        """The slot this worker occupies."""
        return self._index

    @property
    def worker_id(self):
        """The worker id given to join()."""
        return self._worker_id

    @property
    def gauges(self):
        """Names of the board's 4 gauges."""
        return list(self._gauges)

    @property
    def capacity(self):
        """Number of slots of the board."""
        return self._capacity

    @property
    def closed(self):
        """True once leave() ran."""
        return self._closed

    @property
    def deleted(self):
        """True if the Elixir side deleted the board (updates then reach nobody)."""
        if self._closed:
            return False
        state = F.FIELD["state"][0]
        return bool(struct.unpack_from("<I", self._region, state)[0] & F.STATE_DEALLOCATED)

    def update(self, state=None, queue=None, in_flight=None, memory=None, processed=None,
               errors=None, **gauges):
        """Publish new values; fields not given keep their last value.

        ``state`` is "starting", "idle", "busy", "draining" or "shutdown"; ``queue``,
        ``in_flight``, ``memory`` (bytes), ``processed`` and ``errors`` are
        non-negative integers; gauges are given by name (signed 64-bit).
        """
        values = self._values
        if self._closed:
            raise _errors.SnakepitShmError(
                "this status board slot belongs to the parent process: a forked child "
                "joins a slot of its own (StatusBoard.join)" if self._forked else
                "this status board slot was left")
        old = values[:]
        if state is not None:
            s = BF.STATES.get(state) if isinstance(state, str) else None
            if s is None:
                raise ValueError(f"state must be one of {list(BF.STATES)}, got {state!r}")
            values[0] = s
        if queue is not None:
            values[1] = queue
        if in_flight is not None:
            values[2] = in_flight
        if memory is not None:
            values[3] = memory
        if processed is not None:
            values[4] = processed
        if errors is not None:
            values[5] = errors
        if gauges:
            for name, value in gauges.items():
                i = self._gauges.get(name)
                if i is None:
                    values[:] = old
                    raise ValueError(f"unknown field {name!r}: use {list(_FIELDS)} or a "
                                     f"gauge of this board {list(self._gauges)}")
                values[i] = value
        try:
            self._pack(self._buffer, 0, *values)
        except struct.error:
            values[:] = old
            # Name the field: struct's message ("required argument is not an integer")
            # does not say which one.
            given = dict(zip(_FIELDS[1:], (queue, in_flight, memory, processed, errors)))
            given.update(gauges)
            for name, value in given.items():
                if value is None:
                    continue
                signed = name in gauges
                low, high = (-(1 << 63), 1 << 63) if signed else (0, 1 << 64)
                if isinstance(value, bool) or not isinstance(value, int) \
                        or not low <= value < high:
                    raise ValueError(
                        f"{name} must be an integer from {low} to {high - 1}, got {value!r}"
                    ) from None
            raise
        if self._update(self._slot, self._owner, self._buffer_address) != 0:
            raise _errors.SnakepitShmError(
                "this worker's status board slot is no longer ours (the board was "
                "deleted or the slot reclaimed): join again")

    def leave(self):
        """Free the slot and detach the board. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _joined.discard(self)
        err = ctypes.create_string_buffer(512)
        self._leave(self._data_address, self._size, self._index, self._owner, err, 512)
        self._close_lock_fd()  # after the slot is free: its lock goes with the descriptor
        self._anchor = None
        self._region.close()

    def _close_lock_fd(self):
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        self.leave()

    def __repr__(self):
        state = "left" if self._closed else f"slot {self._index}"
        return f"<snakepit_shm.StatusBoard {self._worker_id!r} {state}>"


def _announce_join(region):
    """Tell the board's VM that an OS process joined (it arms a watch on it at once)."""
    try:
        fields = F.unpack_fields(region)
        region_id = fields["region_id"].rstrip(b"\0").decode()
    except (ValueError, KeyError, UnicodeError, struct.error):
        return
    _announce.announce(
        _announce.targets(fields["creator_pid"], fields["creator_start_time"]),
        _announce.PREFIX_ATTACH, region_id)


def _map_board(ref, library):
    """Map the board's POSIX segment read-write (no hold); return (mmap, data size)."""
    if isinstance(ref, str) and not ref.strip().startswith(("{", "spshm_")):
        ref = "spshm_n_" + ref.strip()  # a board's name
    location = _locate.parse_target(ref)
    if location.backend != F.BACKEND_POSIX:
        raise ValueError(f"{location.region_id} is a memfd region: status boards are "
                         "named POSIX regions (StatusBoard.create/2)")
    # A peer of our uid may truncate the segment: its pages become zeros (update()
    # then finds the slot not ours) instead of a SIGBUS that kills this worker.
    library.guard_faults(os.path.dirname(location.control_path))
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(location.control_path, flags)
    except FileNotFoundError:
        raise _errors.RegionNotFound(
            f"no status board {location.region_id} ({location.control_path}): it was "
            "deleted, its owner exited, or the name is wrong") from None
    except OSError as exc:
        raise _errors.PermissionError(
            f"cannot open the status board {location.control_path}: {exc.strerror}"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise _errors.PermissionError(
                f"{location.control_path} is not a regular file of this user: refused")
        if st.st_size < F.HEADER_SIZE + BF.HEADER_SIZE:
            raise _errors.CorruptRegion(f"{location.control_path} is too small for a board")
        header = os.pread(fd, F.HEADER_SIZE, 0)
        with _native.buffer_address(header) as (address, _):
            library.validate_header(address, st.st_size)
        fields = F.unpack_fields(header)
        if (fields["flags"] & F.FLAG_ENCRYPTED or fields["backend"] != F.BACKEND_POSIX
                or fields["data_offset"] != F.HEADER_SIZE):
            raise _errors.CorruptRegion(f"{location.region_id} is not a status board")
        if fields["state"] & F.STATE_DEALLOCATED:
            raise _errors.RegionNotFound(f"the status board {location.region_id} was deleted")
        region = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # The slot's liveness lock is taken through an open of its own: mmap keeps a
        # dup of `fd` (same open), which a forked child would inherit with the lock.
        try:
            lock_fd = os.open(location.control_path, flags)
        except OSError as exc:
            region.close()
            raise _errors.PermissionError(
                f"cannot open the status board {location.control_path}: {exc.strerror}"
            ) from None
        lst = os.fstat(lock_fd)
        if (lst.st_ino, lst.st_dev) != (st.st_ino, st.st_dev):
            os.close(lock_fd)
            region.close()
            raise _errors.RegionNotFound(
                f"the status board {location.region_id} was replaced while joining")
    finally:
        os.close(fd)
    return region, fields["data_size"], lock_fd


def _gauge_names(anchor):
    offset, _size = BF.HEADER_FIELDS["gauge_names"]
    raw = bytes(anchor[offset:offset + BF.GAUGE_COUNT * BF.GAUGE_NAME_CAPACITY])
    names = []
    for i in range(BF.GAUGE_COUNT):
        chunk = raw[i * BF.GAUGE_NAME_CAPACITY:(i + 1) * BF.GAUGE_NAME_CAPACITY]
        names.append(chunk[:BF.GAUGE_NAME_CAPACITY - 1].split(b"\0", 1)[0]
                     .decode("utf-8", "replace"))
    return names
