"""The worker end of a message channel opened by Elixir (``Snakepit.SharedMemory.Channel``).

A channel is a bidirectional, ordered, message-oriented connection between one Elixir
process and this process, over two shared-memory rings with eventfd doorbells (or over a
Unix socket when shared memory cannot be used; the API is the same)::

    import snakepit_shm

    with snakepit_shm.Channel.connect(ref) as ch:    # ref: dict or JSON from export_ref/1
        while True:
            try:
                msg = ch.recv()                       # bytes, or a memoryview for big ones
            except snakepit_shm.ChannelClosed:
                break
            ch.send(msg)

Messages above the channel's inline threshold (a quarter of the ring by default) travel
as sealed memfds: ``recv`` returns them as a read-only ``memoryview``, over the mapping
above 1 MiB (zero-copy; the memory is freed when the view is released), over a copy up to
1 MiB (a mapping per message kept would count against ``vm.max_map_count``).  Small
messages are ``bytes``.

Waiting never polls: a receiver about to sleep announces it in the ring, so the sender
rings this process's eventfd only then.  ``fileno()`` is a descriptor that becomes
readable when something happened (for ``select``/``poll`` or ``loop.add_reader``; see
:mod:`snakepit_shm.aio` for asyncio).  The Elixir side sees this process's death (even
SIGKILL) at once, as EOF on the control socket.

Any thread may call ``send``, also while another thread waits in ``recv``. Threads that
receive at once take turns (``recv`` and ``recv_many`` share the channel's receive
buffer): each message reaches one of them, whole; a receiver's ``timeout`` includes its
wait for its turn. Only one thread at a time sleeps on the channel's wake-ups (they
carry one "about to sleep" announcement per direction); a second thread that must wait
meanwhile (a ``send`` on a full ring while a ``recv`` sleeps, or the other way round)
retries with short pauses (50 µs doubling to 5 ms) until it gets through or the sleeping
thread returns, instead of taking the sleeper's wake-ups from it. A signal handler that
receives or sends while its thread waits in ``recv`` counts as that thread (the wait in
the library has returned).
"""

import ctypes
import errno as _errno
import hashlib
import json
import math
import mmap
import os
import re
import select
import threading
import time
import weakref

from . import _native, errors

__all__ = ["Channel", "ChannelClosed", "ChannelProtocolError", "WouldBlock"]

# The error messages say what failed and what to do: room for a long one.
_ERR_LEN = 1024
_IO_ERR_LEN = 256  # spshm_ch_io's err field
# A second thread that must wait while another sleeps on the channel: pauses between
# its retries (seconds).
_ASIDE_PAUSE_MIN = 50e-6
_ASIDE_PAUSE_MAX = 5e-3
_WOULD_BLOCK = 1
_REGION = 2
_E_CLOSED = -14
_ACK_MODES = {"immediate": 0, "batch": 1, "deferred": 2}
_TOKEN = re.compile(r"[0-9a-fA-F]{64}")
# The io block's "nothing received" markers, and what it may hold (Channel._taking).
_NO_LENGTH = 0xFFFFFFFF
_NO_FD = -2
_ONE = 1
_BATCH = 2
_NOTHING = object()


