"""This worker's presence to the VMs of the host (docs/FORMAT.md, "Presence sockets").

A POSIX output (``snakepit_shm.allocate(..., backend="posix")``) is a file in the shm
directory that outlives a worker killed with SIGKILL before a VM adopted it.  Every VM
running snakepit_shm listens on a Unix socket in ``<shm dir>/snakepit_shm-<euid>/vms/``;
before each POSIX output a worker connects to each of them it is not connected to yet (a
VM started since, a VM whose presence restarted under a new name) and says who it is
(the identity its segment headers give their creator).  The kernel closes those connections
when the worker dies, however it dies, and the VMs then sweep the outputs nobody holds
any more, at once instead of at the next VM start.

Best effort: without the directory (no VM running, another user's directory, a
read-only filesystem) nothing is connected and outputs are swept as before.  The worker
never reads from these sockets; a VM sends one small hello that stays in the buffer.
"""

import json
import os
import select
import socket
import stat
import struct
import threading

from . import _proc

_PREFIX = "vm-"
_SUFFIX = ".sock"
_CONNECT_TIMEOUT = 1.0

_lock = threading.Lock()
_sockets = {}  # socket path -> connection
_refused = set()  # paths nobody listens on: a VM's name never comes back to life
_REFUSED_MAX = 4096
_joined_pid = None


def directory(shm_dir):
    """The presence directory of the shm directory ``shm_dir`` for this user."""
    return os.path.join(shm_dir, f"snakepit_shm-{os.geteuid()}", "vms")


def _private_dir(path):
    """True if ``path`` is a real directory of ours with no group/other permission."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
            and info.st_mode & 0o077 == 0)


def _hello():
    try:
        pid, start_time = _proc.self_identity()
    except Exception:  # no /proc: no identity to give, no presence
        return None
    boot = _proc.boot_id()
    if boot is None:
        return None
    payload = json.dumps({"snakepit_shm_peer": 1, "os_pid": pid, "start_time": start_time,
                          "boot_id": boot.hex()}).encode()
    return struct.pack(">I", len(payload)) + payload


def join(shm_dir):
    """Connect this process to every VM present in ``shm_dir``'s presence directory that
    it is not connected to yet (connections the VM closed are dropped first: its
    presence restarted under a new name); a forked child starts afresh.  Returns how
    many VMs this process is connected to.  Never raises: presence only makes sweeps
    sooner."""
    global _joined_pid
    pid = os.getpid()
    with _lock:
        if _joined_pid != pid:
            _sockets.clear()
            _joined_pid = pid
        _drop_closed()
        vms = directory(shm_dir)
        if not (_private_dir(os.path.dirname(vms)) and _private_dir(vms)):
            return len(_sockets)
        try:
            names = sorted(n for n in os.listdir(vms)
                           if n.startswith(_PREFIX) and n.endswith(_SUFFIX))
        except (OSError, ValueError):
            return len(_sockets)
        paths = [p for p in (os.path.join(vms, n) for n in names)
                 if p not in _sockets and p not in _refused]
        hello = _hello() if paths else None
        if hello is None:
            return len(_sockets)
        for path in paths:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            except OSError:
                break  # out of descriptors: presence is best effort
            try:
                sock.settimeout(_CONNECT_TIMEOUT)
                sock.connect(path)
            except (BlockingIOError, socket.timeout):
                sock.close()  # a VM too busy to accept: try again at the next output
                continue
            except OSError:
                # A dead VM's socket (refused), not a socket, a name too long: never
                # again in this process (a live VM's name is published once it listens).
                sock.close()
                if len(_refused) >= _REFUSED_MAX:
                    _refused.clear()
                _refused.add(path)
                continue
            try:
                sock.sendall(hello)
            except OSError:
                sock.close()  # it closed at once (at its connection limit): next output
                continue
            _sockets[path] = sock
        return len(_sockets)


def _drop_closed():
    """Close the connections whose VM side is gone (hang-up seen without reading: the
    VM's hello may still sit unread in front of the end of file)."""
    if not _sockets or not hasattr(select, "poll"):
        return
    hangup = getattr(select, "POLLRDHUP", 0)  # Linux; elsewhere POLLHUP alone
    poller = select.poll()
    by_fd = {}
    for path, sock in _sockets.items():
        poller.register(sock, hangup)
        by_fd[sock.fileno()] = path
    for fd, events in poller.poll(0):
        if events & (hangup | select.POLLHUP | select.POLLERR | select.POLLNVAL):
            sock = _sockets.pop(by_fd[fd])
            try:
                sock.close()
            except OSError:
                pass


def connected():
    """How many VMs this process is connected to (for tests and diagnostics)."""
    with _lock:
        if _joined_pid != os.getpid():
            return 0
        _drop_closed()
        return len(_sockets)


def _forget_in_child():
    # The parent's connections must close with the parent: a child keeping them open
    # would hide the parent's death from the VMs. The child joins on its own if it
    # makes a POSIX output.
    global _joined_pid, _sockets, _lock
    _lock = threading.Lock()
    for sock in _sockets.values():
        try:
            sock.close()
        except OSError:
            pass
    _sockets = {}
    _joined_pid = None


os.register_at_fork(after_in_child=_forget_in_child)
