"""snakepit_shm/_format.py against the C++ definition and docs/FORMAT.md."""

import os
import re
import struct
import zlib

import pytest

from snakepit_shm import _format as F
from snakepit_shm import _header
from _forge import build_header, random_region_id
from conftest import REPO

FORMAT_MD = os.path.join(REPO, "docs", "FORMAT.md")

CONSTANTS = {
    "format_version": F.FORMAT_VERSION, "header_size": F.HEADER_SIZE,
    "immutable_size": F.IMMUTABLE_SIZE, "metadata_offset": F.METADATA_OFFSET,
    "metadata_capacity": F.METADATA_CAPACITY, "holder_capacity": F.HOLDER_CAPACITY,
    "region_id_capacity": F.REGION_ID_CAPACITY,
    "crc_covered_prefix": F.CRC_COVERED_PREFIX, "name_prefix": F.NAME_PREFIX,
    "max_segment_name_length": F.MAX_SEGMENT_NAME_LENGTH, "chunk_size": F.CHUNK_SIZE,
    "nonce_size": F.NONCE_SIZE, "tag_size": F.TAG_SIZE,
    "chunk_overhead": F.CHUNK_OVERHEAD, "key_size": F.KEY_SIZE,
    "posix_data_offset": F.HEADER_SIZE, "memfd_data_offset": 0,
    "arena_data_offset": F.ARENA_DATA_OFFSET,
    "magic": F.MAGIC.decode(),
    "data_lock_byte": F.DATA_LOCK_BYTE,
    "seal_lock_byte": F.SEAL_LOCK_BYTE,
}
ENUMS = {
    "backends": {"posix": F.BACKEND_POSIX, "memfd": F.BACKEND_MEMFD,
                 "windows": F.BACKEND_WINDOWS},
    "ciphers": {"none": F.CIPHER_NONE,
                "xchacha20poly1305_chunks": F.CIPHER_XCHACHA20POLY1305_CHUNKS},
    "flags": {"encrypted": F.FLAG_ENCRYPTED, "named": F.FLAG_NAMED,
              "split_data": F.FLAG_SPLIT_DATA,
              "worker_output": F.FLAG_WORKER_OUTPUT,
              "liveness_locks": F.FLAG_LIVENESS_LOCKS, "arena": F.FLAG_ARENA,
              "huge_pages": F.FLAG_HUGE_PAGES},
    "states": {"sealed": F.STATE_SEALED, "deallocated": F.STATE_DEALLOCATED,
               "sealing": F.STATE_SEALING, "adopted": F.STATE_ADOPTED},
    "slot_states": {"free": F.SLOT_FREE, "busy": F.SLOT_BUSY, "live": F.SLOT_LIVE},
    "holder_flags": {"writable": F.HOLDER_WRITABLE,
                     "incarnation_mask": F.HOLDER_INCARNATION_MASK},
}


def as_table(fields):
    return {name: (offset, size) for name, offset, size, _ in fields}


class TestSelfConsistency:
    def test_fields_tile_the_header(self):
        end = 0
        for name, offset, size, code in F.HEADER_FIELDS:
            assert offset == end, name
            if code is not None:
                assert struct.calcsize("<" + code) == size, name
            end = offset + size
        assert end == F.HEADER_SIZE

    def test_holder_fields_tile_a_slot(self):
        end = 0
        for name, offset, size, code in F.HOLDER_FIELDS:
            assert offset == end and struct.calcsize("<" + code) == size, name
            end += size
        assert end == F.HOLDER_SLOT_SIZE
        assert F.HOLDER_SLOT_SIZE * F.HOLDER_CAPACITY == F.FIELD["holders"][1]

    def test_encrypted_capacity(self):
        assert F.encrypted_capacity(1) == 1 + F.CHUNK_OVERHEAD
        assert F.encrypted_capacity(F.CHUNK_SIZE) == F.CHUNK_SIZE + F.CHUNK_OVERHEAD
        assert F.encrypted_capacity(F.CHUNK_SIZE + 1) == F.CHUNK_SIZE + 1 + \
            2 * F.CHUNK_OVERHEAD

    def test_crc_covers_prefix_and_metadata(self):
        header = build_header(random_region_id(), F.BACKEND_POSIX, 10, metadata={"a": 1})
        meta = b'{"a": 1}'
        expected = zlib.crc32(meta, zlib.crc32(bytes(header[:132])))
        assert struct.unpack_from("<I", header, 132)[0] == expected
        assert _header.header_crc(bytes(header)) == expected

    def test_unpack_roundtrip(self):
        region_id = random_region_id()
        header = build_header(region_id, F.BACKEND_MEMFD, 77)
        fields = F.unpack_fields(bytes(header))
        assert fields["region_id"].rstrip(b"\0").decode() == region_id
        assert fields["data_size"] == 77 and fields["data_offset"] == 0
        assert fields["holder_capacity"] == F.HOLDER_CAPACITY


