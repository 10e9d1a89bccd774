"""The on-memory format of a status board, mirrored from ``c_src/core/board.hpp``.

``board.hpp`` is the single source of truth; ``docs/FORMAT.md`` § status board writes it
out byte by byte; ``tests/test_board.py`` checks every constant and field below against
both (the JSON of ``spshm_board_layout()`` and the docs table).  A board lives in the
data area of a region: a 512-byte header, then ``capacity`` slots of 192 bytes.
"""

MAGIC = b"SPSHMBRD"
VERSION = 1
HEADER_SIZE = 512
SLOT_SIZE = 192
MAX_CAPACITY = 65536
GAUGE_COUNT = 4
GAUGE_NAME_CAPACITY = 32
WORKER_ID_CAPACITY = 64
READ_RETRIES = 64

SLOT_FREE = 0
SLOT_BUSY = 1
SLOT_LIVE = 2

STATES = {"starting": 0, "idle": 1, "busy": 2, "draining": 3, "shutdown": 4}

# name: (offset, size)
HEADER_FIELDS = {
    "magic": (0, 8),
    "version": (8, 4),
    "header_size": (12, 4),
    "slot_size": (16, 4),
    "capacity": (20, 4),
    "stale_after_ms": (24, 8),
    "gauge_names": (32, 128),
    "created_ns": (160, 8),
    "generation": (168, 8),
    "reserved": (176, 336),
}

SLOT_FIELDS = {
    "owner": (0, 8),
    "seq": (8, 8),
    "pid": (16, 4),
    "state": (20, 4),
    "start_time": (24, 8),
    "updated_ns": (32, 8),
    "queue": (40, 8),
    "in_flight": (48, 8),
    "memory": (56, 8),
    "processed": (64, 8),
    "errors": (72, 8),
    "gauges": (80, 32),
    "id_length": (112, 4),
    "reserved0": (116, 4),
    "worker_id": (120, 64),
    "joined_ns": (184, 8),
}


def slot_offset(index):
    """Offset of slot ``index`` in the board (the region's data area)."""
    return HEADER_SIZE + SLOT_SIZE * index
