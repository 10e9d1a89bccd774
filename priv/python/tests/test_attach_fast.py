"""The fast attach of memfd regions (issue 14): one library call opens, locks and
validates; every refusal falls back to the step-by-step path and its messages."""

import fcntl
import os
import signal
import struct

import pytest

import snakepit_shm
from snakepit_shm import _attach, _locate, _native
from conftest import private_index, requires_lib
from test_stale import _start_peer

pytestmark = requires_lib


@pytest.fixture(scope="module")
def peer():
    running = _start_peer()
    yield running
    running.stop()


def test_a_memfd_region_attaches_in_one_call(peer, monkeypatch):
    ref = peer.create(4096, "memfd")

    def step_by_step(*args):
        raise AssertionError("the step-by-step path ran")

    monkeypatch.setattr(_attach, "_open_control", step_by_step)
    with snakepit_shm.attach(ref, mode="rw") as region:
        region.write(0, b"fast")
        assert region.held and region.read(0, 4) == b"fast"
    peer.ok("deallocate", ref["region_id"])


def test_the_library_refuses_what_the_client_refuses(peer):
    lib = _native.library()
    ref = peer.create(4096, "memfd")
    control, data = _locate.memfd_link_targets(ref["region_id"])
    args = (ref["control_path"], control, ref["data_path"], data, False)
    opened = lib.attach_memfd(*args)
    assert opened is not None
    control_fd, control_size, data_fd, data_size, header = opened
    assert control_size == 4096 and data_size >= 4096 and len(header) == 4096
    os.close(control_fd)
    os.close(data_fd)
    # control and data swapped, another region's name, a descriptor that is not a memfd
    assert lib.attach_memfd(ref["data_path"], control, ref["control_path"], data,
                            False) is None
    other = "/memfd:spshm_" + "a" * 20 + " (deleted)"
    assert lib.attach_memfd(ref["control_path"], other, ref["data_path"], data,
                            False) is None
    assert lib.attach_memfd(f"/proc/{os.getpid()}/fd/0", control, ref["data_path"], data,
                            False) is None
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(20):  # refusals close what they opened
        lib.attach_memfd(ref["control_path"], control, ref["control_path"], data, False)
    assert len(os.listdir("/proc/self/fd")) == fds
    peer.ok("deallocate", ref["region_id"])


def test_a_refused_fast_open_still_explains_itself(peer):
    ref = peer.create(4096, "memfd")
    peer.ok("deallocate", ref["region_id"])
    with pytest.raises(snakepit_shm.RegionNotFound):
        snakepit_shm.attach(ref)


def _lock_state(path, byte):
    """F_OFD_GETLK of ``byte`` through a fresh open of ``path``: the type that blocks a
    write lock (F_UNLCK when nobody holds it)."""
    fd = os.open(path, os.O_RDWR)
    try:
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
        return struct.unpack("hhqqi4x", fcntl.fcntl(fd, 36, query))[0]  # F_OFD_GETLK
    finally:
        os.close(fd)


def _locked_slots(path):
    """The holder slots whose lock some open of the region holds."""
    return {i for i in range(64) if _lock_state(path, 256 + i) != fcntl.F_UNLCK}


def _expected_slot(pid, locked):
    """The slot a claim of ``pid`` takes: the first from pid % 64 on whose lock no other
    open holds.  The VM's own opens keep theirs (its create's map keeps slot 0's lock):
    a worker whose pid % 64 is such a slot goes on to the next one (asserting pid % 64
    itself failed for 1 pid in 64)."""
    return next((pid + k) % 64 for k in range(64) if (pid + k) % 64 not in locked)


def test_close_gives_the_slot_back_with_the_descriptor(peer):
    # close() releases the hold and leaves the slot's lock to the close of the control
    # descriptor (one lock call fewer): after close nothing of it is left, and the next
    # attach of this process takes the same slot again.
    ref = peer.create(4096, "memfd")
    expected = _expected_slot(os.getpid(), _locked_slots(ref["control_path"]))
    region = snakepit_shm.attach(ref, mode="rw")
    slot = region._attachment.slot.value
    assert slot == expected  # a worker's claim starts away from the VM's slots
    assert _lock_state(ref["control_path"], 256 + slot) == fcntl.F_WRLCK
    assert peer.holds(ref["region_id"])[0] == 1
    region.close()
    assert _lock_state(ref["control_path"], 256 + slot) == fcntl.F_UNLCK
    assert peer.holds(ref["region_id"])[0] == 0
    with snakepit_shm.attach(ref) as again:
        assert again._attachment.slot.value == slot
    peer.ok("deallocate", ref["region_id"])


