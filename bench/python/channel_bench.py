"""Peer of the bench part "channel" (bench/lib/channel.ex).

    channel_bench.py channel_echo|channel_sink|channel_handoff   (ref in $SPSHM_CHANNEL_REF)
    channel_bench.py port_echo|port_sink|port_handoff            ({packet, 4} on stdio)
    channel_bench.py socket_echo|socket_sink PATH                ({packet, 4} on a Unix socket)

echo: every message goes back. sink: counts messages until b"!END", then replies the count.
handoff: reads every byte of the message (xor-reduce over a numpy uint64 view), replies 8 bytes.
$SPSHM_SPIN (seconds) overrides the channel client's spin, for experiments.
"""
import json
import os
import socket
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from framing import FrameReader, write_frame  # noqa: E402

END = b"!END"


def reduce(view):
    n = len(view) // 8
    acc = 0
    if n:
        acc = int(np.bitwise_xor.reduce(np.frombuffer(view, dtype=np.uint64, count=n)))
    for b in bytes(view[n * 8:]):
        acc ^= b
    return struct.pack("<Q", acc)


def run_channel(mode):
    import snakepit_shm
    ref = json.loads(os.environ["SPSHM_CHANNEL_REF"])
    options = {}
    if os.environ.get("SPSHM_SPIN"):
        options["spin"] = float(os.environ["SPSHM_SPIN"])
    with snakepit_shm.Channel.connect(ref, **options) as ch:
        try:
            if mode == "echo":
                while True:
                    ch.send(ch.recv())
            elif mode == "sink":
                count = 0
                while True:
                    for m in ch.recv_many(256):
                        if m == END:
                            ch.send(str(count).encode())
                            count = 0
                        else:
                            count += 1
            elif mode == "handoff":
                while True:
                    m = ch.recv()
                    ch.send(reduce(m))
                    if isinstance(m, memoryview):
                        m.release()
        except snakepit_shm.ChannelClosed:
            pass


class SocketIO:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.buf = bytearray(1 << 21)

    def next_frame(self):
        header = self._exact(4)
        (n,) = struct.unpack(">I", header)
        if len(self.buf) < n:
            self.buf = bytearray(n)
        view = memoryview(self.buf)[:n]
        got = 0
        while got < n:
            k = self.s.recv_into(view[got:])
            if k == 0:
                raise EOFError
            got += k
        return view

    def _exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.s.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def write(self, body):
        self.s.sendall(struct.pack(">I", len(body)) + bytes(body))


def run_framed(io, mode):
    try:
        count = 0
        while True:
            m = io.next_frame()
            if mode == "echo":
                io.write(m)
            elif mode == "sink":
                if m == END:
                    io.write(str(count).encode())
                    count = 0
                else:
                    count += 1
            else:
                io.write(reduce(m))
    except EOFError:
        pass


class PortIO:
    def __init__(self):
        self.reader = FrameReader(0)

    def next_frame(self):
        return self.reader.next_frame()

    def write(self, body):
        write_frame(1, body)


def main():
    kind, _, mode = sys.argv[1].partition("_")
    if kind == "channel":
        run_channel(mode)
    elif kind == "port":
        run_framed(PortIO(), mode)
    else:
        run_framed(SocketIO(sys.argv[2]), mode)


if __name__ == "__main__":
    main()
