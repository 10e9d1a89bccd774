"""The on-memory format of a region, mirrored from ``c_src/core/format.hpp``.

``format.hpp`` is the single source of truth; ``docs/FORMAT.md`` writes it out byte by
byte.  ``tests/test_format.py`` checks every constant and field below against both: the
JSON that the C++ core reports through ``spshm_header_layout()`` and the field table of
``docs/FORMAT.md``.  Change all three together, and bump ``FORMAT_VERSION`` for any
incompatible change.

Layout of the control object (all integers little-endian)::

    [0, 2048)     immutable part, written once at creation
        0    magic[8]             b"SPSHMHDR"
        8    format_version  u32
        12   header_size     u32  4096
        16   data_size       u64  bytes usable by the user (plaintext size)
        24   data_capacity   u64  bytes of the data object in use (ciphertext layout)
        32   data_offset     u64  where data starts in the data object
        40   backend         u32  BACKEND_*
        44   flags           u32  FLAG_*
        48   creator_pid     u32
        52   security_level  u32  0 standard, 1 high, 2 maximum
        56   creator_start_time u64
        64   boot_id[16]
        80   created_at_ns   u64  CLOCK_REALTIME
        88   cipher          u32  CIPHER_*
        92   chunk_size      u32  plaintext bytes per chunk (0 when not encrypted)
        96   region_id[32]        ASCII, NUL padded
        128  metadata_length u32
        132  header_crc32    u32  zlib CRC-32 of [0, 132) ++ metadata[0, metadata_length)
        136  data_name[40]        the data memfd's name when not <id>.data (a pooled
                                  object reused), NUL padded; else zero
        176  reserved0[80]        zero
        256  metadata[1792]       UTF-8 JSON object, zero padded
    [2048, 4096)  mutable part, updated atomically by the holders
        2048 state           u32  STATE_*
        2052 refcount        u32  sum of all holds
        2056 last_access_ns  u64
        2064 idle_timeout_ns u64  0 = never expires
        2072 holder_capacity u32  64
        2076 holders_generation u32
        2080 holders[64]          24 bytes each, see HOLDER_FIELDS
        3616 reserved1[480]       zero
"""

import struct

MAGIC = b"SPSHMHDR"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
IMMUTABLE_SIZE = 2048  # [0, 2048) never changes after creation
METADATA_OFFSET = 256
METADATA_CAPACITY = 1792  # bytes [256, 2048)
HOLDER_CAPACITY = 64
REGION_ID_CAPACITY = 32
CRC_COVERED_PREFIX = 132  # the CRC covers [0, 132) ++ metadata[0, metadata_length)

NAME_PREFIX = "spshm_"
MAX_SEGMENT_NAME_LENGTH = 30  # with the leading "/": macOS allows 31 bytes with the NUL

# Encrypted layout: chunk i of up to CHUNK_SIZE plaintext bytes is stored at offset
# i * (CHUNK_SIZE + CHUNK_OVERHEAD) as nonce (24) || ciphertext || tag (16).
CHUNK_SIZE = 65536
NONCE_SIZE = 24
TAG_SIZE = 16
CHUNK_OVERHEAD = NONCE_SIZE + TAG_SIZE
KEY_SIZE = 32

BACKEND_POSIX = 1  # named POSIX shm object; header and data in one object
BACKEND_MEMFD = 2  # two memfds (control + data) reached through /proc/<pid>/fd
BACKEND_WINDOWS = 3  # Windows named file mapping
BACKEND_NAMES = {BACKEND_POSIX: "posix", BACKEND_MEMFD: "memfd",
                 BACKEND_WINDOWS: "windows"}

CIPHER_NONE = 0
CIPHER_XCHACHA20POLY1305_CHUNKS = 1

# Immutable flags (set at creation, covered by the CRC).
FLAG_ENCRYPTED = 1 << 0
FLAG_NAMED = 1 << 1
FLAG_SPLIT_DATA = 1 << 2
FLAG_WORKER_OUTPUT = 1 << 3  # made by snakepit_shm.allocate: adoptable by a VM
FLAG_LIVENESS_LOCKS = 1 << 4  # every user holds the liveness lock (byte 0)
FLAG_ARENA = 1 << 5  # a chunk of an arena memfd (docs/FORMAT.md "Arenas")
FLAG_HUGE_PAGES = 1 << 7  # data memfd on hugetlbfs: map the whole data object
KNOWN_FLAGS = (FLAG_ENCRYPTED | FLAG_NAMED | FLAG_SPLIT_DATA | FLAG_WORKER_OUTPUT
               | FLAG_LIVENESS_LOCKS | FLAG_ARENA | FLAG_HUGE_PAGES)
ARENA_DATA_OFFSET = HEADER_SIZE  # an arena chunk's data follows its control block
DATA_NAME_OFFSET = 136
DATA_NAME_CAPACITY = 40

# Mutable state bits (the ``state`` field).
STATE_SEALED = 1 << 0
STATE_DEALLOCATED = 1 << 1
STATE_SEALING = 1 << 2  # a seal is being committed: writers refuse (not yet sealed)
STATE_ADOPTED = 1 << 3  # a VM took over a worker-created region

# Byte of the control object whose open file description lock (F_OFD_SETLK) serialises
# the data of an encrypted region across processes: writers exclusive, readers shared.
DATA_LOCK_BYTE = 1
# Byte of the control object a sealer holds exclusively (F_OFD_SETLK) from before it
# sets STATE_SEALING until after it clears it: a set bit whose seal lock anyone can take
# was left by a dead sealer (docs/FORMAT.md, "Locks").
SEAL_LOCK_BYTE = 2

