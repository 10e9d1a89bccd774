"""Host-wide quotas shared with the BEAM: ``snakepit_shm.HostQuota``.

A quota (``"shm_total"``, ``"gpu0"``, a licence count) is held by a per-host server that
one of the host's Elixir VMs runs; every client holds its reservations in a session (one
Unix socket connection).  When this process dies, even by SIGKILL, the socket closes and
the server releases everything it held at once::

    import snakepit_shm

    with snakepit_shm.HostQuota.connect() as quota:
        with quota.reserve("gpu0", 4 << 30, wait=5.0):    # wait up to 5 s in line
            run_on_gpu()
        print(quota.usage("gpu0"))

Only the standard library is needed.  The wire format (version 1) is described byte by
byte in ``docs/QUOTA.md`` and defined in ``Snakepit.SharedMemory.HostQuota.Protocol``:
a frame is a 4-byte big-endian length and a payload ``version:u8 type:u8 fields``.

If the serving VM dies, another VM takes over; this client reconnects at once (a
background thread is told of the hang-up by ``poll(POLLRDHUP)``, no polling loop) and
re-declares what it holds, so nothing is lost or counted twice.

After ``os.fork()`` the child does not inherit the session: its copy of the socket is
closed and the client raises :class:`QuotaUnavailable`; connect again in the child.
"""

import itertools
import math
import os
import re
import secrets
import select
import socket
import stat
import struct
import sys
import threading
import time
import weakref

from .errors import SnakepitShmError

__all__ = [
    "HostQuota",
    "Reservation",
    "QuotaError",
    "QuotaExceeded",
    "UnknownQuota",
    "QuotaUnavailable",
    "default_dir",
]

VERSION = 1
MAX_FRAME = 65536
FOREVER = 0xFFFFFFFF
SOCKET_NAME = "quota.sock"

# Message types (docs/QUOTA.md).
HELLO, DEFINE, RESERVE, RELEASE, DECLARE, USAGE = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
WELCOME, OK, ERROR, USAGE_REPLY, GRANTED = 0x81, 0x82, 0x83, 0x84, 0x85
KIND_PYTHON = 2
KINDS = {1: "beam", 2: "python", 3: "other"}
ERRORS = {1: "quota_exceeded", 2: "unknown_quota", 3: "invalid_argument", 4: "conflict"}

_NAME = re.compile(r"\A[A-Za-z0-9_.:\-]{1,64}\Z")
_MARGIN = 5.0  # seconds a call may take beyond its wait before the server counts as gone
_RCVTIMEO = struct.pack("ll", 1, 0)  # struct timeval: 1 s
SPIN = 50e-6  # seconds a caller re-reads the socket for its answer before it sleeps
_WINDOW = 256  # answered calls per window in which the spin is measured on or off
_EXPLORE = 8  # one window in this many re-measures the mode that was slower
_SAMPLE_NS = 1_000_000  # longer answers waited in line: they say nothing of the spin


class QuotaError(SnakepitShmError):
    """A host quota request was refused; ``reason`` is the server's reason."""

    def __init__(self, message, reason="error"):
        super().__init__(message)
        self.reason = reason


class QuotaExceeded(QuotaError):
    """Not enough of the quota is left (the message says who holds what)."""


class UnknownQuota(QuotaError, KeyError):
    """No quota of that name is defined: ``define(name, limit)`` it first."""

    def __str__(self):
        return self.args[0]


class QuotaUnavailable(QuotaError, ConnectionError):
    """No quota server answers: no Elixir VM configured for host quotas is running."""


def default_dir():
    """The quota directory, resolved as the Elixir side does (docs/QUOTA.md).

    ``SNAKEPIT_SHM_QUOTA_DIR`` if set; else ``SNAKEPIT_SHM_VM_QUOTA_DIR``, the directory
    the Elixir VM that started this process uses (it exports it, ``host_quota_dir``
    configuration included); else the defaults.
    """
    for name in ("SNAKEPIT_SHM_QUOTA_DIR", "SNAKEPIT_SHM_VM_QUOTA_DIR"):
        env = os.environ.get(name)
        if env:
            return env
    uid = os.getuid()
    for base in (os.environ.get("XDG_RUNTIME_DIR"), "/run/user/%d" % uid):
        if base and _owned_dir(base, uid):
            return os.path.join(base, "snakepit_shm")
    return "/tmp/snakepit_shm-%d" % uid


