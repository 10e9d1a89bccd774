"""Bare-id lookups through the runtime index (issue 14): no scan of /proc/*/fd while the
VM's index names the region, and nothing in the index can make a worker open the wrong
region."""

import os
import shutil
import time

import pytest

import snakepit_shm
from snakepit_shm import _locate
from conftest import private_index, requires_lib
from test_stale import _start_peer

pytestmark = requires_lib


@pytest.fixture(scope="module")
def peer():
    running = _start_peer()
    yield running
    running.stop()


@pytest.fixture
def no_scan(monkeypatch):
    """Make the /proc scan fail loudly: a lookup that still works used the index."""
    def scan(uid):
        raise AssertionError("the /proc/*/fd scan ran")
        yield  # pragma: no cover - a generator, as the real one

    monkeypatch.setattr(_locate, "_pids_of_uid", scan)


def _entry_path(region_id):
    return os.path.join(_locate.index_dir(), region_id)


def test_the_vm_lists_each_memfd_region_and_removes_it_on_deallocation(peer):
    ref = peer.create(4096, "memfd")
    region_id = ref["region_id"]
    entry = _locate.index_entry(region_id)
    assert entry == ("memfd", ref["control_path"], ref["data_path"], 0, 4096)
    info = os.lstat(_locate.index_dir())
    assert info.st_uid == os.geteuid() and info.st_mode & 0o777 == 0o700
    peer.ok("deallocate", region_id)
    assert not os.path.lexists(_entry_path(region_id))
    with pytest.raises(snakepit_shm.RegionNotFound):
        snakepit_shm.attach(region_id)


def test_bare_id_attach_needs_no_scan(peer, no_scan):
    ref = peer.create(8192, "memfd")
    with snakepit_shm.attach(ref["region_id"], mode="rw") as region:
        region.write(0, b"by bare id")
        assert region.size == 8192 and region.held
        assert region.ref["control_path"] == ref["control_path"]
    peer.ok("deallocate", ref["region_id"])


def test_bare_id_lookup_is_fast_with_many_live_regions(peer):
    refs = [peer.create(4096, "memfd") for _ in range(200)]
    region_id = refs[100]["region_id"]
    samples = []
    for _ in range(50):
        started = time.perf_counter()
        _locate.find_by_id(region_id)
        samples.append(time.perf_counter() - started)
    # Behaviour, not speed: the index answers; a generous bound catches a scan anyway.
    assert sorted(samples)[25] < 0.05
    for ref in refs:
        peer.ok("deallocate", ref["region_id"])


def test_an_entry_naming_another_region_falls_back_to_the_scan(peer):
    ref = peer.create(4096, "memfd")
    other = peer.create(4096, "memfd")
    path = _entry_path(ref["region_id"])
    os.unlink(path)
    # Hostile (same user): the entry of ref points at the other region's memfds.
    os.symlink(f"spshm1 memfd {other['control_path']} {other['data_path']} 0 4096", path)
    with snakepit_shm.attach(ref["region_id"]) as region:
        assert region.region_id == ref["region_id"]
        assert region.ref["control_path"] == ref["control_path"]
    for r in (ref, other):
        peer.ok("deallocate", r["region_id"])


def test_a_stale_entry_never_opens_a_reused_descriptor(peer):
    ref = peer.create(4096, "memfd")
    path = _entry_path(ref["region_id"])
    os.unlink(path)
    # A dead VM's entry: its descriptor numbers now name something else (our stdin).
    os.symlink(f"spshm1 memfd /proc/{os.getpid()}/fd/0 /proc/{os.getpid()}/fd/0 0 4096",
               path)
    with snakepit_shm.attach(ref["region_id"]) as region:
        assert region.ref["control_path"] == ref["control_path"]
    peer.ok("deallocate", ref["region_id"])


