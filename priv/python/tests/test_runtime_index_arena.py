"""Bare-id lookups of arena regions through the runtime index: the VM's background
writer lists each small region as an `arena` entry (docs/FORMAT.md "Runtime index"),
a worker finds it without scanning /proc/*/fd or walking arenas, and no stale or
forged entry can make it open another region."""

import os

import pytest

import snakepit_shm
from snakepit_shm import _locate
from conftest import private_index, requires_lib
from test_real_regions import pattern
from test_stale import _start_peer

pytestmark = requires_lib


@pytest.fixture(scope="module")
def peer():
    running = _start_peer()
    yield running
    running.stop()


@pytest.fixture
def no_scan(monkeypatch):
    """Make the /proc scan and the arena walk fail loudly: a lookup that still works
    used the index."""
    def scan(uid):
        raise AssertionError("the /proc/*/fd scan ran")
        yield  # pragma: no cover - a generator, as the real one

    def walk(path, region_id):
        raise AssertionError("an arena walk ran")

    monkeypatch.setattr(_locate, "_pids_of_uid", scan)
    monkeypatch.setattr(_locate, "_find_in_arena", walk)


def _arena(peer, size=4096):
    ref = peer.create(size, "arena")
    assert "control_offset" in ref and ref["control_path"] == ref["data_path"]
    return ref


def _entry_text(ref, offset=None, size=None):
    offset = ref["control_offset"] if offset is None else offset
    size = ref["size"] if size is None else size
    return f"spshm1 arena {ref['control_path']} {ref['data_path']} {offset} {size}"


@pytest.fixture
def forged_dir(tmp_path, monkeypatch):
    """A private index directory of this worker (the VM keeps writing its own)."""
    return private_index(tmp_path, monkeypatch)


def test_the_vm_lists_an_arena_region_and_removes_it_on_deallocation(peer):
    ref = _arena(peer, 5000)
    peer.ok("flush")
    entry = _locate.index_entry(ref["region_id"])
    assert entry == ("arena", ref["control_path"], ref["data_path"], ref["control_offset"],
                     5000)
    peer.ok("deallocate", ref["region_id"])
    peer.ok("flush")
    assert _locate.index_entry(ref["region_id"]) is None


def test_bare_id_attach_of_an_arena_region_needs_no_scan(peer, no_scan):
    refs = [_arena(peer) for _ in range(5)]
    ref = refs[3]
    peer.ok("flush")
    with snakepit_shm.attach(ref["region_id"]) as region:
        assert region.read(0, 4096) == pattern(4096)
        assert region.region_id == ref["region_id"]
        assert region.ref["control_path"] == ref["control_path"]
    assert _locate.find_by_id(ref["region_id"]).control_offset == ref["control_offset"]
    for r in refs:
        peer.ok("deallocate", r["region_id"])


def test_a_region_freed_before_its_entry_was_written_leaves_none(peer):
    ref = _arena(peer)
    peer.ok("deallocate", ref["region_id"])
    peer.ok("flush")
    assert _locate.index_entry(ref["region_id"]) is None


def test_a_stale_entry_of_a_reused_chunk_never_attaches_the_new_region(peer, forged_dir):
    old = _arena(peer)
    peer.ok("deallocate", old["region_id"])
    peer.ok("gc")
    new = _arena(peer)
    # The freed chunk is reused (or another one is: the entry names old's chunk anyway).
    os.symlink(_entry_text(old), forged_dir / old["region_id"])
    assert _locate._indexed(old["region_id"]) is None
    with pytest.raises(snakepit_shm.RegionNotFound):
        snakepit_shm.attach(old["region_id"])
    # The entry of the new region names the same chunk and is believed: the id matches.
    os.symlink(_entry_text(new), forged_dir / new["region_id"])
    assert _locate._indexed(new["region_id"]).control_offset == new["control_offset"]
    peer.ok("deallocate", new["region_id"])


def test_an_entry_of_a_deallocated_region_is_not_believed(peer, forged_dir):
    ref = _arena(peer)
    keep = _arena(peer)  # keeps the arena (and its descriptor) alive
    os.symlink(_entry_text(ref), forged_dir / ref["region_id"])
    assert _locate._indexed(ref["region_id"]) is not None
    peer.ok("deallocate", ref["region_id"])  # the header says deallocated now
    assert _locate._indexed(ref["region_id"]) is None
    peer.ok("deallocate", keep["region_id"])