def _owned_dir(path, uid):
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid


def _check_dir(path):
    """Refuse a directory another user could control (it could fake the server)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise QuotaUnavailable(
            "host quota directory %s does not exist: no Elixir VM configured for host "
            "quotas has run as this user (or set SNAKEPIT_SHM_QUOTA_DIR)" % path,
            "unavailable") from None
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError("host quota directory %s is not a directory" % path)
    if st.st_uid != os.getuid():
        raise PermissionError("host quota directory %s is owned by uid %d, not by this user"
                              % (path, st.st_uid))
    if st.st_mode & 0o077:
        raise PermissionError("host quota directory %s has group/other permissions (%o): "
                              "chmod 700 it" % (path, st.st_mode & 0o777))


_idle = {"at": -math.inf, "verdict": True}


def _cpus_idle():
    """Whether a CPU is to spare for a spinning caller: the 1-minute load average,
    less one for this caller (a client calling in a loop is itself runnable all the
    time, spinning or not, and counted), is below the number of CPUs; never on one
    CPU.  Re-read at most every 100 ms.  ``SNAKEPIT_SHM_QUOTA_LOADAVG`` stands in for
    the load average (tests)."""
    now = time.monotonic()
    if now - _idle["at"] < 0.1:
        return _idle["verdict"]
    _idle["at"] = now
    fake = os.environ.get("SNAKEPIT_SHM_QUOTA_LOADAVG")
    try:
        load = float(fake) if fake else os.getloadavg()[0]
    except (OSError, ValueError):
        return _idle["verdict"]  # unknown: keep the last verdict
    cpus = os.cpu_count() or 1
    _idle["verdict"] = cpus > 1 and load - 1 < cpus
    return _idle["verdict"]


_NAMES = {}  # valid names seen, encoded (checked once, not on every call)


def _check_name(name):
    if type(name) is str:
        encoded = _NAMES.get(name)
        if encoded is not None:
            return encoded
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError("a host quota name must be 1-64 characters of [A-Za-z0-9_.:-], "
                         "got: %r" % (name,))
    if len(_NAMES) < 1024:
        _NAMES[name] = name.encode()
    return name.encode()


def _check_u64(value, what, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value < 1 << 64:
        raise ValueError("%s must be an integer from %d to 2**64-1, got: %r"
                         % (what, minimum, value))
    return value


# ---- encoding and decoding (mirrors Snakepit.SharedMemory.HostQuota.Protocol) ----

def encode_hello(client_id, pid, label):
    # At most 255 bytes of UTF-8, never a character cut in two (nor a lone surrogate of
    # an undecodable argv[0]): the server closes a session whose label is not UTF-8,
    # and this client would reconnect and be refused again, forever.
    lab = str(label).encode("utf-8", "replace")[:255].decode("utf-8", "ignore").encode()
    return struct.pack(">BBQIBH", VERSION, HELLO, client_id, pid, KIND_PYTHON, len(lab)) + lab


def encode_define(req, name, limit, if_absent=False):
    return struct.pack(">BBIBQB", VERSION, DEFINE, req, 1 if if_absent else 0, limit,
                       len(name)) + name


def encode_reserve(req, res_id, name, amount, wait_ms):
    return struct.pack(">BBIQQIB", VERSION, RESERVE, req, res_id, amount, wait_ms,
                       len(name)) + name


def encode_release(req, res_id):
    return struct.pack(">BBIQ", VERSION, RELEASE, req, res_id)


def encode_declare(req, res_id, name, amount, limit):
    return struct.pack(">BBIQQQB", VERSION, DECLARE, req, res_id, amount, limit,
                       len(name)) + name


def encode_usage(req, name):
    return struct.pack(">BBIB", VERSION, USAGE, req, len(name)) + name


def decode_reply(payload):
    """Decode one server payload into a tuple ``(type, req, ...)``; ValueError if bad."""
    try:
        version, kind = payload[0], payload[1]
        if version != VERSION:
            raise ValueError("unsupported protocol version %d" % version)
        if kind == WELCOME:
            pid, n = struct.unpack_from(">IH", payload, 2)
            return (WELCOME, 0, pid, bytes(payload[8:8 + n]).decode())
        if kind == OK and len(payload) == 6:
            return (OK, struct.unpack_from(">I", payload, 2)[0])
        if kind == GRANTED and len(payload) == 14:
            req, limit = struct.unpack_from(">IQ", payload, 2)
            return (GRANTED, req, limit)
        if kind == ERROR:
            req, code, n = struct.unpack_from(">IBH", payload, 2)
            message = bytes(payload[9:9 + n]).decode("utf-8", "replace")
            if len(payload) != 9 + n:
                raise ValueError("bad error length")
            return (ERROR, req, ERRORS.get(code, "error"), message)
        if kind == USAGE_REPLY:
            req, count = struct.unpack_from(">IH", payload, 2)
            return (USAGE_REPLY, req, _decode_quotas(payload, 8, count))
    except (IndexError, struct.error, UnicodeDecodeError) as e:
        raise ValueError("malformed reply: %s" % e) from None
    raise ValueError("unknown reply type 0x%02x" % payload[1])


def _decode_quotas(buf, off, count):
    quotas = []
    for _ in range(count):
        n = buf[off]
        name = bytes(buf[off + 1:off + 1 + n]).decode()
        off += 1 + n
        limit, used, nh = struct.unpack_from(">QQH", buf, off)
        off += 18
        holders, off = _decode_clients(buf, off, nh, "count")
        (nw,) = struct.unpack_from(">H", buf, off)
        waiters, off = _decode_clients(buf, off + 2, nw, "waited_ms")
        quotas.append({"name": name, "limit": limit, "used": used, "left": max(limit - used, 0),
                       "holders": holders, "waiters": waiters})
    if off != len(buf):
        raise ValueError("trailing bytes in usage reply")
    return quotas


def _decode_clients(buf, off, count, key):
    out = []
    for _ in range(count):
        pid, kind, n = struct.unpack_from(">IBH", buf, off)
        label = bytes(buf[off + 7:off + 7 + n]).decode("utf-8", "replace")
        off += 7 + n
        amount, extra = struct.unpack_from(">QI", buf, off)
        off += 12
        out.append({"os_pid": pid, "kind": KINDS.get(kind, "other"), "label": label,
                    "amount": amount, key: extra})
    return out, off


class Reservation:
    """A granted reservation; ``release()`` it, or use it as a context manager."""

    __slots__ = ("id", "name", "amount", "_quota", "__weakref__")

    def __init__(self, quota, res_id, name, amount):
        self._quota = quota
        self.id = res_id
        self.name = name
        self.amount = amount

    @property
    def held(self):
        """Whether this reservation is still held by its client."""
        return self._quota._is_held(self.id)

    def release(self, sync=False):
        """Give the reservation back (idempotent); see :meth:`HostQuota.release`."""
        self._quota.release(self, sync=sync)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __repr__(self):
        state = "" if self.held else " (released)"
        return "<Reservation %d of %r: %d%s>" % (self.id, self.name, self.amount, state)


_INSTANCES = weakref.WeakSet()


def _after_fork_in_child():
    # The child must not keep the parent's session alive (or talk over its socket).
    for quota in list(_INSTANCES):
        quota._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Wake:
    """The pipe that wakes a client's watcher thread; closed once, by whoever is last."""

    def __init__(self):
        self.r, self.w = os.pipe()
        self._lock = threading.Lock()
        self._open = True
        # Set by the client's __del__: the watcher closes the pipe when it ends. (Its
        # weak reference is no proof: __del__ runs with the client briefly alive again,
        # so a watcher that looked then saw a live client and left the pipe open.)
        self.dropped = False

    def poke(self):
        with self._lock:
            if self._open:
                try:
                    os.write(self.w, b"x")
                except OSError:
                    pass

    def close(self):
        with self._lock:
            if self._open:
                self._open = False
                os.close(self.r)
                os.close(self.w)


