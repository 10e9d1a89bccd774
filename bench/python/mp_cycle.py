"""Python's own shared-memory lifecycle, the baseline of issue 6, part 2.

A persistent process (an Erlang port, ``{packet, 4}``) that times, on request, the
cycle ``multiprocessing.shared_memory.SharedMemory(create=True, size=4096)``, write
4 KiB, ``close()``, ``unlink()``: the same steps as the product's allocate, map, write,
unmap, deallocate. Requests: ``C`` + count (uint32, big-endian) -> ``T`` + count uint64
nanosecond samples (little-endian); ``Q`` -> exit.
"""

import os
import struct
import sys
import time
from multiprocessing import shared_memory

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from framing import FrameReader, write_frame  # noqa: E402

SIZE = 4096
PAYLOAD = os.urandom(SIZE)


def cycle():
    shm = shared_memory.SharedMemory(create=True, size=SIZE)
    shm.buf[:SIZE] = PAYLOAD
    shm.close()
    shm.unlink()


def samples(count):
    clock = time.perf_counter_ns
    out = []
    for _ in range(count):
        start = clock()
        cycle()
        out.append(clock() - start)
    return out


def main():
    frames = FrameReader(0)
    while True:
        try:
            frame = bytes(frames.next_frame())
        except EOFError:
            return
        if frame[:1] == b"C":
            (count,) = struct.unpack(">I", frame[1:5])
            values = samples(count)
            write_frame(1, b"T" + struct.pack("<%dQ" % count, *values))
        else:
            return


if __name__ == "__main__":
    main()
