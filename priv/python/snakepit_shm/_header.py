"""Validation of a region header (the Python twin of spshm::validate_header).

The immutable part of a header is checked once, on a private copy, so that a peer
cannot change it between the check and its use.  Every failure is CorruptRegion with a
message naming the segment and the check; nothing here trusts a single byte.
"""

import dataclasses
import json
import zlib

from . import errors
from . import _format as F
from ._locate import NAMED_PREFIX, valid_region_id

MAX_DATA_SIZE = 1 << 60  # as the core: keeps offset arithmetic far from overflow


@dataclasses.dataclass(frozen=True)
class Header:
    """The validated immutable fields of a header, plus the decoded metadata."""

    region_id: str
    format_version: int
    backend: int
    flags: int
    data_size: int
    data_capacity: int
    data_offset: int
    creator_pid: int
    creator_start_time: int
    security_level: int
    boot_id: bytes
    created_at_ns: int
    cipher: int
    chunk_size: int
    metadata: dict

    @property
    def encrypted(self):
        """True if the data is stored as encrypted chunks."""
        return bool(self.flags & F.FLAG_ENCRYPTED)


def header_crc(header):
    """Return the CRC-32 of [0, 132) followed by the metadata bytes in use."""
    length = min(int.from_bytes(header[128:132], "little"), F.METADATA_CAPACITY)
    crc = zlib.crc32(header[:F.CRC_COVERED_PREFIX])
    return zlib.crc32(header[F.METADATA_OFFSET:F.METADATA_OFFSET + length], crc)


def validate(header, *, where, region_id, control_size, data_object_size):
    """Check a 4096-byte header copy and return a :class:`Header`.

    ``where`` names the segment in messages; ``region_id`` is the id the caller asked
    for; ``control_size`` and ``data_object_size`` are the sizes of the objects holding
    the header and the data (the same object for POSIX).
    """
    def corrupt(problem):
        return errors.CorruptRegion(
            f"{where} is not a valid snakepit_shm region: {problem}. It is damaged, "
            "truncated or not ours; do not use it (`mix snakepit.shm.doctor` reports "
            "such segments, `mix snakepit.shm.cleanup` removes ours).")

    if control_size < F.HEADER_SIZE or len(header) < F.HEADER_SIZE:
        raise corrupt(f"truncated: {min(control_size, len(header))} bytes, a header "
                      f"needs {F.HEADER_SIZE}")
    fields = F.unpack_fields(header)
    if fields["magic"] == bytes(8):
        raise corrupt("its header is not published (zero magic): the region is still "
                      "being created, or its creator died while creating it")
    if fields["magic"] != F.MAGIC:
        raise corrupt(f"bad magic {fields['magic']!r}, expected {F.MAGIC!r}")
    version = fields["format_version"]
    if version > F.FORMAT_VERSION:
        raise errors.CorruptRegion(
            f"{where} was written with format version {version}, this client reads "
            f"version {F.FORMAT_VERSION}: upgrade the snakepit_shm Python package to the "
            "version of the Elixir side.")
    if version == 0:
        raise corrupt("format version 0 is invalid")
    if fields["header_size"] != F.HEADER_SIZE:
        raise corrupt(f"header_size {fields['header_size']} != {F.HEADER_SIZE}")
    if fields["holder_capacity"] != F.HOLDER_CAPACITY:
        raise corrupt(f"holder_capacity {fields['holder_capacity']} != "
                      f"{F.HOLDER_CAPACITY}")
    for name in ("reserved0", "reserved1"):
        offset, size = F.FIELD[name]
        if not _zero(header[offset:offset + size]):
            raise corrupt(f"reserved bytes {name} are not zero")
    if data_name(header) is None:
        raise corrupt("data_name is not the name of a data memfd of ours")
    length = fields["metadata_length"]
    if length > F.METADATA_CAPACITY:
        raise corrupt(f"metadata_length {length} exceeds {F.METADATA_CAPACITY}")
    if not _zero(header[F.METADATA_OFFSET + length:
                        F.METADATA_OFFSET + F.METADATA_CAPACITY]):
        raise corrupt("metadata padding is not zero")
    crc = header_crc(header)
    if crc != fields["header_crc32"]:
        raise corrupt(f"header CRC mismatch (stored {fields['header_crc32']:#010x}, "
                      f"computed {crc:#010x})")
    stored_id = _decode_id(fields["region_id"])
    if stored_id is None or not valid_region_id(stored_id):
        raise corrupt(f"malformed region id field {fields['region_id']!r}")
    if stored_id != region_id:
        raise corrupt(f"it holds region {stored_id}, not {region_id}")
    if stored_id.startswith(NAMED_PREFIX) != bool(fields["flags"] & F.FLAG_NAMED):
        raise corrupt("the named flag does not match the region id")
    _check_layout(fields, corrupt, data_object_size)
    return Header(
        region_id=stored_id, format_version=version, backend=fields["backend"],
        flags=fields["flags"], data_size=fields["data_size"],
        data_capacity=fields["data_capacity"], data_offset=fields["data_offset"],
        creator_pid=fields["creator_pid"],
        creator_start_time=fields["creator_start_time"],
        security_level=fields["security_level"], boot_id=fields["boot_id"],
        created_at_ns=fields["created_at_ns"], cipher=fields["cipher"],
        chunk_size=fields["chunk_size"],
        metadata=_decode_metadata(header, fields["metadata_length"], corrupt))


