"""The persistent Python worker of the handoff benchmark (issue 6, part 1).

Usage: ``worker.py PRIV_PYTHON_DIR [--default-pipe]``. Started once per run by the
Elixir bench as an Erlang port (``{packet, 4}`` on
stdin/stdout) and kept warm. Every path computes the same thing: the xor of the payload
viewed as numpy uint64 words, so every byte is read once. The reply is ``R`` followed by
the xor as 8 little-endian bytes. Requests (first byte, then the rest of the frame):

* ``P`` payload: the payload came through the port itself (path c).
* ``S`` JSON ref: attach the region with snakepit_shm, reduce, close (path a, fresh).
* ``B`` region id: the same as ``S``, attaching by bare id (per-request handoff).
* ``W`` JSON {"ref": ref, "length": n}: reduce the first n bytes of a region kept
  attached between requests (path b, warm); attached on first use.
* ``D`` region id: close the kept attachment of that region.
* ``U`` socket path: connect to the Unix socket the bench listens on and serve
  ``{packet, 4}`` payload frames on it (path d), in a thread, until the bench closes
  it; the reply on the port comes once connected.
* ``C`` JSON channel ref: connect to the bench's message channel
  (``snakepit_shm.Channel``) and serve handoff messages on it (path b', warm region +
  channel message), in a thread, until the bench closes it; the reply on the port comes
  once connected. A channel message is either JSON ``{"ref": ref, "length": n}`` (attach
  and keep the region, then reduce) or ``<Q length><region id>`` (reduce the first
  ``length`` bytes of a kept region); the answer, on the channel, is ``R``, the xor and
  the timings (attach, reduce, close) as the port's replies.
* ``Q``: exit.
"""

import fcntl
import json
import os
import socket
import struct
import sys
import threading

import numpy as np
from time import perf_counter_ns as clock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from framing import FrameReader, write_frame  # noqa: E402

_REPLY = struct.Struct("<cQ")  # the socket path's reply; port replies may add timings
_HEADER = struct.Struct(">I")
_LENGTH = struct.Struct("<Q")  # the channel path's message: length, then the region id
# The pipe and the socket are sized as large as this machine allows, so that the
# baselines move data in as few system calls as they can: the fairest comparison.
_PIPE_SIZE = 1 << 20
_SOCKET_BUFFER = 4 << 20


def xor_reduce(view):
    """Xor of ``view`` (a buffer whose length is a multiple of 8) as uint64 words."""
    words = np.frombuffer(view, dtype=np.uint64)
    return int(np.bitwise_xor.reduce(words)) if words.size else 0


def reply(value, timings=()):
    """``R``, the xor, then optional uint64 nanosecond timings (attach, reduce, close)."""
    write_frame(1, _REPLY.pack(b"R", value) + struct.pack("<%dQ" % len(timings), *timings))


def enlarge_pipe(fd):
    try:
        limit = int(open("/proc/sys/fs/pipe-max-size").read())
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(_PIPE_SIZE, limit))
    except (OSError, ValueError, AttributeError):
        pass  # not a pipe, or not Linux: keep the default size


