"""Arena regions (docs/FORMAT.md "Arenas") seen from a worker: the layout table, and
attach of a chunk of a forged arena memfd: the control block at control_offset, locks at
that offset, a mapping of the region's own pages only, neighbours untouched."""

import fcntl
import os
import random
import struct

import pytest

import snakepit_shm
from snakepit_shm import _format as F
from snakepit_shm import _native
from snakepit_shm.errors import CorruptRegion

from _forge import build_header, random_region_id, recrc

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
FORMAT_MD = os.path.join(REPO, "docs", "FORMAT.md")
B32 = "abcdefghijklmnopqrstuvwxyz234567"
ARENA_SIZE = 1 << 20

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd: Linux")


def arena_rows():
    rows, inside = {}, False
    with open(FORMAT_MD, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                inside = line.strip() == "## Arenas"
            elif inside and line.startswith("| `"):
                cells = [c.strip(" `") for c in line.strip().strip("|").split("|")]
                rows[cells[0]] = cells[1]
    return rows


def test_arena_table_matches_format_and_library():
    rows = arena_rows()
    assert rows["backend"] == str(F.BACKEND_MEMFD)
    assert rows["flags.arena"] == str(F.FLAG_ARENA)
    assert rows["arena_data_offset"] == str(F.ARENA_DATA_OFFSET)
    assert rows["lock_base"] == "control_offset"
    layout = _native.library().header_layout()
    assert layout["flags"]["arena"] == F.FLAG_ARENA
    assert layout["arena_data_offset"] == F.ARENA_DATA_OFFSET


def arena_header(region_id, size):
    header = build_header(region_id, F.BACKEND_MEMFD, size)
    flags_at = F.FIELD["flags"][0]
    flags = struct.unpack_from("<I", header, flags_at)[0]
    flags = (flags & ~F.FLAG_SPLIT_DATA) | F.FLAG_ARENA | F.FLAG_LIVENESS_LOCKS
    struct.pack_into("<I", header, flags_at, flags)
    struct.pack_into("<Q", header, F.FIELD["data_offset"][0], F.ARENA_DATA_OFFSET)
    recrc(header)
    return header


@pytest.fixture
def arena():
    """A forged arena memfd with three chunks: (fd, [(region_id, offset, size)])."""
    name = "spshm_arena_" + "".join(random.choice(B32) for _ in range(20))
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, ARENA_SIZE)
    chunks, offset = [], 0
    for size in (100, 8192, 5000):
        region_id = random_region_id()
        os.pwrite(fd, bytes(arena_header(region_id, size)), offset)
        os.pwrite(fd, bytes([len(chunks) + 1]) * size, offset + F.HEADER_SIZE)
        chunks.append((region_id, offset, size))
        offset += F.HEADER_SIZE + -(-size // 4096) * 4096
    yield fd, chunks
    os.close(fd)


def ref_of(fd, region_id, offset, size):
    path = f"/proc/{os.getpid()}/fd/{fd}"
    return {"v": 1, "region_id": region_id, "backend": "memfd", "control_path": path,
            "data_path": path, "control_offset": offset,
            "data_offset": offset + F.HEADER_SIZE, "size": size}


def own_arena_mappings():
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            if "spshm_arena_" in line:
                a, b = (int(x, 16) for x in line.split()[0].split("-"))
                spans.append((b - a, int(line.split()[2], 16)))
    return spans


def test_attach_maps_only_its_pages_and_holds_at_its_offset(arena):
    fd, chunks = arena
    region_id, offset, size = chunks[1]
    with snakepit_shm.attach(ref_of(fd, region_id, offset, size), "rw") as region:
        assert bytes(region.buf) == bytes([2]) * size
        region.buf[0:3] = b"abc"
        # Only its header page and its own data pages are mapped.
        spans = own_arena_mappings()
        assert sorted(spans) == sorted([(4096, offset), (8192, offset + 4096)])
        info = region.info()
        assert info["refcount"] == 1
        # The holder slot lock sits at offset + 256 + slot, liveness at offset + 0: a
        # second open sees both conflict there, and not at byte 0 of the arena.
        # A worker's claim starts at slot pid % 64 (the VM's own opens keep slots from 0).
        slot = region._attachment.slot.value
        assert slot == os.getpid() % 64
        probe = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            for byte, held in ((offset, True), (offset + 256 + slot, True), (0, False)):
                lock = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
                out = fcntl.fcntl(probe, 36, lock)  # F_OFD_GETLK
                assert (struct.unpack("hhqqi", out)[0] != fcntl.F_UNLCK) == held, byte
        finally:
            os.close(probe)
    # Its neighbours never changed; its own write landed in its own bytes.
    assert os.pread(fd, chunks[0][2], chunks[0][1] + 4096) == bytes([1]) * chunks[0][2]
    assert os.pread(fd, chunks[2][2], chunks[2][1] + 4096) == bytes([3]) * chunks[2][2]
    assert os.pread(fd, 3, offset + 4096) == b"abc"
    assert os.pread(fd, 4096, offset)[F.FIELD["refcount"][0]] == 0


def test_a_wrong_offset_or_link_is_refused(arena):
    fd, chunks = arena
    region_id, offset, size = chunks[2]
    # The ref points at a neighbour's control block: its id does not match. That is
    # what a stale ref meets once its chunk was freed and reused (session-4 attack):
    # the region is gone, the arena is not damaged.
    bad = ref_of(fd, region_id, chunks[0][1], size)
    bad["data_offset"] = chunks[0][1] + 4096
    with pytest.raises(snakepit_shm.errors.RegionNotFound,
                       match=f"holds region {chunks[0][0]}"):
        snakepit_shm.attach(bad)
    # Not page aligned, or beyond the arena.
    for wrong in (offset + 1, ARENA_SIZE):
        with pytest.raises((ValueError, CorruptRegion)):
            snakepit_shm.attach(ref_of(fd, region_id, wrong, size))
    # A memfd that is not an arena.
    other = os.memfd_create("not_an_arena", os.MFD_CLOEXEC)
    try:
        os.ftruncate(other, ARENA_SIZE)
        with pytest.raises(snakepit_shm.errors.RegionNotFound, match="spshm_arena_"):
            snakepit_shm.attach(ref_of(other, region_id, offset, size))
    finally:
        os.close(other)


def test_attach_by_bare_id_finds_the_chunk_in_an_arena(arena):
    fd, chunks = arena
    for index, (region_id, offset, size) in enumerate(chunks):
        with snakepit_shm.attach(region_id) as region:
            assert bytes(region.buf) == bytes([index + 1]) * size
            assert region.info()["data_offset"] == F.ARENA_DATA_OFFSET
    with pytest.raises(snakepit_shm.errors.RegionNotFound):
        snakepit_shm.attach(random_region_id())


def test_a_ref_to_a_freed_chunk_is_region_not_found(arena):
    """Found by the session-4 attack: a ref (or a stale index entry) of an arena
    region the VM freed met a chunk whose magic is cleared, or that a new region reused,
    and raised CorruptRegion ("not published: still being created, or its creator died
    ... It is damaged ... cleanup removes ours"); a dedicated memfd's stale ref said
    RegionNotFound. Both are a freed region now."""
    fd, chunks = arena
    region_id, offset, size = chunks[1]
    ref = ref_of(fd, region_id, offset, size)
    # Freed: the VM clears the chunk's magic.
    os.pwrite(fd, bytes(8), offset)
    for target in (ref, dict(ref, data_offset=None)):
        with pytest.raises(snakepit_shm.errors.RegionNotFound,
                           match=f"{region_id} no longer exists: .* is free"):
            snakepit_shm.attach(target)
    # Reused by another region of the same size.
    other = random_region_id()
    os.pwrite(fd, bytes(arena_header(other, size)), offset)
    with pytest.raises(snakepit_shm.errors.RegionNotFound,
                       match=f"{region_id} no longer exists: .* holds region {other}"):
        snakepit_shm.attach(ref)
    # python3 -m snakepit_shm info says the same.
    with pytest.raises(snakepit_shm.errors.RegionNotFound, match="no longer exists"):
        snakepit_shm.inspect(ref)
    # Damage is still damage: a bad CRC on a header of another id.
    damaged = bytearray(arena_header(other, size))
    damaged[F.FIELD["header_crc32"][0]] ^= 0xFF
    os.pwrite(fd, bytes(damaged), offset)
    with pytest.raises(CorruptRegion):
        snakepit_shm.attach(ref)