# Holder slot states.
SLOT_FREE = 0
SLOT_BUSY = 1  # being claimed or released
SLOT_LIVE = 2

# Holder flags. ``count`` and ``flags`` of a slot form one 64-bit word changed by one
# CAS; bits 8-31 of ``flags`` count the slot's claims (its incarnation, against ABA).
HOLDER_WRITABLE = 1 << 0
HOLDER_INCARNATION_MASK = 0xFFFFFF00

# (name, offset, size, struct code or None for byte arrays), in layout order.
HEADER_FIELDS = (
    ("magic", 0, 8, None),
    ("format_version", 8, 4, "I"),
    ("header_size", 12, 4, "I"),
    ("data_size", 16, 8, "Q"),
    ("data_capacity", 24, 8, "Q"),
    ("data_offset", 32, 8, "Q"),
    ("backend", 40, 4, "I"),
    ("flags", 44, 4, "I"),
    ("creator_pid", 48, 4, "I"),
    ("security_level", 52, 4, "I"),
    ("creator_start_time", 56, 8, "Q"),
    ("boot_id", 64, 16, None),
    ("created_at_ns", 80, 8, "Q"),
    ("cipher", 88, 4, "I"),
    ("chunk_size", 92, 4, "I"),
    ("region_id", 96, 32, None),
    ("metadata_length", 128, 4, "I"),
    ("header_crc32", 132, 4, "I"),
    ("data_name", 136, 40, None),
    ("reserved0", 176, 80, None),
    ("metadata", 256, 1792, None),
    ("state", 2048, 4, "I"),
    ("refcount", 2052, 4, "I"),
    ("last_access_ns", 2056, 8, "Q"),
    ("idle_timeout_ns", 2064, 8, "Q"),
    ("holder_capacity", 2072, 4, "I"),
    ("holders_generation", 2076, 4, "I"),
    ("holders", 2080, 24 * HOLDER_CAPACITY, None),
    ("reserved1", 3616, 480, None),
)
FIELD = {name: (offset, size) for name, offset, size, _ in HEADER_FIELDS}

HOLDER_SLOT_SIZE = 24
HOLDER_FIELDS = (
    ("slot_state", 0, 4, "I"),
    ("pid", 4, 4, "I"),
    ("start_time", 8, 8, "Q"),
    ("count", 16, 4, "I"),
    ("flags", 20, 4, "I"),
)
HOLDERS_OFFSET = FIELD["holders"][0]

# One struct for the immutable scalar prefix [0, 136) and one for the mutable scalars.
_IMMUTABLE = struct.Struct("<8sIIQQQIIIIQ16sQII32sII")
_MUTABLE = struct.Struct("<IIQQII")
_HOLDER = struct.Struct("<IIQII")
assert _IMMUTABLE.size == FIELD["data_name"][0]
assert _MUTABLE.size == FIELD["holders"][0] - FIELD["state"][0]
assert _HOLDER.size == HOLDER_SLOT_SIZE
assert FIELD["reserved1"][0] + FIELD["reserved1"][1] == HEADER_SIZE
assert FIELD["metadata"] == (METADATA_OFFSET, METADATA_CAPACITY)
assert FIELD["header_crc32"][0] == CRC_COVERED_PREFIX
assert FIELD["state"][0] == IMMUTABLE_SIZE

_IMMUTABLE_NAMES = tuple(name for name, _, _, _ in HEADER_FIELDS[:18])
_MUTABLE_NAMES = ("state", "refcount", "last_access_ns", "idle_timeout_ns",
                  "holder_capacity", "holders_generation")


def unpack_fields(header):
    """Return a dict of every scalar field (and magic, boot_id, region_id bytes)."""
    fields = dict(zip(_IMMUTABLE_NAMES, _IMMUTABLE.unpack_from(header, 0)))
    fields.update(zip(_MUTABLE_NAMES,
                      _MUTABLE.unpack_from(header, FIELD["state"][0])))
    return fields


def unpack_immutable(header):
    """Return the scalar prefix [0, 136) as a tuple, in layout order."""
    return _IMMUTABLE.unpack_from(header, 0)


def unpack_holders(header):
    """Return the live holder slots as dicts {pid, start_time, count, writable}."""
    slots = []
    for index in range(HOLDER_CAPACITY):
        state, pid, start_time, count, flags = _HOLDER.unpack_from(
            header, HOLDERS_OFFSET + index * HOLDER_SLOT_SIZE)
        if state == SLOT_LIVE:
            slots.append({"pid": pid, "start_time": start_time, "count": count,
                          "writable": bool(flags & HOLDER_WRITABLE)})
    return slots


def pack_immutable(fields):
    """Pack the scalar prefix [0, 136) from a dict (used by tests to forge headers)."""
    return _IMMUTABLE.pack(*(fields[name] for name in _IMMUTABLE_NAMES))


def pack_mutable(fields):
    """Pack the mutable scalars [2048, 2080) from a dict."""
    return _MUTABLE.pack(*(fields[name] for name in _MUTABLE_NAMES))


def encrypted_capacity(plaintext_size):
    """Bytes of the data area holding ``plaintext_size`` bytes in encrypted chunks."""
    full, rest = divmod(plaintext_size, CHUNK_SIZE)
    capacity = full * (CHUNK_SIZE + CHUNK_OVERHEAD)
    if rest:
        capacity += rest + CHUNK_OVERHEAD
    return capacity
