"""{packet, 4} framing over a file descriptor (an Erlang port's stdin/stdout).

Each frame is a 4-byte big-endian length followed by that many bytes. Bodies are read
straight into a caller-provided buffer, so that a large payload is copied once, from
the pipe into the buffer, and never again.
"""

import os
import struct

_HEADER = struct.Struct(">I")


class FrameReader:
    """Reads frames from ``fd`` into one reusable, growable buffer."""

    def __init__(self, fd, pad=0):
        self._fd = fd
        self._pad = pad  # bytes kept free before the frame so that a payload can be aligned
        self._buffer = bytearray(1 << 20)

    def read_exact(self, view):
        """Fill ``view`` from the fd; raise EOFError if the peer closed."""
        filled = 0
        total = len(view)
        while filled < total:
            count = os.readv(self._fd, [view[filled:]])
            if count == 0:
                raise EOFError("the Erlang side closed the port")
            filled += count

    def next_frame(self):
        """Return a memoryview of the next frame's body (valid until the next call)."""
        header = bytearray(_HEADER.size)
        self.read_exact(memoryview(header))
        (length,) = _HEADER.unpack(header)
        if len(self._buffer) < self._pad + length:
            self._buffer = bytearray(self._pad + length)
        view = memoryview(self._buffer)[self._pad:self._pad + length]
        self.read_exact(view)
        return view


def write_frame(fd, body):
    """Write one frame (header and body in one writev)."""
    data = [_HEADER.pack(len(body)), body]
    total = _HEADER.size + len(body)
    written = os.writev(fd, data)
    while written < total:
        rest = (_HEADER.pack(len(body)) + bytes(body))[written:]
        written += os.write(fd, rest)