class _Io(ctypes.Structure):
    """``spshm_ch_io`` of snakepit_shm_channel.h: the arguments that do not change between
    messages, filled once, so that each receive or send converts two or three arguments
    (a ctypes call costs about a microsecond per argument)."""

    _fields_ = [("ch", ctypes.c_void_p), ("buf", ctypes.c_void_p), ("buflen", ctypes.c_uint64),
                ("spin_ns", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("length", ctypes.c_uint32), ("fd", ctypes.c_int32),
                ("err", ctypes.c_char * _IO_ERR_LEN)]


class ChannelClosed(errors.SnakepitShmError, ConnectionError):
    """The channel is closed: ``reason`` is ``"peer_closed"`` (the Elixir side closed it
    or died), ``"closed"`` (closed here), ``"protocol_error"`` (the peer broke the
    protocol), ``"io_error"`` (this side failed, e.g. out of file descriptors: the
    message says how) or ``"forked"`` (this process is a child forked from the one that
    connected the channel: only that process may use or close it)."""

    def __init__(self, reason, message=None):
        self.reason = reason
        super().__init__(message or f"channel closed: {reason}")


class ChannelProtocolError(ChannelClosed):
    """The peer sent a malformed frame or corrupted the ring; the channel is closed."""


class WouldBlock(errors.SnakepitShmError, BlockingIOError):
    """``send(..., timeout=0)`` found the ring full."""


_declared = False


def _lib():
    global _declared
    lib = _native.library()._dll
    if not _declared:
        c = ctypes
        sig = {
            "spshm_channel_layout": ([c.c_char_p, c.c_size_t], c.c_size_t),
            "spshm_ch_connect": ([c.c_char_p, c.c_char_p, c.c_int, c.c_uint32, c.c_uint64,
                                  c.c_uint64, c.c_int, c.POINTER(c.c_void_p), c.c_char_p,
                                  c.c_size_t], c.c_int),
            "spshm_ch_connect_cancellable": ([c.c_char_p, c.c_char_p, c.c_int, c.c_uint32,
                                              c.c_uint64, c.c_uint64, c.c_int, c.c_int,
                                              c.POINTER(c.c_int), c.POINTER(c.c_void_p),
                                              c.c_char_p, c.c_size_t], c.c_int),
            "spshm_ch_free": ([c.c_void_p], None),
            "spshm_ch_close": ([c.c_void_p], None),
            "spshm_ch_wait_fd": ([c.c_void_p], c.c_int),
            "spshm_ch_transport": ([c.c_void_p], c.c_int),
            "spshm_ch_inline_max": ([c.c_void_p], c.c_uint32),
            "spshm_ch_ring_size": ([c.c_void_p], c.c_uint64),
            "spshm_ch_send": ([c.c_void_p, c.c_void_p, c.c_uint64, c.c_char_p, c.c_size_t],
                              c.c_int),
            "spshm_ch_prepare_region": ([c.c_void_p, c.c_uint64, c.POINTER(c.c_int),
                                         c.POINTER(c.c_int), c.c_char_p, c.c_size_t],
                                        c.c_int),
            "spshm_ch_send_region": ([c.c_void_p, c.c_int, c.c_uint64, c.c_char_p,
                                      c.c_size_t], c.c_int),
            "spshm_ch_recv": ([c.c_void_p, c.c_void_p, c.c_size_t, c.POINTER(c.c_uint32),
                               c.POINTER(c.c_int), c.POINTER(c.c_uint64), c.c_char_p,
                               c.c_size_t], c.c_int),
            "spshm_ch_recv_wait": ([c.c_void_p, c.c_void_p, c.c_size_t, c.POINTER(c.c_uint32),
                                    c.POINTER(c.c_int), c.POINTER(c.c_uint64), c.c_uint64,
                                    c.c_int, c.c_char_p, c.c_size_t], c.c_int),
            "spshm_ch_recv_io": ([c.c_void_p, c.c_int], c.c_int),
            "spshm_ch_send_io": ([c.c_void_p, c.c_void_p, c.c_uint64], c.c_int),
            "spshm_ch_recv_batch_io": ([c.c_void_p, c.c_void_p, c.c_uint64, c.c_uint32],
                                       c.c_int),
            "spshm_ch_prepare_wait": ([c.c_void_p, c.c_int, c.c_int, c.c_uint64], c.c_int),
            "spshm_ch_handle_events": ([c.c_void_p], None),
            "spshm_ch_flush": ([c.c_void_p], None),
            "spshm_ch_stats": ([c.c_void_p, c.c_char_p, c.c_size_t], c.c_size_t),
        }
        for name, (argtypes, restype) in sig.items():
            try:
                fn = getattr(lib, name)
            except AttributeError:
                raise errors.LibraryNotFound(
                    f"libsnakepit_shm.so does not export {name}(): rebuild it with "
                    "`mix compile`.") from None
            fn.argtypes = argtypes
            fn.restype = restype
        _declared = True
    return lib


def layout():
    """The channel layout as the C library computes it (a dict): the test oracle."""
    lib = _lib()
    needed = lib.spshm_channel_layout(None, 0)
    buf = ctypes.create_string_buffer(needed + 1)
    lib.spshm_channel_layout(buf, needed + 1)
    return json.loads(buf.value.decode("utf-8"))


def _seconds(value, what):
    """``value`` if it is a number of seconds (int or float, not bool), else TypeError
    naming ``what`` (a str or None compared with a number raised an operator error)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, got {value!r}")
    return value


def _deadline(timeout):
    """The monotonic time a wait of ``timeout`` seconds ends at; None: never (``None``
    or ``math.inf``)."""
    if timeout is None:
        return None
    _seconds(timeout, "timeout")
    if timeout == math.inf:
        return None
    if timeout != timeout:
        raise ValueError("timeout must be a number of seconds or None, not NaN")
    return time.monotonic() + timeout


def _wait_ms(left):
    """A wait of ``left`` seconds as the milliseconds a wait call takes, rounded up, in
    slices of at most a day (the library and ``poll`` take an int)."""
    return min(int(left * 1000) + 1, 86_400_000)


# Region messages up to this size are copied out of their memfd instead of mapped: each
# mapping kept counts against vm.max_map_count (65530 by default) for the whole process,
# and a program that keeps its messages (a list of results) kept one mapping per message:
# some 65 000 of a few KiB made every later mmap fail (the next region message, a region's
# attach, malloc's large blocks). One mapping per MiB held at most remains.
_COPY_REGION_MAX = 1 << 20


def _region_view(fd, size):
    """A region message's sealed memfd (checked at least ``size`` bytes long) as a
    read-only memoryview: a copy up to _COPY_REGION_MAX, else a mapping (zero-copy; not
    MAP_POPULATE: measured slower than the faults, which map 16 pages each)."""
    if size > _COPY_REGION_MAX:
        return memoryview(mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ))
    data = os.pread(fd, size, 0)
    while len(data) < size:
        more = os.pread(fd, size - len(data), len(data))
        if not more:
            raise OSError(_errno.EIO, "a region message's memfd ended before its %d bytes"
                          % size)
        data += more
    return memoryview(data)


# Channels of this process taken by a connect that was then cancelled (aio.connect: a
# cancelled task, a timeout) after their owner had accepted it: keys of _taken_key, the
# oldest forgotten past _TAKEN_MAX. A later connect to one says what happened instead of
# "no such file" (a channel takes one worker for life: the owner removed its socket).
_taken = {}
_taken_lock = threading.Lock()
_TAKEN_MAX = 4096


def _taken_key(ref):
    return hashlib.sha256(("%s\0%s" % (ref["path"], ref["token"].lower())).encode()).digest()


def _note_taken(ref):
    with _taken_lock:
        _taken[_taken_key(ref)] = True
        while len(_taken) > _TAKEN_MAX:
            del _taken[next(iter(_taken))]


def _parse_ref(ref):
    if isinstance(ref, (str, bytes)):
        try:
            ref = json.loads(ref)
        except ValueError as e:
            raise ValueError("not a channel ref (not JSON: %s): pass the map of Snakepit."
                             "SharedMemory.Channel.export_ref/1 or its JSON" % e) from None
    if not isinstance(ref, dict) or ref.get("kind") != "snakepit_shm_channel":
        raise ValueError("not a channel ref: pass the map of "
                         "Snakepit.SharedMemory.Channel.export_ref/1 (or its JSON)")
    for key in ("path", "token"):
        if not isinstance(ref.get(key), str):
            raise ValueError(f"channel ref without {key!r}")
        if "\0" in ref[key]:  # the C library would read it cut at the NUL
            raise ValueError(f"the channel ref's {key!r} contains a NUL character")
    if not _TOKEN.fullmatch(ref["token"]):
        raise ValueError("the channel ref's 'token' must be 64 hex characters (as "
                         "Channel.export_ref/1 makes it), got %d characters"
                         % len(ref["token"]))
    if len(os.fsencode(ref["path"])) > 107:  # sun_path
        raise ValueError("the channel ref's 'path' is longer than a Unix socket path may "
                         "be (107 bytes): %r" % ref["path"][:80])
    return ref


class Channel:
    """One connected worker end of a channel. Create it with :meth:`connect`."""

    def __init__(self, handle, ref, spin=50e-6):
        """Use :meth:`Channel.connect`."""
        self._spin = spin
        self._spin_ns = min(max(0, int(spin * 1e9)), (1 << 64) - 1)
        self._lib = _lib()
        self._h = ctypes.c_void_p(handle)
        self._ref = ref
        self._err = ctypes.create_string_buffer(_ERR_LEN)
        self._inline_max = self._lib.spshm_ch_inline_max(self._h)
        self._buf = ctypes.create_string_buffer(max(self._inline_max, 1))
        # made once: _pull runs per message (and in the spin loop)
        self._buf_len = len(self._buf)
        self._io = _Io(handle, ctypes.addressof(self._buf), self._buf_len, self._spin_ns)
        self._io_addr = ctypes.addressof(self._io)
        # spshm_ch_recv's out-arguments point into the io block, as spshm_ch_recv_io's
        self._io_length_ref = ctypes.pointer(ctypes.c_uint32.from_buffer(
            self._io, _Io.length.offset))
        self._io_fd_ref = ctypes.pointer(ctypes.c_int32.from_buffer(self._io, _Io.fd.offset))
        self._io_size_ref = ctypes.pointer(ctypes.c_uint64.from_buffer(
            self._io, _Io.size.offset))
        # Messages taken from the ring and not returned yet (see "receiving" below).
        self._held = []
        self._taking = 0
        self._gen = 0
        self._batch_off = 0
        self._closing_fd = -1
        self._io.length = _NO_LENGTH
        self._io.fd = _NO_FD
        self._view = memoryview(self._buf).cast("B")
        self._recv_io = self._lib.spshm_ch_recv_io
        self._send_io = self._lib.spshm_ch_send_io
        self._recv_batch_io = self._lib.spshm_ch_recv_batch_io
        self._batch = None  # recv_many's buffer, made on first use
        self._wait_fd = self._lib.spshm_ch_wait_fd(self._h)
        self._poll = select.poll()
        self._poll.register(self._wait_fd, select.POLLIN)
        # The thread that sleeps on the wait fd (see the module doc), if any.
        self._sleep_lock = threading.Lock()
        # One receiver at a time: recv/recv_many fill self._buf, self._io, self._batch.
        self._recv_lock = threading.RLock()  # re-entered by a signal handler
        # [thread ident, depth, between_waits]: between_waits while that thread sleeps
        # only inside the library (recv), whose wait has ended when a signal handler runs.
        self._sleeper = None
        self._closed = False
        # A child forked from this process inherits the socket and the rings: it may
        # neither use them nor close them (shutdown() would end the parent's channel).
        self._pid = os.getpid()
        _connected.add(self)

    @classmethod
    def connect(cls, ref, *, ack_mode="batch", max_batch_size=32, flush_interval=0.005,
                max_message_size=1 << 40, timeout=10.0, spin=50e-6, _cancel_fd=-1):
        """Connect to the channel described by ``ref`` (dict or JSON string).

        ``ack_mode`` (``"batch"``, ``"immediate"`` or ``"deferred"``), ``max_batch_size``
        and ``flush_interval`` (seconds) say how often this side publishes how far it
        has read the incoming ring; ``max_message_size`` bounds the region messages it
        accepts; ``timeout`` bounds the handshake (seconds; ``math.inf`` allowed, a value
        out of range raises ``ValueError``); ``recv`` polls the ring for up to ``spin``
        seconds (default 50 µs, 0 to never spin) before it sleeps on the doorbell, which
        saves a wake-up when the answer is quick.  It spins only while the other
        tasks runnable right now are fewer than the CPUs (``stats()``: ``spin_hits``,
        ``spin_misses``): on a busy machine a spinning worker would take the CPU its
        peer needs to answer.  ``recv`` waits inside the C library with the GIL
        released; a signal ends the wait and its Python handler runs.  Raises
        ``PermissionError`` for a wrong token or a channel that already has its worker
        (also one taken by a connect of this process that was then cancelled, see
        :func:`snakepit_shm.aio.connect`: the message says so), ``OSError`` if the owner
        is gone.
        """
        ref = _parse_ref(ref)
        if ack_mode not in _ACK_MODES:
            raise ValueError(f"ack_mode must be one of {sorted(_ACK_MODES)}")
        _seconds(flush_interval, "flush_interval")
        _seconds(timeout, "timeout")
        _seconds(spin, "spin")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
            raise TypeError(f"max_batch_size must be an int, got {max_batch_size!r}")
        # The C library takes fixed-size integers: check here what ctypes would wrap.
        max_batch_size = int(max_batch_size)
        if not 1 <= max_batch_size < 1 << 32:
            raise ValueError(f"max_batch_size must be between 1 and 2**32 - 1, "
                             f"got {max_batch_size}")
        if not 0 <= flush_interval < math.inf:
            raise ValueError(f"flush_interval must be a finite number of seconds >= 0, "
                             f"got {flush_interval!r}")
        if not isinstance(max_message_size, int) and \
                not 0 <= max_message_size < float(1 << 64):  # inf, NaN, out of range
            raise ValueError(f"max_message_size must be between 0 and 2**64 - 1, "
                             f"got {max_message_size!r}")
        max_message_size = int(max_message_size)
        if not 0 <= max_message_size < 1 << 64:
            raise ValueError(f"max_message_size must be between 0 and 2**64 - 1, "
                             f"got {max_message_size}")
        if not timeout >= 0:  # NaN too
            raise ValueError(f"timeout must be a number of seconds >= 0 (math.inf: "
                             f"forever), got {timeout!r}")
        if not 0 <= spin < math.inf:
            raise ValueError(f"spin must be a finite number of seconds >= 0, got {spin!r}")
        timeout_ms = int(min(max(timeout, 0) * 1000, 2**31 - 1))  # math.inf: ~25 days
        with _taken_lock:
            taken = _taken_key(ref) in _taken
        if taken:
            raise errors.PermissionError(
                "cannot connect to the channel: an earlier connect of this process to it "
                "was cancelled (asyncio: a cancelled task or a timeout) after the owner had "
                "accepted it, and that connection was closed (the owner saw peer_closed); a "
                "channel takes one worker for life: open a new channel")
        lib = _lib()
        out = ctypes.c_void_p()
        err = ctypes.create_string_buffer(_ERR_LEN)
        accepted = ctypes.c_int(0)
        code = lib.spshm_ch_connect_cancellable(
            ref["path"].encode(), ref["token"].encode(), _ACK_MODES[ack_mode],
            max_batch_size, min(int(flush_interval * 1e9), (1 << 64) - 1), max_message_size,
            timeout_ms, _cancel_fd, ctypes.byref(accepted),
            ctypes.byref(out), err, _ERR_LEN)
        if code != 0:
            message = err.value.decode("utf-8", "replace")
            if accepted.value and _cancel_fd >= 0:
                _note_taken(ref)
            if _cancel_fd >= 0 and code == _native.E_IO_ERROR and \
                    "connect was cancelled" in message:
                raise OSError(_errno.ECANCELED, message)
            if code == _native.E_PERMISSION_DENIED:
                raise errors.PermissionError(f"cannot connect to the channel: {message}")
            # This process's own limit, not a refusal: not a ConnectionRefusedError.
            number = _errno.EMFILE if "RLIMIT_NOFILE" in message else _errno.ECONNREFUSED
            raise OSError(number, f"cannot connect to the channel: {message}")
        return cls(out.value, ref, spin)

    @classmethod
    async def connect_async(cls, ref, **options):
        """Connect without blocking the event loop; returns an :class:`aio.AsyncChannel`.

        Cancelling it (a cancelled task, ``asyncio.wait_for``'s timeout) raises
        ``CancelledError`` (``TimeoutError``) at once and leaves no connection behind:
        see :func:`snakepit_shm.aio.connect`."""
        from . import aio
        return await aio.connect(ref, **options)

    # ---- properties ----

    @property
    def transport(self):
        """``"shm"`` (rings in shared memory) or ``"socket"`` (the fallback)."""
        return "shm" if self._lib.spshm_ch_transport(self._h) == 1 else "socket"

    @property
    def inline_max(self):
        """Largest message sent inline; larger ones travel as sealed memfds."""
        return self._inline_max

    @property
    def closed(self):
        """True once :meth:`close` was called."""
        return self._closed

    def fileno(self):
        """A descriptor that is readable when the channel needs attention."""
        self._check_open()
        return self._wait_fd

    # ---- sending ----

    def send(self, data, timeout=None):
        """Send one message (any bytes-like object).

        Blocks while the outgoing ring is full, up to ``timeout`` seconds (``None`` or
        ``math.inf``: forever; ``0``: raise :class:`WouldBlock` at once).  Raises
        :class:`ChannelClosed` if the channel is closed.
        """
        self._check_open()
        if type(data) is bytes and len(data) <= self._inline_max:
            # Fast path (a reply, a small request): bytes are immutable and stay alive
            # during the call, so ctypes passes their buffer as it is.
            code = self._send_io(self._io_addr, data, len(data))
            if code == 0:
                return
            if code != _WOULD_BLOCK:
                self._raise(code, self._io.err)
            # the ring is full: nothing was sent; the general path below waits
        with _native.buffer_address(data) as (address, length):
            if length <= self._inline_max:
                def attempt():
                    return self._lib.spshm_ch_send(self._h, address, length, self._err,
                                                   _ERR_LEN)
                self._send_loop(attempt, length, timeout)
                return
        fd, length = self._prepare_region(data)
        try:
            self._send_loop(lambda: self._lib.spshm_ch_send_region(
                self._h, fd, length, self._err, _ERR_LEN),
                16, timeout)
            fd = None
        finally:
            if fd is not None:
                os.close(fd)

    def _prepare_region(self, data):
        """A sealed memfd holding ``data`` for a region message: (fd, length). The caller
        sends it with :meth:`_try_send_region` (as often as the ring is full) and closes
        the fd if it is never sent: the copy is made once, not once per attempt."""
        with _native.buffer_address(data) as (address, length):
            fd = ctypes.c_int(-1)
            number = ctypes.c_int(0)
            code = self._lib.spshm_ch_prepare_region(address, length, ctypes.byref(fd),
                                                     ctypes.byref(number), self._err, _ERR_LEN)
        if code != 0:
            # The OS's errno (EMFILE, EFBIG, EPERM, ENOMEM...) and the library's message,
            # which names the cause and what to do: not "out of memory" for every failure.
            message = self._err.value.decode("utf-8", "replace")
            if code == _native.E_TOO_LARGE and not number.value:
                number.value = _errno.EMSGSIZE
            raise OSError(number.value or _errno.EIO, message)
        return fd.value, length

    def _try_send_region(self, fd, length):
        """Sends a prepared region message: True once sent (the fd is closed), False if
        the ring is full (the fd stays the caller's)."""
        self._check_open()
        code = self._lib.spshm_ch_send_region(self._h, fd, length, self._err, _ERR_LEN)
        if code == 0:
            return True
        if code != _WOULD_BLOCK:
            self._raise(code)
        return False

    def _send_loop(self, attempt, need, timeout):
        deadline = _deadline(timeout)
        pause = _ASIDE_PAUSE_MIN
        while True:
            code = attempt()
            if code == 0:
                return
            if code != _WOULD_BLOCK:
                self._raise(code)
            if deadline is not None and time.monotonic() >= deadline:
                raise WouldBlock("the channel's ring is full: the Elixir side does not "
                                 "read fast enough")
            if self._claim_sleep():
                try:
                    self._wait(False, True, need, deadline)
                finally:
                    self._release_sleep()
                pause = _ASIDE_PAUSE_MIN
            else:
                pause = self._pause_aside(pause, deadline)

    # ---- receiving ----
    #
    # Python runs a signal's handler (Ctrl-C's KeyboardInterrupt, an alarm's exception)
    # after a call returns, between two bytecodes. A message the library has taken from
    # the ring must not be lost there: every receive call writes into the io block (or
    # the batch buffer) over "nothing" markers set before it, and _drain moves what it
    # took into self._held, one message at a time, committing each with stores and one
    # append that no handler can come between. Whatever a handler's exception
    # interrupts, the messages stay in the block or in self._held, and the next receive
    # returns them first, in order. A handler that itself receives (on this thread, under
    # the re-entrant lock) drains the same state: _gen tells an interrupted step that
    # its state moved. What no library can keep is a value already returned to the
    # caller's frame when the handler raises there (``data = sock.recv(n)`` alike).

    def _begin(self, kind):
        """Marks the io block empty before a receive call that fills it (kind: _ONE or
        _BATCH). The caller has drained it."""
        io = self._io
        self._gen += 1
        io.length = 0 if kind == _BATCH else _NO_LENGTH
        io.fd = _NO_FD
        self._batch_off = 0
        self._taking = kind

    def _drain(self):
        """Moves what the last receive call took into self._held (see above)."""
        io = self._io
        held = self._held
        fd = self._closing_fd
        if fd >= 0:
            self._closing_fd = -1
            os.close(fd)
        while self._taking:
            gen = self._gen
            if self._taking == _BATCH and self._batch_off < io.length:
                off = self._batch_off
                view = self._batch_view
                length = int.from_bytes(view[off:off + 4], "little")
                msg = view[off + 4:off + 4 + length].tobytes()
                if self._gen == gen and self._batch_off == off:
                    self._batch_off = off + 4 + length
                    held.append(msg)
                continue
            if self._taking == _ONE and io.fd < 0 and io.length != _NO_LENGTH:
                msg = self._view[:io.length].tobytes()
                if self._gen == gen and io.length != _NO_LENGTH:
                    io.length = _NO_LENGTH
                    held.append(msg)
                continue
            fd = io.fd
            if fd >= 0:
                # a region message: its sealed memfd as a read-only memoryview
                try:
                    view = _region_view(fd, io.size)
                except (OSError, ValueError):
                    if self._gen == gen and io.fd == fd:
                        io.fd, self._taking = _NO_FD, 0
                        os.close(fd)
                    raise
                if self._gen == gen and io.fd == fd:
                    # the last message of a take (a batch ends at its region message)
                    io.fd, self._closing_fd, self._taking = _NO_FD, fd, 0
                    held.append(view)
                    fd, self._closing_fd = self._closing_fd, -1
                    if fd >= 0:
                        os.close(fd)
                continue
            if self._gen == gen:
                self._taking = 0

    def _pull(self):
        """Takes one message into self._held if one is there now (never waits)."""
        self._drain()
        if self._held:
            return
        self._begin(_ONE)
        code = self._lib.spshm_ch_recv(self._h, self._buf, self._buf_len, self._io_length_ref,
                                       self._io_fd_ref, self._io_size_ref, self._err, _ERR_LEN)
        self._drain()
        if code not in (0, _REGION, _WOULD_BLOCK) and not self._held:
            self._raise(code)

    def _pull_wait(self, timeout_ms):
        """As _pull, waiting in the library (GIL released): spin, then sleep on the
        doorbell up to timeout_ms (-1: forever). Returns with nothing held when nothing
        came in time, or a signal came (its handler runs now; it may raise)."""
        self._drain()
        if self._held:
            return
        self._begin(_ONE)
        code = self._recv_io(self._io_addr, timeout_ms)
        self._drain()
        if code not in (0, _REGION, _WOULD_BLOCK) and not self._held:
            self._raise(code, self._io.err)

    def _try_recv(self):
        """One message or None (nothing now). Raises ChannelClosed at the end."""
        held = self._held
        self._pull()
        if held:
            msg = held[0]
            del held[0]
            return msg
        return None

    def recv(self, timeout=None):
        """Receive one message: ``bytes``, or a read-only ``memoryview`` for a message
        above the inline threshold (zero-copy above 1 MiB).

        Waits up to ``timeout`` seconds (``None`` or ``math.inf``: forever; NaN raises
        ``ValueError``); raises ``TimeoutError`` when nothing came, :class:`ChannelClosed`
        once the channel is closed and every message sent before the close has been
        received. An exception raised by a signal's handler (``KeyboardInterrupt``)
        during the call loses no message: one already taken is returned by the next
        receive.
        """
        self._check_open()
        deadline = _deadline(timeout)
        self._take_recv_turn(deadline)
        held = self._held
        msg = _NOTHING
        locked = True
        try:
            self._recv(deadline)
            msg = held[0]
            del held[0]
            locked = False
            self._recv_lock.release()
        except BaseException:
            if msg is not _NOTHING:
                held.insert(0, msg)
            if locked:
                self._recv_lock.release()
            raise
        return msg

    def _take_recv_turn(self, deadline):
        if deadline is None:
            self._recv_lock.acquire()
        elif not self._recv_lock.acquire(timeout=min(max(0.0, deadline - time.monotonic()),
                                                     threading.TIMEOUT_MAX)):
            raise TimeoutError("no message on the channel within the timeout (another "
                               "thread was receiving)")
        if self._closed:  # closed while this thread waited for its turn
            self._recv_lock.release()
            self._check_open()

    def _recv(self, deadline):
        """Returns once self._held has a message."""
        held = self._held
        self._drain()
        if held:
            return
        if deadline is not None:
            self._pull()
            if held:
                return
        pause = _ASIDE_PAUSE_MIN
        while True:
            if deadline is None:
                wait_ms = -1
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no message on the channel within the timeout")
                wait_ms = _wait_ms(left)
            if self._claim_sleep(True):
                try:
                    # nothing held: nothing in time, or a signal (its handler runs now)
                    self._pull_wait(wait_ms)
                finally:
                    self._release_sleep()
                pause = _ASIDE_PAUSE_MIN
            else:
                self._pull()
                if not held:
                    pause = self._pause_aside(pause, deadline)
            if held:
                return

    def recv_many(self, max_count, timeout=None):
        """Wait for at least one message (as :meth:`recv`), then return a list of up to
        ``max_count`` messages that are already there.

        The messages after the first are taken with one call into the library per batch
        (not one per message): a stream of small messages costs a few hundred
        nanoseconds of Python per message. As with :meth:`recv`, an exception raised by a
        signal's handler during the call loses no message."""
        if not isinstance(max_count, int) or isinstance(max_count, bool):
            raise TypeError(f"max_count must be an int, got {type(max_count).__name__}")
        if max_count < 1:
            raise ValueError(f"max_count must be at least 1, got {max_count}")
        self._check_open()
        deadline = _deadline(timeout)
        self._take_recv_turn(deadline)
        held = self._held
        out = None
        locked = True
        try:
            self._recv_many(max_count, deadline)
            out = held[:max_count]
            del held[:max_count]
            locked = False
            self._recv_lock.release()
        except BaseException:
            if out is not None:
                held[0:0] = out
            if locked:
                self._recv_lock.release()
            raise
        return out

    def _recv_many(self, max_count, deadline):
        """Returns once self._held has a message, and up to max_count of those there."""
        held = self._held
        self._recv(deadline)
        while len(held) < max_count:
            if self._batch is None:  # made on first use; self._batch set last
                batch = ctypes.create_string_buffer(max(1 << 16, self._inline_max + 4))
                self._batch_addr = ctypes.addressof(batch)
                self._batch_view = memoryview(batch).cast("B")
                self._batch = batch
            self._drain()
            self._begin(_BATCH)
            # (a u32: ctypes would wrap a larger count, 2**32 to 0)
            code = self._recv_batch_io(self._io_addr, self._batch_addr, len(self._batch),
                                       min(max_count - len(held), 0xFFFFFFFF))
            # a region message after the inline ones, or a full buffer: take more
            more = code >= 0 and (self._io.fd >= 0 or self._io.size != 0)
            self._drain()
            if code < 0:
                if code == _E_CLOSED:
                    break  # reported by the next recv
                self._raise(code, self._io.err)
            if not more:
                break  # the ring is empty

    def flush(self):
        """Publish the read position now (batched acknowledgements)."""
        self._check_open()
        self._lib.spshm_ch_flush(self._h)

    # ---- waiting (also used by aio) ----

    def _prepare_wait(self, want_data, want_space, need):
        return self._lib.spshm_ch_prepare_wait(self._h, int(want_data), int(want_space),
                                               need) == 1

    def _handle_events(self):
        self._lib.spshm_ch_handle_events(self._h)

    def _wait(self, want_data, want_space, need, deadline):
        if self._prepare_wait(want_data, want_space, need):
            if deadline is None:
                self._poll.poll()
            else:
                left = max(0.0, deadline - time.monotonic())
                self._poll.poll(_wait_ms(left))
        self._handle_events()

    def _claim_sleep(self, between_waits=False):
        """True if the calling thread may sleep on the wait fd: no other thread does, or
        this thread's own claim is a recv whose wait in the library has returned (a
        signal handler receiving or sending on the channel meanwhile)."""
        me = threading.get_ident()
        with self._sleep_lock:
            sleeper = self._sleeper
            if sleeper is None:
                self._sleeper = [me, 1, between_waits]
                return True
            if sleeper[0] == me and sleeper[2]:
                sleeper[1] += 1
                return True
            return False

    def _release_sleep(self):
        with self._sleep_lock:
            self._sleeper[1] -= 1
            if self._sleeper[1] == 0:
                self._sleeper = None

    def _pause_aside(self, pause, deadline):
        """Another thread sleeps on the wait fd: pause without touching it (its wake-ups
        and announcements are that thread's); returns the next, longer pause."""
        if deadline is not None:
            pause = min(pause, max(0.0, deadline - time.monotonic()))
        time.sleep(pause)
        self._check_open()
        return min(pause * 2, _ASIDE_PAUSE_MAX)

    # ---- lifecycle ----

    def stats(self):
        """Counters of this end (messages, bytes, doorbells, flushes, transport...)."""
        self._check_open()
        # The counters move between two calls (the peer consumes, another thread sends):
        # the text is taken again until it fits whole, never parsed truncated.
        size = 1024
        while True:
            buf = ctypes.create_string_buffer(size)
            needed = self._lib.spshm_ch_stats(self._h, buf, size)
            if needed < size:
                return json.loads(buf.value.decode("utf-8"))
            size = needed + 64

    def close(self):
        """Close the channel (idempotent): the Elixir side sees ``:peer_closed``.

        A thread blocked in :meth:`recv` on this channel wakes up and gets
        :class:`ChannelClosed`. The handle itself is freed when the object goes away
        (never under a thread that is still inside the library). In a child forked from
        the process that connected the channel, it only marks this copy closed: the
        parent's channel stays open."""
        if not self._closed:
            self._closed = True
            if os.getpid() == self._pid:
                self._lib.spshm_ch_close(self._h)

    def _abandon(self):
        """Closes and frees a channel whose connect was given up after it completed (the
        owner took it: it sees peer_closed, and a later connect of this process to the
        ref says what happened)."""
        _note_taken(self._ref)
        self.close()
        self._free()

    def _free(self):
        if self._h is not None:
            h, self._h = self._h, None
            self._io.ch = None
            if os.getpid() == self._pid:
                self._lib.spshm_ch_free(h)
            # else a forked child's copy: its descriptors stay open until it exits

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
            self._free()
        except Exception:
            pass

    def _check_open(self):
        if self._closed:  # also set in a forked child (_after_fork_in_child)
            if os.getpid() != self._pid:
                raise ChannelClosed("forked", f"this channel belongs to process "
                                    f"{self._pid}: a child forked from it cannot use it "
                                    "(connect a channel of its own)")
            raise ChannelClosed("closed", "the channel was closed by this process")

    def _raise(self, code, err=None):
        message = (self._err.value if err is None else err).decode("utf-8", "replace")
        if code == _E_CLOSED:
            if message == "protocol_error":
                raise ChannelProtocolError(message, "the Elixir side broke the channel "
                                           "protocol; the channel is closed")
            if message == "io_error":  # our side failed: say how (out of descriptors...)
                raise ChannelClosed(message, "channel closed: io_error: " + self._detail())
            raise ChannelClosed(message or "peer_closed")
        if code == _native.E_TOO_LARGE:  # above max_message_size: the message says so
            raise OSError(_errno.EMSGSIZE, message)
        raise OSError(_errno.EIO, f"channel failure: {message} (code {code})")

    def _detail(self):
        try:
            return self.stats().get("close_detail") or "an I/O error on this side"
        except Exception:  # the message must not hide the closing error
            return "an I/O error on this side"


# Every Channel of this process, so that a forked child marks its copies closed at once
# (the check costs the hot paths nothing); close() and the handle's release also compare
# the pid, for a fork this hook does not see.
_connected = weakref.WeakSet()


def _after_fork_in_child():
    for ch in list(_connected):
        ch._closed = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