def from_valid(header, *, where, region_id):
    """Return the :class:`Header` of a snapshot the core already validated.

    Checks what the core cannot know: that it is the region asked for, and that the
    metadata is a JSON object.
    """
    def corrupt(problem):
        return errors.CorruptRegion(
            f"{where} is not a valid snakepit_shm region: {problem}. It is damaged, "
            "truncated or not ours; do not use it (`mix snakepit.shm.doctor` reports "
            "such segments, `mix snakepit.shm.cleanup` removes ours).")

    (_, version, _, data_size, data_capacity, data_offset, backend, flags, creator_pid,
     security_level, creator_start_time, boot_id, created_at_ns, cipher, chunk_size,
     raw_id, metadata_length, _) = F.unpack_immutable(header)
    stored_id = _decode_id(raw_id)
    if stored_id != region_id:
        raise corrupt(f"it holds region {stored_id}, not {region_id}")
    return Header(
        region_id=stored_id, format_version=version, backend=backend, flags=flags,
        data_size=data_size, data_capacity=data_capacity, data_offset=data_offset,
        creator_pid=creator_pid, creator_start_time=creator_start_time,
        security_level=security_level, boot_id=boot_id, created_at_ns=created_at_ns,
        cipher=cipher, chunk_size=chunk_size,
        metadata=_decode_metadata(header, metadata_length, corrupt))


def reused_arena_chunk(header):
    """What an arena chunk holds instead of the region asked for, or None.

    ``"free"`` for a chunk whose magic is zero (an arena chunk's magic is cleared when
    its region is freed; a ref or an index entry only ever names a published one), the
    id of another region for a chunk with an intact header of that region (it was
    reused), None for anything else (damage: the usual checks say what).
    """
    if len(header) < F.HEADER_SIZE:
        return None
    fields = F.unpack_fields(header)
    if fields["magic"] == bytes(8):
        return "free"
    if fields["magic"] != F.MAGIC or header_crc(header) != fields["header_crc32"]:
        return None
    stored_id = _decode_id(fields["region_id"])
    if stored_id is None or not valid_region_id(stored_id):
        return None
    return stored_id


def data_name(header):
    """The header's data_name field: "" when empty, None when malformed."""
    offset = F.DATA_NAME_OFFSET
    raw = bytes(header[offset:offset + F.DATA_NAME_CAPACITY])
    if _zero(raw):
        return ""
    name = _decode_id(raw)
    if name is None or not name.endswith(".data") or not valid_region_id(name[:-5]):
        return None
    return name


