"""snakepit_shm/_board_format.py and board.py against board.hpp and docs/FORMAT.md."""

import ctypes
import mmap
import os
import re
import struct

import pytest

from snakepit_shm import _board_format as BF
from snakepit_shm import _native, board
from conftest import REPO

FORMAT_MD = os.path.join(REPO, "docs", "FORMAT.md")


def doc_rows(section):
    text = open(FORMAT_MD, encoding="utf-8").read()
    body = text.split("## " + section + "\n", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in body.splitlines():
        m = re.match(r"^\| \+?(\d+) \| (\d+) \| `(\w+)` \|", line)
        if m:
            rows[m.group(3)] = (int(m.group(1)), int(m.group(2)))
    return rows


def test_constants_match_the_core():
    layout = board.board_layout()
    assert layout["magic"].encode() == BF.MAGIC
    assert layout["version"] == BF.VERSION
    assert layout["header_size"] == BF.HEADER_SIZE
    assert layout["slot_size"] == BF.SLOT_SIZE
    assert layout["max_capacity"] == BF.MAX_CAPACITY
    assert layout["gauge_count"] == BF.GAUGE_COUNT
    assert layout["gauge_name_capacity"] == BF.GAUGE_NAME_CAPACITY
    assert layout["worker_id_capacity"] == BF.WORKER_ID_CAPACITY
    assert layout["read_retries"] == BF.READ_RETRIES
    assert (layout["slot_free"], layout["slot_busy"], layout["slot_live"]) == (
        BF.SLOT_FREE, BF.SLOT_BUSY, BF.SLOT_LIVE)
    assert layout["states"] == BF.STATES
    as_pairs = {k: (v["offset"], v["size"]) for k, v in layout["header_fields"].items()}
    assert as_pairs == BF.HEADER_FIELDS
    as_pairs = {k: (v["offset"], v["size"]) for k, v in layout["slot_fields"].items()}
    assert as_pairs == BF.SLOT_FIELDS


def test_constants_match_the_docs():
    assert doc_rows("Status board header") == BF.HEADER_FIELDS
    assert doc_rows("Status board slot") == BF.SLOT_FIELDS


@pytest.mark.parametrize("fields,size", [(BF.HEADER_FIELDS, BF.HEADER_SIZE),
                                         (BF.SLOT_FIELDS, BF.SLOT_SIZE)])
def test_fields_tile(fields, size):
    end = 0
    for name, (offset, length) in sorted(fields.items(), key=lambda kv: kv[1][0]):
        assert offset == end, name
        end = offset + length
    assert end == size


def forge_board(capacity, gauges=(b"a", b"b")):
    """A board written by hand from the Python constants, in anonymous memory."""
    mm = mmap.mmap(-1, BF.HEADER_SIZE + BF.SLOT_SIZE * capacity)
    names = b"".join(g.ljust(BF.GAUGE_NAME_CAPACITY, b"\0") for g in gauges)
    struct.pack_into("<8sIIIIQ", mm, 0, BF.MAGIC, BF.VERSION, BF.HEADER_SIZE,
                     BF.SLOT_SIZE, capacity, 1000)
    mm[32:32 + len(names)] = names
    return mm


def test_the_c_library_accepts_a_board_forged_from_the_python_constants():
    functions = board._functions(_native.library())
    mm = forge_board(2)
    anchor = (ctypes.c_char * len(mm)).from_buffer(mm)
    base = ctypes.addressof(anchor)
    index, owner, capacity = ctypes.c_uint32(), ctypes.c_uint64(), ctypes.c_uint32()
    err = ctypes.create_string_buffer(256)

    def join(wid):
        return functions["spshm_board_join"](base, len(mm), wid, len(wid), 42, 7,
                                             ctypes.byref(index), ctypes.byref(owner),
                                             ctypes.byref(capacity), err, 256)

    assert join(b"w0") == 0 and index.value == 0 and capacity.value == 2
    slot = BF.slot_offset(0)
    o = BF.SLOT_FIELDS
    assert struct.unpack_from("<I", mm, slot + o["pid"][0])[0] == 42
    assert mm[slot + o["worker_id"][0]:slot + o["worker_id"][0] + 2] == b"w0"
    assert struct.unpack_from("<Q", mm, slot + o["owner"][0])[0] & 0xffffffff == BF.SLOT_LIVE
    values = (ctypes.c_uint64 * 10)(BF.STATES["busy"], 3, 2, 1 << 40, 9, 1, 0, 0, 0,
                                    (1 << 64) - 5)
    seq_before = struct.unpack_from("<Q", mm, slot + o["seq"][0])[0]
    assert functions["spshm_board_update"](base + slot, owner.value, values) == 0
    assert struct.unpack_from("<Q", mm, slot + o["seq"][0])[0] == seq_before + 2
    assert struct.unpack_from("<I", mm, slot + o["state"][0])[0] == BF.STATES["busy"]
    assert struct.unpack_from("<QQQ", mm, slot + o["queue"][0]) == (3, 2, 1 << 40)
    assert struct.unpack_from("<q", mm, slot + o["gauges"][0] + 24)[0] == -5
    assert functions["spshm_board_update"](base + slot, owner.value + 1, values) == -14
    owner0 = owner.value
    assert join(b"w1") == 0
    assert join(b"w2") == -100 and b"all 2 slots" in err.value
    leave = functions["spshm_board_leave"]
    assert leave(base, len(mm), 0, owner0, err, 256) == 0
    assert leave(base, len(mm), 0, owner0, err, 256) == -14
    assert join(b"w2") == 0 and index.value == 0 and owner.value != owner0
    del anchor
    mm.close()


def test_join_refuses_bad_worker_ids():
    with pytest.raises(ValueError):
        board.StatusBoard.join({"region_id": "spshm_n_x"}, "")
    with pytest.raises(ValueError):
        board.StatusBoard.join({"region_id": "spshm_n_x"}, "x" * 65)
    # Bytes that are no UTF-8: Elixir's join/3 refuses them, least_loaded/2 would
    # hand such an id to a router as a String.t(). Refused before the board is looked up.
    for bad in [b"\xff\xfe", b"a\x80", "\udcff", 7, None]:
        with pytest.raises(ValueError, match="worker_id"):
            board.StatusBoard.join({"region_id": "spshm_n_x"}, bad)
