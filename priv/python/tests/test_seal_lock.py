"""The seal lock (docs/FORMAT.md, "Locks" and "Sealing"): a `sealing` bit left by a
sealer killed mid-seal no longer makes a region unwritable for good, and the bit of a
live sealer (one that holds byte 2 of the control object exclusively) is never cleared.
"""

import fcntl
import os
import signal
import struct

import pytest

import snakepit_shm
from snakepit_shm import _format as F
from conftest import requires_lib

pytestmark = requires_lib

_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_STATE = F.FIELD["state"][0]


def _state(region):
    return struct.unpack_from("<I", region._attachment.header_mm, _STATE)[0]


def _set_sealing(region):
    mm = region._attachment.header_mm
    struct.pack_into("<I", mm, _STATE, _state(region) | F.STATE_SEALING)


def _seal_lock(fd, kind):
    request = struct.pack("hhqqi4x", kind, os.SEEK_SET, F.SEAL_LOCK_BYTE, 1, 0)
    fcntl.fcntl(fd, _F_OFD_SETLK, request)


def _control_path(region):
    return region.ref.get("control_path") or os.path.join("/dev/shm", region.region_id)


@pytest.mark.parametrize("backend", ["memfd", "posix"])
def test_a_sealer_killed_mid_seal_leaves_a_bit_the_next_write_clears(backend):
    region = snakepit_shm.allocate(4096, backend=backend)
    try:
        # A "sealer" in another process: its own open of the control object, the seal
        # lock taken, then the bit set (the order every sealer follows), then parked.
        ready_r, ready_w = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child
            try:
                fd = os.open(_control_path(region), os.O_RDWR)
                _seal_lock(fd, fcntl.F_WRLCK)
                _set_sealing(region)
                os.write(ready_w, b"x")
                signal.pause()
            finally:
                os._exit(1)
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"x"
        os.close(ready_r)

        # Alive: its bit stands; the write is refused and clears nothing.
        for _ in range(3):
            with pytest.raises(snakepit_shm.RegionBusy, match="being sealed"):
                region.write(0, b"refused")
            assert _state(region) & F.STATE_SEALING

        # SIGKILLed: the kernel drops its lock; the next write clears the stale bit.
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        assert _state(region) & F.STATE_SEALING
        region.write(0, b"written after")
        assert not _state(region) & F.STATE_SEALING
        assert not region.sealed
        assert region.read(0, 13) == b"written after"
    finally:
        region.close()
        snakepit_shm.discard(region)


def test_a_bit_with_its_lock_held_by_another_open_is_never_cleared():
    region = snakepit_shm.allocate(4096)
    try:
        fd = os.open(_control_path(region), os.O_RDWR)
        try:
            _seal_lock(fd, fcntl.F_WRLCK)
            _set_sealing(region)
            with pytest.raises(snakepit_shm.RegionBusy):
                region.write(0, b"x")
            assert not region._attachment.clear_stale_sealing()
            assert _state(region) & F.STATE_SEALING
            _seal_lock(fd, fcntl.F_UNLCK)  # let go without clearing: as if it died
            region.write(0, b"x")
            assert not _state(region) & F.STATE_SEALING
        finally:
            os.close(fd)
    finally:
        region.close()
        snakepit_shm.discard(region)
