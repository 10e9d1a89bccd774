"""Process identity: (pid, start time) pairs as recorded in the holder table."""

import errno
import os
import select
import threading

from . import errors


class ProcUnreadable(errors.SnakepitShmError):
    """/proc/<pid>/stat could not be read for a reason that says nothing about the
    process (out of file descriptors, /proc not mounted): whether it runs is unknown."""


def process_start_time(pid):
    """Return field 22 of /proc/<pid>/stat (start time in clock ticks since boot).

    The command name (field 2) may contain spaces and parentheses, so the fields are
    counted from the last ')'.
    """
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as stat:
            content = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        raise errors.SnakepitShmError(
            f"process {pid} does not exist (no /proc/{pid}/stat)") from None
    except OSError as exc:
        hint = (": this process is out of file descriptors; raise the limit (ulimit -n, "
                "LimitNOFILE=) or close files and regions"
                if exc.errno in (errno.EMFILE, errno.ENFILE) else "")
        raise ProcUnreadable(
            f"cannot read /proc/{pid}/stat: {exc.strerror}{hint}") from None
    fields = content[content.rindex(b")") + 2:].split()
    # fields[0] is field 3 (state), so field 22 is fields[19].
    return int(fields[19])


_pid = os.getpid()


def pid():
    """This process's id: os.getpid() is a system call (about 1.3 µs on a VM), and the
    attach and close of a region asked it five times. Cached, and reset in a child of
    os.fork() (multiprocessing's fork and forkserver children included) by the hook
    below, which runs before any other of this package (registered first)."""
    return _pid


def _reset_pid_in_child():
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_reset_pid_in_child)


_identity = None


def self_identity():
    """Return (pid, start_time) of this process, recomputed after a fork."""
    global _identity
    pid = _pid
    if _identity is None or _identity[0] != pid:
        _identity = (pid, process_start_time(pid))
    return _identity


_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
_boot_id = None


def boot_id():
    """Return this host's boot id as 16 bytes, or None if unreadable (read once: a
    process never outlives the boot it started in)."""
    global _boot_id
    if _boot_id is None:
        try:
            with open(_BOOT_ID_PATH, "rb") as source:
                _boot_id = bytes.fromhex(source.read().decode().strip().replace("-", ""))
        except (OSError, ValueError):
            return None
    return _boot_id


# pid -> (start_time, pidfd): processes seen running with that start time. A pidfd
# names one process for good (a reused pid is another process), and becomes readable
# when that process exits: one poll() instead of reading /proc/<pid>/stat each time.
_alive = {}
_alive_lock = threading.Lock()
_ALIVE_CACHE_LIMIT = 64


def running(pid, start_time):
    """True if process ``pid`` runs and started at ``start_time`` (clock ticks)."""
    with _alive_lock:
        known = _alive.get(pid)
        if known is not None and known[2] == _pid:
            if known[0] == start_time and not _exited(known[1]):
                return True
            _forget(pid)
    pidfd = _pidfd_open(pid)
    try:
        started = process_start_time(pid)
    except ProcUnreadable:
        # Nothing says it is gone (out of descriptors, typically): never call a live
        # VM dead for that (a false OrphanedRegionWarning); ask again next time.
        if pidfd is not None:
            os.close(pidfd)
        return True
    except (errors.SnakepitShmError, OSError, ValueError, IndexError):
        started = None
    if started != start_time or pidfd is None:
        if pidfd is not None:
            os.close(pidfd)
        return started == start_time
    with _alive_lock:
        if pid in _alive:
            _forget(pid)
        if len(_alive) >= _ALIVE_CACHE_LIMIT:
            _forget(next(iter(_alive)))
        _alive[pid] = (start_time, pidfd, _pid)
    return True


def _forget(pid):
    _, pidfd, owner = _alive.pop(pid)
    if owner == _pid:  # a forked child's copy is closed with the child
        try:
            os.close(pidfd)
        except OSError:
            pass


def _pidfd_open(pid):
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        fd = opener(pid)
    except OSError:
        return None
    os.set_inheritable(fd, False)
    return fd


def _exited(pidfd):
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True