@pytest.mark.parametrize("text", ["garbage", "spshm1 memfd /etc/passwd /etc/passwd 0 1",
                                  "spshm2 memfd /proc/1/fd/1 /proc/1/fd/2 0 1",
                                  "spshm1 memfd /proc/1/fd/1 /proc/1/fd/2 x 1",
                                  # isdigit() digits that int() refuses (ValueError
                                  # escaped from attach), and a number beyond u64
                                  "spshm1 memfd /proc/1/fd/1 /proc/1/fd/2 \u00b2 1",
                                  "spshm1 memfd /proc/1/fd/1 /proc/1/fd/2 0 \u0661",
                                  "spshm1 memfd /proc/1/fd/1 /proc/1/fd/2 0 " + "9" * 30,
                                  "", "fifo"])
def test_malformed_entries_are_ignored(tmp_path, monkeypatch, text):
    directory = private_index(tmp_path, monkeypatch)
    region_id = "spshm_" + "a" * 20
    if text == "fifo":
        os.mkfifo(directory / region_id)  # never opened: readlink refuses it
    elif text:
        os.symlink(text, directory / region_id)
    else:
        (directory / region_id).write_text("a regular file is not an entry")
    assert _locate.index_entry(region_id) is None
    assert _locate.index_hint(region_id) is None


def test_a_directory_open_to_others_is_not_trusted(peer, tmp_path, monkeypatch, no_scan):
    ref = peer.create(4096, "memfd")
    directory = private_index(tmp_path, monkeypatch)
    os.symlink(f"spshm1 memfd {ref['control_path']} {ref['data_path']} 0 4096",
               directory / ref["region_id"])
    with snakepit_shm.attach(ref["region_id"]) as region:  # ours and 0700: used
        assert region.size == 4096
    for opened in (directory, directory.parent):  # the namespace's, then the base
        os.chmod(opened, 0o755)
        with pytest.raises(AssertionError, match="scan ran"):
            snakepit_shm.attach(ref["region_id"])
        os.chmod(opened, 0o700)
    directory = directory.parent
    link = tmp_path / "link"
    os.symlink(directory, link)  # a symlink to a good directory is not the directory
    monkeypatch.setenv(_locate.RUNTIME_DIR_ENV, str(link))
    with pytest.raises(AssertionError, match="scan ran"):
        snakepit_shm.attach(ref["region_id"])
    shutil.rmtree(directory)
    peer.ok("deallocate", ref["region_id"])


def test_the_directory_falls_back_to_the_scan_when_missing(peer, tmp_path, monkeypatch):
    ref = peer.create(4096, "memfd")
    monkeypatch.setenv(_locate.RUNTIME_DIR_ENV, str(tmp_path / "missing"))
    with snakepit_shm.attach(ref["region_id"]) as region:
        assert region.region_id == ref["region_id"]
    peer.ok("deallocate", ref["region_id"])


def test_the_naming_rule_of_the_namespace_directory():
    # One rule on every side (runtime_index::namespace_dir_name_of, docs/FORMAT.md).
    assert _locate.namespace_dir_name("pid:[4026531836]") == "pidns-4026531836"
    for bad in ["", "pid:[]", "pid:[12a]", "net:[4026531836]", "pid:[1/..]",
                "pid:[4026531836", "pid:[123456789012345678901]"]:
        assert _locate.namespace_dir_name(bad) is None, bad
    link = os.readlink("/proc/self/ns/pid")
    assert _locate.namespace_dir_name() == "pidns-" + link[5:-1]
    assert _locate.index_dir() == _locate.runtime_dir() + "/pidns-" + link[5:-1]


def test_entries_of_the_vm_are_in_its_namespace_directory(peer):
    ref = peer.create(4096, "memfd")
    assert os.readlink(_entry_path(ref["region_id"])).startswith("spshm1 memfd ")
    top = os.path.join(_locate.runtime_dir(), ref["region_id"])
    assert not os.path.lexists(top)
    peer.ok("deallocate", ref["region_id"])