class Worker:
    def __init__(self, snakepit_shm):
        self.shm = snakepit_shm
        self.kept = {}  # region id -> attached Region (warm path)
        self.views = {}  # region id -> its uint64 view (channel path)

    def fresh(self, ref):
        """Attach, reduce, close; returns (xor, (attach ns, reduce ns, close ns))."""
        t0 = clock()
        region = self.shm.attach(ref)
        t1 = clock()
        words = region.ndarray("uint64", (region.size // 8,))
        value = int(np.bitwise_xor.reduce(words)) if words.size else 0
        del words
        t2 = clock()
        region.close()
        return value, (t1 - t0, t2 - t1, clock() - t2)

    def warm(self, request):
        """Reduce the first ``length`` bytes of a kept attachment (attached once)."""
        t0 = clock()
        ref = request["ref"]
        region = self.kept.get(ref["region_id"])
        if region is None:
            region = self.shm.attach(ref)
            self.kept[ref["region_id"]] = region
        t1 = clock()
        words = region.ndarray("uint64", (request["length"] // 8,))
        value = int(np.bitwise_xor.reduce(words)) if words.size else 0
        del words
        return value, (t1 - t0, clock() - t1, 0)

    def drop(self, region_id):
        self.views.pop(region_id, None)  # the view goes before the region closes
        region = self.kept.pop(region_id, None)
        if region is not None:
            region.close()

    def serve_socket(self, path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        sock.connect(path)
        reply(0)
        buffer = bytearray(1 << 20)
        header = bytearray(_HEADER.size)
        try:
            while recv_exact(sock, memoryview(header)):
                (length,) = _HEADER.unpack(header)
                if len(buffer) < length:
                    buffer = bytearray(length)
                view = memoryview(buffer)[:length]
                if not recv_exact(sock, view):
                    break
                value = xor_reduce(view)
                del view
                sock.sendall(_HEADER.pack(_REPLY.size) + _REPLY.pack(b"R", value))
        finally:
            sock.close()

    def serve_channel(self, ref):
        """The channel path: small messages name a warm region, the bytes stay in it."""
        try:
            channel = self.shm.Channel.connect(ref)
        except Exception as error:  # reported to the bench instead of a silent hang
            write_frame(1, b"E" + str(error).encode())
            return
        reply(0)
        with channel:
            try:
                while True:
                    message = channel.recv()
                    if message[:1] == b"{":
                        value, timings = self.warm(json.loads(bytes(message)))
                    else:
                        (length,) = _LENGTH.unpack_from(message)
                        t0 = clock()
                        words = self.words_of(bytes(message[_LENGTH.size:]).decode())
                        part = words[:length // 8]
                        value = int(np.bitwise_xor.reduce(part)) if part.size else 0
                        del part
                        timings = (0, clock() - t0, 0)
                    channel.send(_REPLY.pack(b"R", value) + struct.pack("<3Q", *timings))
            except self.shm.ChannelClosed:
                pass
            finally:
                self.views.clear()

    def words_of(self, region_id):
        """The whole kept region as uint64 words, made once per region (as a worker that
        keeps a region keeps its view): each message then slices it."""
        words = self.views.get(region_id)
        if words is None:
            region = self.kept[region_id]
            words = self.views[region_id] = region.ndarray("uint64", (region.size // 8,))
        return words


def recv_exact(sock, view):
    """Fill ``view`` from ``sock``; False on a clean end of stream."""
    filled = 0
    while filled < len(view):
        count = sock.recv_into(view[filled:])
        if count == 0:
            return False
        filled += count
    return True


def main():
    sys.path.insert(0, sys.argv[1])  # priv/python: where snakepit_shm lives
    import snakepit_shm

    if "--default-pipe" not in sys.argv[2:]:
        enlarge_pipe(0)
    worker = Worker(snakepit_shm)
    # The opcode takes byte 7 of the buffer so that a port payload starts 8-aligned.
    frames = FrameReader(0, pad=7)
    while True:
        try:
            frame = frames.next_frame()
        except EOFError:
            return
        op, body = bytes(frame[:1]), frame[1:]
        if op == b"P":
            reply(xor_reduce(body))
        elif op == b"S":
            reply(*worker.fresh(json.loads(bytes(body))))
        elif op == b"B":
            reply(*worker.fresh(bytes(body).decode()))  # by bare region id
        elif op == b"W":
            reply(*worker.warm(json.loads(bytes(body))))
        elif op == b"D":
            worker.drop(bytes(body).decode())
            reply(0)
        elif op == b"U":
            # Served by a thread, so that the port stays responsive; the bench sends
            # one request at a time on either channel, so they never compete.
            threading.Thread(target=worker.serve_socket, args=(bytes(body).decode(),),
                             daemon=True).start()
        elif op == b"C":
            threading.Thread(target=worker.serve_channel, args=(json.loads(bytes(body)),),
                             daemon=True).start()
        elif op == b"Q":
            return
        else:
            sys.stderr.write("worker: unknown request %r\n" % op)
            return
        del frame, body


if __name__ == "__main__":
    main()