def _watch(ref, wake):
    """A client's watcher thread: reconnects as soon as the server hangs up, even while
    no call is made.  Holds the client only between waits (a weak reference)."""
    while True:
        quota = ref()
        sock = quota._watch_socket() if quota is not None else None
        del quota
        if sock is None:
            break
        try:
            poller = select.poll()
            poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            poller.register(wake.r, select.POLLIN)
            events = poller.poll()
        except (OSError, ValueError):
            events = []
        if any(fd == wake.r for fd, _ in events):
            break
        quota = ref()
        if quota is None:
            break
        quota._watch_hangup(sock)
        del quota, sock
    if wake.dropped or ref() is None:
        wake.close()  # collected without close(): nobody else closes the pipe


class HostQuota:
    """A session with the host quota server.  Thread-safe; close() it when done."""

    def __init__(self, dir=None, label=None, timeout=5.0, spin=SPIN):
        if isinstance(spin, bool) or not isinstance(spin, (int, float)) or not 0 <= spin < 1:
            raise ValueError("spin must be seconds from 0 to 1, got: %r" % (spin,))
        if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                or not timeout >= 0):  # NaN too: its deadline would never pass
            raise ValueError("timeout must be seconds >= 0 (math.inf: forever), got: %r"
                             % (timeout,))
        self._spin_ns = int(spin * 1e9)
        self._spin_hits = 0
        self._spin_misses = 0
        # Adaptive spin: windows of _WINDOW answered calls alternate by measurement.
        self._spin_on = True
        self._win_n = 0
        self._win_ns = 0
        self._windows = 0
        self._est = {True: None, False: None}  # mean round trip (ns) of the last window
        self._dir = dir or default_dir()
        self._path = os.path.join(self._dir, SOCKET_NAME)
        self._client_id = secrets.randbits(64)
        self._label = label or os.path.basename(sys.argv[0] or "") or "python"
        self._cv = threading.Condition(threading.Lock())
        self._ids = itertools.count(1)
        self._sock = None
        self._buf = bytearray()
        self._buf_sock = None
        self._reading = False
        self._replies = {}
        self._pending = {}
        self._held = {}
        self._limits = {}
        self._closed = False
        self._server_pid = None
        self._connected_at = -math.inf
        self._hangup_delay = 0.0
        _check_dir(self._dir)
        with self._cv:
            self._reconnect_locked(time.monotonic() + timeout)
        self._wake = _Wake()
        # The thread holds only a weak reference: a client dropped without close() is
        # collected, and __del__ ends its session (and the thread).
        self._watcher = threading.Thread(target=_watch, args=(weakref.ref(self), self._wake),
                                         name="snakepit_shm-quota", daemon=True)
        self._watcher.start()
        _INSTANCES.add(self)

    @classmethod
    def connect(cls, dir=None, label=None, timeout=5.0, spin=SPIN):
        """Connect to the host's quota server.

        ``dir`` defaults to :func:`default_dir` (``SNAKEPIT_SHM_QUOTA_DIR``, else
        ``$XDG_RUNTIME_DIR/snakepit_shm``, ``/run/user/<uid>/snakepit_shm``,
        ``/tmp/snakepit_shm-<uid>``); ``label`` (how others see this client) defaults
        to the program name.  Raises :class:`QuotaUnavailable` if no server answers
        within ``timeout`` seconds, ``PermissionError`` if the directory is not private.

        ``spin``: a call re-reads the socket for its answer for up to ``spin`` seconds
        (default 50 µs, 0 never) before it sleeps, which saves this process a wake-up
        when the server answers quickly; only while the 1-minute load average, less one
        for this caller, is below the number of CPUs (on a busy machine a spinning
        caller would take the CPU the server needs for the answer), and only while it
        measures faster: calls are timed in windows of 256 answers, spinning or not,
        and the faster mode is kept (the other re-measured one window in eight).
        """
        return cls(dir=dir, label=label, timeout=timeout, spin=spin)

    # ---- public API ----

    def define(self, name, limit):
        """Define quota ``name`` with ``limit`` units, or change its limit."""
        bname = _check_name(name)
        _check_u64(limit, "limit", 0)
        with self._cv:
            self._limits[name] = limit
        self._call(lambda req: encode_define(req, bname, limit), None)

    def reserve(self, name, amount, wait=0):
        """Reserve ``amount`` of quota ``name``; returns a :class:`Reservation`.

        ``wait`` is how many seconds to wait in line for capacity (``0``: fail at once,
        ``math.inf``: forever); waiters are served strictly in arrival order.  Raises
        :class:`QuotaExceeded` (the message says what is used, by whom, what is left),
        :class:`UnknownQuota` or :class:`QuotaUnavailable`.
        """
        bname = _check_name(name)
        _check_u64(amount, "amount", 1)
        if (not isinstance(wait, (int, float)) or isinstance(wait, bool) or wait < 0
                or wait != wait):
            raise ValueError("wait must be seconds >= 0 (math.inf: forever), got: %r" % (wait,))
        # min() before int(): a finite wait of 1e308 s is inf ms, which int() refuses.
        wait_ms = FOREVER if math.isinf(wait) else int(min(wait * 1000, FOREVER - 1))
        # The server gives up after wait_ms; a longer timeout here would only overflow
        # the condition variable's wait (OverflowError past threading.TIMEOUT_MAX).
        timeout = math.inf if math.isinf(wait) else wait_ms / 1000 + _MARGIN
        res_id = next(self._ids)
        res = Reservation(self, res_id, name, amount)
        try:
            self._call(lambda req: encode_reserve(req, res_id, bname, amount, wait_ms),
                       timeout, reservation=res)
        except (QuotaExceeded, UnknownQuota):
            raise
        except BaseException:
            # Unavailable, or the caller was interrupted while waiting (Ctrl-C, an
            # exception from a signal handler): whatever the server decides later, this
            # reservation must not stay held nor waiting in line.
            self._send_quietly(encode_release(0, res_id))
            raise
        return res

    def release(self, reservation, sync=False):
        """Release a reservation (idempotent: releasing twice is not an error).

        By default the release is pipelined: the RELEASE frame is written to the
        session's socket and no answer is awaited (request id 0), one round trip less
        per reserve + release pair.  It is final when this returns: the reservation is
        never re-declared, and a server that dies before reading it takes it with it.
        Every later request of this client (any thread: one ordered socket) is applied
        after it, so its next ``reserve`` or ``usage`` sees the amount free.  Another
        client (another process, or another ``HostQuota`` of this one) may see the
        amount as used for the microseconds the frame takes to reach the server (its
        ``wait=0`` reserve could fail; a waiting one is granted when the frame arrives).

        ``sync=True`` returns once the server has applied it: every client sees the
        amount free afterwards.  Use it before telling another process that the
        amount is free.
        """
        if not isinstance(reservation, Reservation):
            raise TypeError("release() takes a Reservation returned by reserve(), got: %r"
                            % (reservation,))
        if not isinstance(sync, bool):
            raise ValueError("sync must be True or False, got: %r" % (sync,))
        with self._cv:
            if reservation._quota is not self or reservation.id not in self._held:
                # Not held, or a reservation of another client (ids are per client:
                # the same id here may be one of ours).
                return
            del self._held[reservation.id]
            if not sync or self._sock is None:
                # With no socket, the session it was held by is gone, and the
                # reservation with it (_send_locked sends nothing then).
                self._send_locked(encode_release(0, reservation.id))
                return
        self._call(lambda req: encode_release(req, reservation.id), None, release=True)

    def usage(self, name=None):
        """Limit, used, left, holders and waiters of quota ``name`` (None: all), as dicts."""
        bname = b"" if name is None else _check_name(name)
        reply = self._call(lambda req: encode_usage(req, bname), None)
        return reply[2]

    @property
    def held(self):
        """The reservations this client holds."""
        with self._cv:
            return [self._reservation_locked(res_id) for res_id in list(self._held)]

    def stats(self):
        """Counters of this client: ``spin_hits`` (spins that read something: the
        answer, or the server's hang-up), ``spin_misses`` (spins that ended in a sleep)."""
        return {"spin_hits": self._spin_hits, "spin_misses": self._spin_misses,
                "spinning": self._spin_on,
                "round_trip_ns": {"spin": self._est[True], "no_spin": self._est[False]}}

    @property
    def server_pid(self):
        """OS pid of the VM that serves (as of the last connection)."""
        return self._server_pid

    def close(self):
        """End the session: the server releases everything it held.  Idempotent."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._held.clear()
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            self._cv.notify_all()
        self._wake.poke()
        if threading.current_thread() is not self._watcher:
            self._watcher.join(1.0)
        self._wake.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        # Dropped without close(): the session ends (the server releases what it held)
        # and the watcher thread, woken, closes the wake pipe and exits.
        try:
            if not self._closed:
                # First: a watcher that sees _closed below must see this too.
                self._wake.dropped = True
                self._closed = True
                if self._sock is not None:
                    self._sock.close()
                self._wake.poke()
        except Exception:
            pass

    # ---- requests ----

    def _reservation_locked(self, res_id):
        # The Reservation object of a held id: the caller's own while it lives, else a
        # new one (the client keeps only a weak reference: a Reservation refers to its
        # client, and a reference back would make every client with a reservation a
        # cycle, left to the cyclic GC instead of ending its session when dropped).
        name, amount, ref = self._held[res_id]
        reservation = ref()
        if reservation is None:
            reservation = Reservation(self, res_id, name, amount)
            self._held[res_id] = (name, amount, weakref.ref(reservation))
        return reservation

    def _is_held(self, res_id):
        with self._cv:
            return res_id in self._held

    def _call(self, build, timeout, reservation=None, release=False):
        if timeout is None:
            timeout = _MARGIN
        deadline = None if math.isinf(timeout) else time.monotonic() + timeout
        with self._cv:
            self._check_open()
            req = next(self._ids) & 0xFFFFFFFF or next(self._ids)
            frame = build(req)
            self._pending[req] = (frame, release)
            self._send_locked(frame)
            # Nobody reads: this thread reads its own answer at once (no second trip
            # through the lock, no other thread involved).
            sock = None
            if not self._reading and self._sock is not None:
                self._reading = True
                sock = self._sock
                sent = time.monotonic_ns()
        try:
            reply = self._await(req, deadline, reservation, sock)
        finally:
            if self._pending.get(req) is not None:
                with self._cv:
                    self._pending.pop(req, None)
        if sock is not None and self._spin_ns and _cpus_idle():
            # This thread read its own answer, in this window's mode. (Outside the
            # lock: two threads counting at once may lose a count, nothing more.)
            self._account(time.monotonic_ns() - sent)
        if reply[0] == ERROR:
            _, _, reason, message = reply
            cls = {"quota_exceeded": QuotaExceeded, "unknown_quota": UnknownQuota}.get(reason)
            raise (cls or QuotaError)(message, reason)
        return reply

    def _take_locked(self, req, reply, reservation):
        # Called with the lock held, once the reply of `req` is here.
        self._pending.pop(req, None)
        if reservation is not None and reply[0] == GRANTED:
            self._held[reservation.id] = (reservation.name, reservation.amount,
                                          weakref.ref(reservation))
            self._limits.setdefault(reservation.name, reply[2])
        return reply

    def _await(self, req, deadline, reservation, sock=None):
        """Leader/follower: one thread reads the socket for everyone, others wait.

        ``sock``: the caller already took the reader's role (``_reading``) for it."""
        while True:
            if sock is None:
                with self._cv:
                    while True:
                        if req in self._replies:
                            return self._take_locked(req, self._replies.pop(req), reservation)
                        self._check_open()
                        remaining = None if deadline is None else deadline - time.monotonic()
                        if remaining is not None and remaining <= 0:
                            raise QuotaUnavailable("the host quota server did not answer in "
                                                   "time", "unavailable")
                        if not self._reading and self._sock is not None:
                            self._reading = True
                            sock = self._sock
                            break
                        if not self._reading and self._sock is None:
                            self._reconnect_locked(deadline or time.monotonic() + _MARGIN)
                            continue
                        self._cv.wait(remaining)
            reply = self._lead(req, sock, reservation)
            if reply is not None:
                return reply
            sock = None

    def _lead(self, req, sock, reservation):
        """Reads one reply as the reader: ``req``'s own (taken), or None."""
        # Blocking read; SO_RCVTIMEO (set at connect) wakes it now and then so that a
        # deadline is seen even if the server hangs without closing.
        try:
            reply = self._read_one(sock)
        except BlockingIOError:
            reply = None
        except (OSError, ValueError):
            reply = False
        except BaseException:
            # Interrupted (Ctrl-C, an exception from a signal handler): let another
            # thread read, or the watcher watch, instead of waiting for this one.
            with self._cv:
                self._reading = False
                self._cv.notify_all()
            raise
        with self._cv:
            self._reading = False
            if reply is False:
                if self._sock is sock:
                    self._drop_locked()
            elif reply is not None and reply[0] == WELCOME:
                self._server_pid = reply[2]
            elif reply is not None:
                if reply[1] == req:
                    self._cv.notify_all()
                    return self._take_locked(req, reply, reservation)
                if reply[1] in self._pending:
                    self._replies[reply[1]] = reply
            self._cv.notify_all()
        return None

    def _read_one(self, sock):
        if self._buf_sock is not sock:
            # Bytes of an earlier connection must never be parsed with this one's.
            self._buf = bytearray()
            self._buf_sock = sock
        while True:
            if len(self._buf) >= 4:
                (n,) = struct.unpack_from(">I", self._buf, 0)
                if n > MAX_FRAME or n < 2:
                    raise ValueError("bad frame length %d" % n)
                if len(self._buf) >= 4 + n:
                    payload = bytes(self._buf[4:4 + n])
                    del self._buf[:4 + n]
                    return decode_reply(payload)
            chunk = self._recv(sock)
            if not chunk:
                raise ConnectionResetError("the quota server closed the connection")
            self._buf += chunk

    def _account(self, rt_ns):
        """Adaptive spin: whether spinning pays is measured, not guessed. Calls are
        counted in windows of _WINDOW answers, each all spinning or all sleeping (a
        lone spinning call among sleeping ones finds the server asleep too, a lone
        sleeping call among spinning ones may wake cheaply: per-call probes mislead).
        The next window takes the mode whose last window was faster; one in _EXPLORE
        re-measures the other, as do the first two (one of each)."""
        if rt_ns >= _SAMPLE_NS:
            return
        self._win_n += 1
        self._win_ns += rt_ns
        if self._win_n < _WINDOW:
            return
        mode = self._spin_on
        self._est[mode] = self._win_ns / self._win_n
        self._win_n = self._win_ns = 0
        self._windows += 1
        other = not mode
        if self._est[other] is None:
            self._spin_on = other
            return
        faster = self._est[True] <= self._est[False]
        self._spin_on = (not faster) if self._windows % _EXPLORE == 0 else faster

    def _recv(self, sock):
        if self._spin_ns and self._spin_on and _cpus_idle():
            # Re-read for up to spin seconds: an answer that comes quickly then costs
            # no sleep and no wake-up of this process.
            end = time.monotonic_ns() + self._spin_ns
            while True:
                try:
                    chunk = sock.recv(65536, socket.MSG_DONTWAIT)
                    self._spin_hits += 1
                    return chunk
                except BlockingIOError:
                    if time.monotonic_ns() >= end:
                        break
            self._spin_misses += 1
        return sock.recv(65536)

    def _send_locked(self, payload):
        if self._sock is None:
            return  # re-sent with the other pending frames on reconnect
        try:
            self._sock.sendall(struct.pack(">I", len(payload)) + payload)
        except OSError:
            self._drop_locked()

    def _send_quietly(self, payload):
        with self._cv:
            if not self._closed:
                self._send_locked(payload)

    def _check_open(self):
        if self._closed:
            raise QuotaUnavailable("this HostQuota is closed (or was inherited through fork): "
                                   "connect again", "closed")

    # ---- connection ----

    def _drop_locked(self):
        if self._sock is not None:
            try:
                # shutdown first: it wakes the watcher's poll(), close() alone does not.
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None
        self._buf = bytearray()
        # Releases in flight are done: the dead server took them with it.
        for req, (_frame, release) in list(self._pending.items()):
            if release:
                self._replies[req] = (OK, req)
        self._cv.notify_all()

    def _reconnect_locked(self, deadline):
        # Single flight: the watcher and a caller may both get here, and cv.wait()
        # below lets the other in. Whoever connects first wins; the other returns.
        # (Replacing a live socket would leave its session, and what the server
        # granted it, alive for as long as anything still references that socket.)
        delay = 0.002
        if time.monotonic() - self._connected_at < 0.1:
            # The last connection was hung up at once (refused, not a server that died:
            # a server of another protocol version, a squatter): back off instead of
            # reconnecting in a hot loop.
            self._hangup_delay = min(max(self._hangup_delay * 2, 0.002), 0.05)
            self._cv.wait(self._hangup_delay)
        else:
            self._hangup_delay = 0.0
        while True:
            self._check_open()
            if self._sock is not None:
                return
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self._path)
            except OSError as e:
                sock.close()
                if time.monotonic() >= deadline:
                    raise QuotaUnavailable(
                        "no host quota server at %s (%s): start an Elixir VM with "
                        "config :snakepit_shm, host_quota: ... (it serves)"
                        % (self._path, e.strerror), "unavailable") from None
                self._cv.wait(delay)
                delay = min(delay * 2, 0.05)
                continue
            # Reads block (no Python timeout: one syscall per read) but wake each second.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _RCVTIMEO)
            self._sock = sock
            self._connected_at = time.monotonic()
            self._buf = bytearray()
            frames = [encode_hello(self._client_id, os.getpid(), self._label)]
            frames += [encode_define(0, n.encode(), lim, if_absent=True)
                       for n, lim in self._limits.items()]
            frames += [encode_declare(0, res_id, name.encode(), amount,
                                      self._limits.get(name, 0))
                       for res_id, (name, amount, _ref) in self._held.items()]
            frames += [f for _req, (f, release) in sorted(self._pending.items()) if not release]
            try:
                sock.sendall(b"".join(struct.pack(">I", len(f)) + f for f in frames))
            except OSError:
                # Hung up before it read our HELLO: refused, back off as above.
                self._drop_locked()
                self._cv.wait(delay)
                delay = min(delay * 2, 0.05)
                continue
            self._cv.notify_all()
            return

    def _watch_socket(self):
        """The watcher's wait for its turn: the socket to watch, or None once closed."""
        with self._cv:
            while True:
                while self._reading and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return None
                if self._sock is not None:
                    return self._sock
                try:
                    self._reconnect_locked(time.monotonic() + 1.0)
                except QuotaError:
                    pass

    def _watch_hangup(self, sock):
        """The watched socket hung up: reconnect, unless a reader handles it."""
        with self._cv:
            if self._sock is sock and not self._reading and not self._closed:
                self._drop_locked()
                try:
                    self._reconnect_locked(time.monotonic() + 1.0)
                except QuotaError:
                    pass
            elif self._reading:
                # The reader sees the hang-up itself; wait until it has.
                self._cv.wait(0.05)

    def _forked(self):
        self._closed = True
        self._held = {}
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None
        self._cv = threading.Condition()
