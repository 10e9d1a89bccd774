"""Layout constants of the message channel's memory (``c_src/core/ring.hpp``).

Mirrors the C++ definition; ``tests/test_channel.py`` compares every constant with the
layout the C library reports (``spshm_channel_layout``), and docs/CHANNEL.md writes the
same tables out.  All integers are little-endian.
"""

MAGIC = b"SPSHMCHN"
VERSION = 1
HEADER_SIZE = 4096
MIN_CAPACITY = 4096
MAX_CAPACITY = 16 * 1024 * 1024
DEFAULT_CAPACITY = 64 * 1024
FRAME_HEADER_SIZE = 8
FRAME_ALIGN = 8
REGION_PAYLOAD_SIZE = 16

FRAME_DATA = 1
FRAME_REGION = 2
FRAME_HELLO = 16
FRAME_WELCOME = 17
FRAME_CARRIER = 18

# field: (offset, size) in the channel header
FIELDS = {
    "magic": (0, 8),
    "version": (8, 4),
    "header_size": (12, 4),
    "capacity": (16, 16),
    "data_offset": (32, 16),
    "total_size": (48, 8),
    "inline_max": (56, 4),
    "flags": (60, 4),
    "reserved0": (64, 64),
    "rings": (128, 256),
    "reserved1": (384, 3712),
}

# offsets inside one ring's control block (ring i at 128 + 128 * i)
RING_CONTROL_SIZE = 128
HEAD = 0
PRODUCER_WAITING = 8
TAIL = 64
CONSUMER_WAITING = 72


def frame_size(length):
    """Bytes a frame of ``length`` payload bytes occupies in a ring."""
    return FRAME_HEADER_SIZE + ((length + FRAME_ALIGN - 1) & ~(FRAME_ALIGN - 1))