def test_a_data_memfd_held_by_the_pool_reads_as_deallocated(peer, monkeypatch):
    # The warm pool takes byte 0 of a data memfd exclusively while it holds it: the one
    # data lock (the core's, through spshm_lock_data) refuses, on the fast path and on
    # the step-by-step one, and says the region is gone.
    ref = peer.create(4096, "memfd")
    pool = os.open(ref["data_path"], os.O_RDWR)
    try:
        lock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        fcntl.fcntl(pool, 37, lock)  # F_OFD_SETLK
        fds = len(os.listdir("/proc/self/fd"))
        with pytest.raises(snakepit_shm.RegionNotFound, match="was deallocated"):
            snakepit_shm.attach(ref)
        monkeypatch.setattr(_attach, "_fast_open", lambda *args: None)
        with pytest.raises(snakepit_shm.RegionNotFound, match="was deallocated"):
            snakepit_shm.attach(ref)
        assert len(os.listdir("/proc/self/fd")) == fds  # refusals close what they opened
        monkeypatch.undo()
    finally:
        os.close(pool)
    with snakepit_shm.attach(ref) as region:
        assert region.held
    peer.ok("deallocate", ref["region_id"])


def test_a_bare_memfd_id_opens_from_its_index_entry_in_one_call(peer, monkeypatch):
    ref = peer.create(4096, "memfd")

    def refused(*args, **kwargs):
        raise AssertionError("the verified lookup or the step-by-step path ran")

    # The entry is checked by the one call (the memfd links before and after the open),
    # not by a lookup of its own first.
    monkeypatch.setattr(_locate, "_indexed", refused)
    monkeypatch.setattr(_attach, "_open_control", refused)
    with snakepit_shm.attach(ref["region_id"]) as region:
        assert region.held and region.size == 4096
    monkeypatch.undo()
    peer.ok("deallocate", ref["region_id"])


def test_a_forged_index_entry_is_not_believed(peer, tmp_path, monkeypatch):
    # An entry naming another region's memfds: the one call refuses it (the link names
    # the other region), and the verified lookup then finds the region itself.
    ref = peer.create(4096, "memfd")
    other = peer.create(4096, "memfd")
    index = private_index(tmp_path, monkeypatch)
    os.symlink(f"spshm1 memfd {other['control_path']} {other['data_path']} 0 4096",
               index / ref["region_id"])
    with snakepit_shm.attach(ref["region_id"]) as region:
        assert region.region_id == ref["region_id"]
        assert region.ref["control_path"] == ref["control_path"]
    monkeypatch.undo()
    peer.ok("deallocate", ref["region_id"])
    peer.ok("deallocate", other["region_id"])


def test_a_worker_killed_between_its_release_and_its_close_leaves_nothing(peer):
    # The slot's lock is left to the close: a worker SIGKILLed right after the release
    # (before the close) still leaves a free slot whose lock the kernel dropped.
    ref = peer.create(4096, "memfd")
    # The locks held before the fork: only the VM's (the child's pid is not known yet).
    vm_locked = _locked_slots(ref["control_path"])
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            region = snakepit_shm.attach(ref, mode="rw")
            attachment = region._attachment
            slot = attachment.slot.value
            attachment.release(closing=True)
            os.write(ready_w, slot.to_bytes(1, "little"))
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.close(ready_w)
    slot = os.read(ready_r, 1)[0]
    os.close(ready_r)
    os.waitpid(pid, 0)
    # The child's claim started at pid % 64 and skipped the slots the VM keeps locked.
    assert slot == _expected_slot(pid, vm_locked)
    assert _lock_state(ref["control_path"], 256 + slot) == fcntl.F_UNLCK
    assert peer.holds(ref["region_id"]) == (0, {})
    peer.ok("deallocate", ref["region_id"])
