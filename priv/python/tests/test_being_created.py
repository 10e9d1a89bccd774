"""A named region whose creator is still creating it (encrypted regions are created in
slices, so that can take seconds): attach() says busy, not corrupt."""

import fcntl
import os
import secrets
import struct

import pytest

import snakepit_shm
from snakepit_shm import errors


def _flock(kind):
    # struct flock on Linux x86_64/aarch64: short l_type, l_whence; off_t l_start, l_len;
    # pid_t l_pid (0 for OFD locks), padding.
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 1, 0)


@pytest.fixture
def headerless_segment():
    region_id = "spshm_n_bc" + secrets.token_hex(4)
    path = f"/dev/shm/{region_id}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 8192)  # sized, header not published yet (zero magic)
        yield region_id, fd
    finally:
        os.close(fd)
        os.unlink(path)


def test_attach_while_the_creator_holds_the_segment_is_busy(headerless_segment):
    region_id, fd = headerless_segment
    # The creator's shared liveness lock, as the VM takes it before sizing the segment.
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK))
    with pytest.raises(errors.RegionBusy, match="still creating it"):
        snakepit_shm.attach(region_id)


def test_attach_of_a_headerless_segment_nobody_holds_is_corrupt(headerless_segment):
    region_id, _ = headerless_segment
    with pytest.raises(errors.CorruptRegion, match="not published"):
        snakepit_shm.attach(region_id)
