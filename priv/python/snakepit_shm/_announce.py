"""Holder announcements: tell the Elixir VM that this process took or dropped a hold.

The VM learns of a new OS holder by this event instead of polling every region's
header (docs/ARCHITECTURE.md, "Events, not polling").  An announcement is one
non-blocking ``sendto`` of a small datagram on a cached Unix socket to the VM's event
socket; it only tells the VM *which region to look at*.  What the VM then believes
comes from the region's header and the kernel's locks, never from the datagram, so a
lost, duplicated or forged announcement costs a header read and nothing else.

Where the socket is:

  * ``SNAKEPIT_SHM_EVENTS`` (set by the VM in its own environment, so every worker it
    spawns inherits it): the socket of the VM that started this worker;
  * the socket of the region's creator, ``<dir>/ev-<pid>-<start_time>.sock`` in the
    private runtime directory (resolved like the host quota directory, docs/QUOTA.md).

Every failure (no VM listening, a full queue, no directory) is silent: announcing is
an optimisation of promptness, never a condition of attaching.
"""

import os
import socket
import stat

from . import _proc

PREFIX_ATTACH = b"A"
PREFIX_RELEASE = b"R"

_sock = None
_sock_pid = None
_dir = None


def _private_dir():
    """The quota directory if it is a real directory of our uid with no group/other
    bits (as the VM requires of it), else None: a directory someone else controls (the
    world-writable /tmp fallback made by another user, or opened to others) would let
    them bind the creator's socket name and read which regions this worker attaches."""
    global _dir
    if _dir is None:
        from . import quota  # only on the first announcement
        path = quota.default_dir()
        try:
            info = os.lstat(path)
        except (OSError, ValueError):
            return None  # not made yet (no VM uses it): look again next time
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() \
                or info.st_mode & 0o077:
            return None
        _dir = path
    return _dir


def creator_path(creator_pid, creator_start_time):
    """The event socket of the VM with this OS identity (None: no private directory)."""
    directory = _private_dir()
    if directory is None:
        return None
    return os.path.join(directory, "ev-%d-%d.sock" % (creator_pid, creator_start_time))


_targets = {}


def targets(creator_pid, creator_start_time):
    """The socket paths to announce to for a region of this creator (0, 1 or 2)."""
    inherited = os.environ.get("SNAKEPIT_SHM_EVENTS")
    key = (creator_pid, creator_start_time, inherited)
    found = _targets.get(key)
    if found is None:
        mine = creator_path(creator_pid, creator_start_time)
        found = tuple(p for p in (mine, inherited) if p)
        if mine == inherited and mine:
            found = (mine,)
        if mine is None:
            return found  # not cached: the directory may be made later
        if len(_targets) > 256:  # creators of a long-lived worker: keep it bounded
            _targets.clear()
        _targets[key] = found
    return found


def _socket():
    global _sock, _sock_pid
    pid = _proc.pid()
    if _sock is None or _sock_pid != pid:
        # After a fork the child makes its own (sharing one is harmless, but cheap to
        # avoid, and the parent may close it).
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        _sock, _sock_pid = sock, pid
    return _sock


def announce(paths, kind, region_id):
    """Send ``kind + region_id`` to each path; never raises, never blocks."""
    try:
        sock = _socket()
        payload = kind + region_id.encode()
    except (OSError, UnicodeError):
        return
    for path in paths:
        try:
            sock.sendto(payload, path)
        except OSError:
            pass
