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

PREFIX_ATTACH = b"A"
PREFIX_RELEASE = b"R"

_sock = None
_sock_pid = None
_dir = None


def creator_path(creator_pid, creator_start_time):
    """The event socket of the VM with this OS identity."""
    global _dir
    if _dir is None:
        from . import quota  # only on the first announcement
        _dir = quota.default_dir()
    return os.path.join(_dir, "ev-%d-%d.sock" % (creator_pid, creator_start_time))


_targets = {}


def targets(creator_pid, creator_start_time):
    """The socket paths to announce to for a region of this creator (1 or 2)."""
    inherited = os.environ.get("SNAKEPIT_SHM_EVENTS")
    key = (creator_pid, creator_start_time, inherited)
    found = _targets.get(key)
    if found is None:
        mine = creator_path(creator_pid, creator_start_time)
        found = (mine, inherited) if inherited and inherited != mine else (mine,)
        if len(_targets) > 256:  # creators of a long-lived worker: keep it bounded
            _targets.clear()
        _targets[key] = found
    return found


def _socket():
    global _sock, _sock_pid
    pid = os.getpid()
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
