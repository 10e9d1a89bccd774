"""Process identity: (pid, start time) pairs as recorded in the holder table."""

import os

from . import errors


def process_start_time(pid):
    """Return field 22 of /proc/<pid>/stat (start time in clock ticks since boot).

    The command name (field 2) may contain spaces and parentheses, so the fields are
    counted from the last ')'.
    """
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as stat:
            content = stat.read()
    except FileNotFoundError:
        raise errors.SnakepitShmError(
            f"process {pid} does not exist (no /proc/{pid}/stat)") from None
    fields = content[content.rindex(b")") + 2:].split()
    # fields[0] is field 3 (state), so field 22 is fields[19].
    return int(fields[19])


_identity = None


def self_identity():
    """Return (pid, start_time) of this process, recomputed after a fork."""
    global _identity
    pid = os.getpid()
    if _identity is None or _identity[0] != pid:
        _identity = (pid, process_start_time(pid))
    return _identity
