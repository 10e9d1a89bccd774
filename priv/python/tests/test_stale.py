"""Stale states are loud (issue 13, Seen 3, 4 and 7), against a real Elixir VM."""

import gc
import os
import signal
import warnings

import pytest

import _forge
import snakepit_shm
from snakepit_shm import _format as F
from conftest import requires_lib
from test_real_regions import Peer, _peer_command

pytestmark = requires_lib


def _start_peer():
    try:
        argv, env = _peer_command()
    except LookupError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the real-region tests, but {exc}")
        pytest.skip(f"{exc}: run `mix compile` first")
    return Peer(argv, env)


@pytest.fixture(scope="module")
def peer():
    running = _start_peer()
    yield running
    running.stop()


@pytest.mark.parametrize("backend", ["memfd", "posix"])
def test_seen_3_writes_after_deallocation_fail_loudly(peer, backend):
    ref = peer.create(4096, backend)
    with snakepit_shm.attach(ref, mode="rw") as region:
        region.write(0, b"before")
        assert not region.deallocated and region.owner_alive
        peer.ok("deallocate", ref["region_id"])
        assert region.deallocated
        for call in (lambda: region.write(0, b"lost"), region.read, region.ndarray,
                     lambda: region.buf):
            with pytest.raises(snakepit_shm.RegionDeallocated,
                               match=r"deallocated by its owner \(OS process"):
                call()
        # A RegionExpired too: one except clause for both ways a region ends.
        with pytest.raises(snakepit_shm.RegionExpired):
            region.readinto(bytearray(4))


def test_seen_4_reused_fd_number_is_region_not_found(peer):
    ref = peer.create(4096, "memfd")
    peer.ok("drop", ref["region_id"])
    # The next region of the VM reuses the freed descriptor numbers.
    for _ in range(20):
        peer.ok("gc")
        other = peer.create(4096, "memfd")
        if other["control_path"] == ref["control_path"]:
            break
    assert other["control_path"] == ref["control_path"]
    with pytest.raises(snakepit_shm.RegionNotFound, match="reused"):
        snakepit_shm.attach(ref)
    with pytest.raises(snakepit_shm.RegionNotFound):
        snakepit_shm.attach(ref["region_id"])


def test_forged_deallocated_bit(forge):
    seg = forge.memfd(64)
    region = snakepit_shm.attach(seg.ref(), mode="rw")
    seg.set_u32("state", F.STATE_DEALLOCATED)
    with pytest.raises(snakepit_shm.RegionDeallocated, match="fresh region"):
        region.write(0, b"x")
    region.close()


def test_seen_7_orphan_of_a_killed_vm_warns():
    vm = _start_peer()
    ref = vm.create(4096, "posix")
    path = os.path.join("/dev/shm", ref["region_id"])
    try:
        os.kill(vm.process.pid, signal.SIGKILL)
        vm.process.wait(timeout=60)
        with pytest.warns(snakepit_shm.OrphanedRegionWarning, match="orphan"):
            region = snakepit_shm.attach(ref)
        assert not region.owner_alive and not region.deallocated
        assert region.read(0, 3) == bytes([3, 10, 17])  # the data is intact
        region.close()
    finally:
        vm.process.stdin.close()
        _forge.CREATED_IDS.discard(ref["region_id"])
        if os.path.exists(path):
            os.unlink(path)
        gc.collect()


def test_live_owner_does_not_warn(peer):
    ref = peer.create(4096, "posix")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with snakepit_shm.attach(ref) as region:
            assert region.owner_alive
