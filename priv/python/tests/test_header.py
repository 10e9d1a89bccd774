"""The Python header validator on its own (attach() also asks the core to validate)."""

import struct

import pytest

from snakepit_shm import CorruptRegion
from snakepit_shm import _format as F
from snakepit_shm import _header
from _forge import build_header, random_region_id, recrc

SIZE = 1000


def forged(backend=F.BACKEND_POSIX, **kwargs):
    region_id = kwargs.pop("region_id", None) or random_region_id()
    return region_id, build_header(region_id, backend, SIZE, **kwargs)


def validate(header, region_id, backend=F.BACKEND_POSIX, data_object_size=None):
    if data_object_size is None:
        data_object_size = SIZE + (0 if backend == F.BACKEND_MEMFD else F.HEADER_SIZE)
    control = F.HEADER_SIZE if backend == F.BACKEND_MEMFD else data_object_size
    return _header.validate(bytes(header), where="test", region_id=region_id,
                            control_size=control, data_object_size=data_object_size)


def u32(offset, value):
    return offset, struct.pack("<I", value)


def u64(offset, value):
    return offset, struct.pack("<Q", value)


@pytest.mark.parametrize("backend", [F.BACKEND_POSIX, F.BACKEND_MEMFD])
def test_valid_headers_pass(backend):
    region_id, header = forged(backend, metadata={"dtype": "float32", "shape": [250]},
                               security_level=2)
    parsed = validate(header, region_id, backend)
    assert parsed.region_id == region_id and parsed.data_size == SIZE
    assert parsed.metadata == {"dtype": "float32", "shape": [250]}
    assert parsed.security_level == 2 and not parsed.encrypted


def test_named_and_encrypted_headers_pass():
    region_id = "spshm_n_model-weights_1"
    _, header = forged(region_id=region_id, encrypted=True)
    size = F.HEADER_SIZE + F.encrypted_capacity(SIZE)
    assert validate(header, region_id, data_object_size=size).encrypted


# (edit, keep the CRC right, expected fragment of the message)
CORRUPTIONS = [
    ((0, b"SPSHMHDX"), True, "bad magic"),
    ((0, bytes(8)), False, "not published"),
    (u32(8, 2), True, "format version 2"),
    (u32(8, 0), True, "version 0"),
    (u32(12, 8192), True, "header_size"),
    (u32(F.FIELD["holder_capacity"][0], 63), False, "holder_capacity"),
    ((200, b"\x01"), True, "reserved0"),
    ((3700, b"\x01"), False, "reserved1"),
    (u32(128, F.METADATA_CAPACITY + 1), False, "metadata_length"),
    ((F.METADATA_OFFSET + 1700, b"x"), True, "padding"),
    ((80, b"\x01"), False, "CRC mismatch"),
    ((96, b"spshm_AAAAAAAAAAAAAAAAAAAA"), True, "malformed region id"),
    ((96, b"x" * 32), True, "malformed region id"),
    ((96 + 26, b"\x00\x01"), True, "malformed region id"),
    (u32(44, F.FLAG_NAMED), True, "named flag"),
    (u32(44, 1 << 9), True, "unknown flags"),
    (u32(40, 9), True, "unknown backend"),
    (u32(44, F.FLAG_SPLIT_DATA), True, "split-data"),
    (u32(52, 3), True, "security_level"),
    (u64(16, 0), True, "data_size is 0"),
    (u64(16, 1 << 61), True, "implausibly large"),
    (u64(24, SIZE + 1), True, "data_capacity"),
    (u64(32, 0), True, "data_offset"),
    (u32(88, 1), True, "cipher fields"),
    (u32(44, F.FLAG_ENCRYPTED), True, "unknown cipher"),
]


@pytest.mark.parametrize("edit, fix_crc, fragment", CORRUPTIONS,
                         ids=[c[2] for c in CORRUPTIONS])
def test_each_check_rejects(edit, fix_crc, fragment):
    region_id, header = forged()
    offset, data = edit
    header[offset:offset + len(data)] = data
    if fix_crc:
        recrc(header)
    with pytest.raises(CorruptRegion, match=fragment):
        validate(header, region_id)


def test_wrong_region():
    _, header = forged()
    with pytest.raises(CorruptRegion, match="holds region"):
        validate(header, random_region_id())


def test_truncated_objects():
    region_id, header = forged()
    with pytest.raises(CorruptRegion, match="truncated"):
        validate(header[:4000], region_id)
    with pytest.raises(CorruptRegion, match="truncated"):
        validate(header, region_id, data_object_size=F.HEADER_SIZE + SIZE - 1)


def test_metadata_must_be_a_json_object():
    region_id, header = forged(metadata=[1, 2])
    with pytest.raises(CorruptRegion, match="not a JSON object"):
        validate(header, region_id)