def test_forged_entries_fall_back_to_the_scan_and_find_the_right_region(peer, forged_dir):
    ref = _arena(peer, 4096)
    other = _arena(peer, 4096)
    proc = f"/proc/{os.getpid()}/fd/0"
    forgeries = [
        _entry_text(ref, offset=other["control_offset"]),      # another region's chunk
        _entry_text(ref, offset=ref["control_offset"] + 100),  # not a chunk boundary
        _entry_text(ref, offset=ref["control_offset"] + 4096),  # its data, not its header
        _entry_text(ref, offset=1 << 40),                      # beyond the arena
        _entry_text(ref, offset=(1 << 64) + ref["control_offset"]),  # wraps in C
        f"spshm1 arena {proc} {proc} 0 4096",                  # not an arena memfd
        f"spshm1 arena {ref['control_path']} {proc} {ref['control_offset']} 4096",
        f"spshm1 arena /etc/passwd /etc/passwd {ref['control_offset']} 4096",
        f"spshm1 arena {ref['control_path']} {ref['data_path']} -4096 4096",
    ]
    path = forged_dir / ref["region_id"]
    for text in forgeries:
        if os.path.lexists(path):
            os.unlink(path)
        os.symlink(text, path)
        assert _locate._indexed(ref["region_id"]) is None, text
        with snakepit_shm.attach(ref["region_id"]) as region:  # through the scan
            assert region.read(0, 4096) == pattern(4096), text
            assert region.region_id == ref["region_id"], text
        assert _locate.find_by_id(ref["region_id"]).control_offset == \
            ref["control_offset"], text
    # An offset that would wrap to the region's own in a C uint64 is not even tried.
    os.unlink(path)
    os.symlink(_entry_text(ref, offset=(1 << 64) + ref["control_offset"]), path)
    assert _locate.arena_hint(ref["region_id"]) is None
    for r in (ref, other):
        peer.ok("deallocate", r["region_id"])


def test_an_entry_in_a_directory_open_to_others_is_not_used(peer, forged_dir, no_scan):
    ref = _arena(peer)
    os.symlink(_entry_text(ref), forged_dir / ref["region_id"])
    with snakepit_shm.attach(ref["region_id"]) as region:
        assert region.size == 4096
    os.chmod(forged_dir, 0o755)
    with pytest.raises(AssertionError, match="scan ran"):
        snakepit_shm.attach(ref["region_id"])
    os.chmod(forged_dir, 0o700)
    peer.ok("deallocate", ref["region_id"])


def test_the_fast_arena_open_checks_what_the_entry_says(peer):
    from snakepit_shm import _native
    library = _native.library()
    ref = _arena(peer)
    other = _arena(peer)
    path, base = ref["control_path"], ref["control_offset"]
    opened = library.attach_arena(path, base, ref["region_id"])
    assert opened is not None
    fd, size, header = opened
    os.close(fd)
    assert header[96:96 + len(ref["region_id"])] == ref["region_id"].encode()
    # Another region's chunk, a prefix of the id, the data page, a non-arena file,
    # beyond the arena: refused, nothing left open.
    before = len(os.listdir("/proc/self/fd"))
    assert library.attach_arena(path, other["control_offset"], ref["region_id"]) is None
    assert library.attach_arena(path, base, ref["region_id"][:-1]) is None
    assert library.attach_arena(path, base + 4096, ref["region_id"]) is None
    assert library.attach_arena(f"/proc/{os.getpid()}/fd/0", 0, ref["region_id"]) is None
    assert library.attach_arena(path, size, ref["region_id"]) is None
    assert library.attach_arena(path, 1 << 62, ref["region_id"]) is None
    assert len(os.listdir("/proc/self/fd")) == before
    for r in (ref, other):
        peer.ok("deallocate", r["region_id"])


def test_a_read_write_bare_id_attach_of_an_arena_region_writes_the_vm_sees(peer, no_scan):
    ref = _arena(peer)
    peer.ok("flush")
    with snakepit_shm.attach(ref["region_id"], mode="rw") as region:
        region.write(0, b"\x01\x02\x03")
        assert region.held
        _, holders = peer.holds(ref["region_id"])
        assert holders.get(os.getpid(), (0, False))[0] == 1
    assert peer.ok("read", ref["region_id"], 0, 3) == "010203"
    peer.ok("deallocate", ref["region_id"])
    peer.ok("flush")
    with pytest.raises(AssertionError, match="scan ran"):  # no entry: it would scan
        snakepit_shm.attach(ref["region_id"])


def test_a_deallocated_region_is_not_attached_through_its_entry(peer, forged_dir):
    ref = _arena(peer)
    keep = _arena(peer)
    os.symlink(_entry_text(ref), forged_dir / ref["region_id"])
    peer.ok("deallocate", ref["region_id"])
    with pytest.raises(snakepit_shm.SnakepitShmError):
        snakepit_shm.attach(ref["region_id"])
    peer.ok("deallocate", keep["region_id"])
