"""The fast attach of memfd regions (issue 14): one library call opens, locks and
validates; every refusal falls back to the step-by-step path and its messages."""

import os

import pytest

import snakepit_shm
from snakepit_shm import _attach, _locate, _native
from conftest import requires_lib
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
