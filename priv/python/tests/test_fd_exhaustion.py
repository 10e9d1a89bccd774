"""A worker out of file descriptors (ulimit -n, a container's LimitNOFILE): found by the
session-4 attack. Reading /proc/<pid>/stat failed with EMFILE and the client took the
region's live creator for dead (a false OrphanedRegionWarning: "nobody will read what
this worker writes"); the failed mapping then advised `ulimit -v`; and a first attach
raised a bare OSError."""

import contextlib
import os
import struct
import subprocess
import warnings

import pytest

import _forge
import snakepit_shm
from snakepit_shm import _format as F
from snakepit_shm import _proc
from conftest import requires_lib

pytestmark = requires_lib


@contextlib.contextmanager
def descriptors_left(n):
    """Fill this process's descriptor table but for ``n`` free slots."""
    junk = []
    try:
        while True:
            junk.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    for fd in junk[len(junk) - n:]:
        os.close(fd)
    del junk[len(junk) - n:]
    try:
        yield
    finally:
        for fd in junk:
            os.close(fd)


@pytest.fixture
def live_creator():
    child = subprocess.Popen(["sleep", "60"])
    try:
        yield child.pid, _forge.start_time(child.pid)
    finally:
        child.kill()
        child.wait()


def test_a_live_process_is_not_dead_when_proc_cannot_be_read(live_creator):
    pid, started = live_creator
    with descriptors_left(0):
        assert _proc.running(pid, started)
        with pytest.raises(_proc.ProcUnreadable, match="ulimit -n"):
            _proc.process_start_time(pid)
    # and a process that is gone is still gone
    assert not _proc.running(pid, started + 1)


def test_attach_out_of_descriptors_blames_the_limit_not_the_owner(forge, live_creator):
    pid, started = live_creator
    seg = forge.posix(4096, data=b"x" * 4096)
    header = bytearray(seg.header)
    struct.pack_into("<I", header, F.FIELD["creator_pid"][0], pid)
    struct.pack_into("<Q", header, F.FIELD["creator_start_time"][0], started)
    _forge.recrc(header)
    with open(seg.control_path, "r+b") as f:
        f.write(bytes(header))
    _proc.self_identity()  # this process's own identity is known before the limit
    # Enough to open and map the header, not enough for /proc and the data mapping.
    for free in (1, 2, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with descriptors_left(free):
                try:
                    region = snakepit_shm.attach(seg.region_id)
                except snakepit_shm.SnakepitShmError as exc:
                    assert "ulimit -n" in str(exc) or "descriptor" in str(exc), exc
                    assert "ulimit -v" not in str(exc), exc
                else:
                    region.close()
    with snakepit_shm.attach(seg.region_id) as region:
        assert bytes(region.buf[:1]) == b"x"
