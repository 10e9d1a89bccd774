"""This worker's presence to the VMs of the host (docs/FORMAT.md, "Presence sockets").

A POSIX output (``snakepit_shm.allocate(..., backend="posix")``) is a file in the shm
directory that outlives a worker killed with SIGKILL before a VM adopted it.  Every VM
running snakepit_shm listens on a Unix socket in ``<shm dir>/snakepit_shm-<euid>/vms/``;
before its first POSIX output a worker connects to each of them and says who it is (the
identity its segment headers give their creator).  The kernel closes those connections
when the worker dies, however it dies, and the VMs then sweep the outputs nobody holds
any more, at once instead of at the next VM start.

Best effort: without the directory (no VM running, another user's directory, a
read-only filesystem) nothing is connected and outputs are swept as before.  The worker
never reads from these sockets; a VM sends one small hello that stays in the buffer.
"""

import json
import os
import socket
import stat
import struct
import threading

from . import _proc

_PREFIX = "vm-"
_SUFFIX = ".sock"
_CONNECT_TIMEOUT = 1.0

_lock = threading.Lock()
_sockets = []
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
    """Connect this process to every VM present in ``shm_dir``'s presence directory
    (once per process, and again in a forked child).  Never raises: presence only makes
    sweeps sooner."""
    global _joined_pid
    pid = os.getpid()
    with _lock:
        if _joined_pid == pid:
            return len(_sockets)
        _joined_pid = pid
        vms = directory(shm_dir)
        if not (_private_dir(os.path.dirname(vms)) and _private_dir(vms)):
            return 0
        try:
            names = sorted(n for n in os.listdir(vms)
                           if n.startswith(_PREFIX) and n.endswith(_SUFFIX))
            hello = _hello()
        except (OSError, ValueError):
            return 0
        if hello is None:
            return 0
        for name in names:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(_CONNECT_TIMEOUT)
                sock.connect(os.path.join(vms, name))
                sock.sendall(hello)
            except OSError:
                # A dead VM's socket (refused), a VM too busy to accept: skip it.
                sock.close()
                continue
            _sockets.append(sock)
        return len(_sockets)


def connected():
    """How many VMs this process is connected to (for tests and diagnostics)."""
    with _lock:
        return len(_sockets) if _joined_pid == os.getpid() else 0


def _forget_in_child():
    # The parent's connections must close with the parent: a child keeping them open
    # would hide the parent's death from the VMs. The child joins on its own if it
    # makes a POSIX output.
    global _joined_pid, _sockets, _lock
    _lock = threading.Lock()
    for sock in _sockets:
        try:
            sock.close()
        except OSError:
            pass
    _sockets = []
    _joined_pid = None


os.register_at_fork(after_in_child=_forget_in_child)