def _zero(chunk):
    return bytes(chunk).count(0) == len(chunk)


def _decode_id(raw):
    """Return the NUL-terminated, zero-padded id, or None if malformed."""
    text = raw.rstrip(b"\0")
    if len(text) == len(raw) or b"\0" in text:
        return None
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        return None


def _check_layout(fields, corrupt, data_object_size):
    backend, flags = fields["backend"], fields["flags"]
    size, capacity, offset = (fields["data_size"], fields["data_capacity"],
                              fields["data_offset"])
    if backend not in (F.BACKEND_POSIX, F.BACKEND_MEMFD, F.BACKEND_WINDOWS):
        raise corrupt(f"unknown backend {backend}")
    if flags & ~F.KNOWN_FLAGS:
        raise corrupt(f"unknown flags {flags:#x}")
    if fields["security_level"] > 2:
        raise corrupt(f"security_level {fields['security_level']} is unknown")
    arena = bool(flags & F.FLAG_ARENA)
    if arena and (backend != F.BACKEND_MEMFD or flags & (
            F.FLAG_SPLIT_DATA | F.FLAG_NAMED | F.FLAG_ENCRYPTED | F.FLAG_WORKER_OUTPUT)):
        raise corrupt("the arena flag does not match the backend or flags")
    if not arena and bool(flags & F.FLAG_SPLIT_DATA) != (backend == F.BACKEND_MEMFD):
        raise corrupt("the split-data flag does not match the backend")
    if size == 0:
        raise corrupt("data_size is 0")
    if size > MAX_DATA_SIZE:
        raise corrupt("data_size is implausibly large")
    expected_offset = (F.ARENA_DATA_OFFSET if arena
                       else 0 if backend == F.BACKEND_MEMFD else F.HEADER_SIZE)
    if offset != expected_offset:
        raise corrupt(f"data_offset {offset} != {expected_offset} for backend "
                      f"{F.BACKEND_NAMES[backend]}")
    if flags & F.FLAG_ENCRYPTED:
        if fields["cipher"] != F.CIPHER_XCHACHA20POLY1305_CHUNKS:
            raise corrupt(f"encrypted with unknown cipher {fields['cipher']}")
        if fields["chunk_size"] != F.CHUNK_SIZE:
            raise corrupt(f"chunk_size {fields['chunk_size']} != {F.CHUNK_SIZE}")
        needed = F.encrypted_capacity(size)
    else:
        if fields["cipher"] != F.CIPHER_NONE or fields["chunk_size"] != 0:
            raise corrupt("cipher fields set on an unencrypted region")
        needed = size
    if capacity != needed:
        raise corrupt(f"data_capacity {capacity} does not match the layout of "
                      f"{size} bytes ({needed})")
    if offset + capacity > data_object_size:
        raise corrupt(f"truncated: the data needs {offset + capacity} bytes, the "
                      f"object has {data_object_size}")


# Decoded metadata by its bytes: a worker attaches region after region with the same
# few metadata objects (dtype, shape, format). Shared dicts: nobody changes them
# (Region.metadata hands out copies).
_metadata_cache = {}
_METADATA_CACHE_LIMIT = 256


def _decode_metadata(header, length, corrupt):
    if length == 0:
        return {}
    raw = bytes(header[F.METADATA_OFFSET:F.METADATA_OFFSET + length])
    cached = _metadata_cache.get(raw)
    if cached is not None:
        return cached
    metadata = _parse_metadata(raw, corrupt)
    if len(_metadata_cache) >= _METADATA_CACHE_LIMIT:
        _metadata_cache.clear()
    _metadata_cache[raw] = metadata
    return metadata


def _parse_metadata(raw, corrupt):
    try:
        metadata = json.loads(raw.decode("utf-8"))
    except ValueError:
        raise corrupt("its metadata is not valid UTF-8 JSON") from None
    if not isinstance(metadata, dict):
        raise corrupt("its metadata is not a JSON object")
    return metadata