def test_matches_the_core_layout(lib):
    layout = lib.header_layout()
    for name, value in CONSTANTS.items():
        assert layout[name] == value, name
    for group, values in ENUMS.items():
        assert layout[group] == values, group
    core_fields = {name: (d["offset"], d["size"]) for name, d in layout["fields"].items()}
    assert core_fields == as_table(F.HEADER_FIELDS)
    assert list(layout["fields"]) == [name for name, *_ in F.HEADER_FIELDS]
    assert layout["holder"]["size"] == F.HOLDER_SLOT_SIZE
    holder_fields = {n: (d["offset"], d["size"])
                     for n, d in layout["holder"]["fields"].items()}
    assert holder_fields == as_table(F.HOLDER_FIELDS)


def test_the_core_validates_python_forged_headers(lib):
    from snakepit_shm import _native
    for backend in (F.BACKEND_POSIX, F.BACKEND_MEMFD):
        header = bytes(build_header(random_region_id(), backend, 100,
                                    metadata={"dtype": "uint8"}))
        size = 100 + (0 if backend == F.BACKEND_MEMFD else F.HEADER_SIZE)
        with _native.buffer_address(header) as (address, _):
            lib.validate_header(address, size)
            with pytest.raises(Exception, match="truncated|only"):
                lib.validate_header(address, size - 1)


def _is_table_head(cells):
    """`| offset | size | field | type | meaning |`, or its "slot"/"chunk" variants."""
    names = [c.lower() for c in cells[:5]]
    if len(names) != 5 or not names[2]:
        return False
    return (names[0].endswith("offset") and names[1] == "size"
            and names[2].split()[-1] in ("field", "part")
            and names[3:] == ["type", "meaning"])


def parse_format_tables(text):
    """Return the rows (field, offset, size) of every layout table of FORMAT.md.

    Offsets like "+8" (relative to a slot or chunk) are read as 8; numbers may be
    decimal or hex; cells that are not plain numbers ("len_i") are kept as text.
    """
    tables, current = [], None
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if _is_table_head(cells):
            current = []
            tables.append(current)
            continue
        if current is None or set("".join(cells)) <= set("-: "):
            continue
        offset, size, field = (c.strip("`* ") for c in cells[:3])
        field = re.sub(r"\[.*\]$", "", field)  # "holders[64]" -> "holders"
        current.append((field, _number(offset), _number(size)))
    return tables


def _number(text):
    try:
        return int(text.lstrip("+ "), 0)
    except ValueError:
        return text


def test_matches_docs_format_md():
    if not os.path.exists(FORMAT_MD):
        pytest.skip(f"{FORMAT_MD} is not written yet")
    with open(FORMAT_MD, encoding="utf-8") as f:
        tables = parse_format_tables(f.read())
    first = {}
    for rows in tables:  # the first table of each kind (the board's header also starts
        if rows:         # with a magic: FORMAT.md § Status board, test_board.py)
            first.setdefault(rows[0][0], rows)
    assert {"magic", "slot_state", "nonce"} <= set(first), \
        f"docs/FORMAT.md lacks a header, holder slot or chunk table: {list(first)}"
    assert {n: (o, s) for n, o, s in first["magic"]} == as_table(F.HEADER_FIELDS)
    assert [n for n, _, _ in first["magic"]] == [n for n, *_ in F.HEADER_FIELDS]
    assert {n: (o, s) for n, o, s in first["slot_state"]} == as_table(F.HOLDER_FIELDS)
    chunk = {n: (o, s) for n, o, s in first["nonce"]}
    assert chunk["nonce"] == (0, F.NONCE_SIZE)
    assert chunk["ciphertext"][0] == F.NONCE_SIZE
    assert chunk["tag"][1] == F.TAG_SIZE


def test_format_table_parser():
    text = ("| offset | size | field | type | meaning |\n|---|---|---|---|---|\n"
            "| 0 | 8 | `magic[8]` | char[8] | m |\n| 0x8 | 4 | format_version | u32 | v |\n"
            "\nprose | not a table\n"
            "| slot offset | size | slot field | type | meaning |\n|---|---|---|---|---|\n"
            "| +4 | 4 | `pid` | u32 | p |\n"
            "| chunk offset | size | part | type | meaning |\n|---|---|---|---|---|\n"
            "| +24 | len_i | `ciphertext` | u8[len_i] | c |\n")
    assert parse_format_tables(text) == [
        [("magic", 0, 8), ("format_version", 8, 4)], [("pid", 4, 4)],
        [("ciphertext", 24, "len_i")]]


def test_locks_table_names_the_lock_bytes():
    # docs/FORMAT.md "Locks": `| byte | lock | held by | meaning |`.
    with open(FORMAT_MD, encoding="utf-8") as f:
        section = f.read().split("\n## Locks\n", 1)[1].split("\n## ", 1)[0]
    meaning = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= 4:
            meaning[cells[0]] = cells[3]
    assert "**data lock**" in meaning[str(F.DATA_LOCK_BYTE)]
    assert "**seal lock**" in meaning[str(F.SEAL_LOCK_BYTE)]
    assert "**liveness**" in meaning["0"]
    assert "3–255" in meaning
