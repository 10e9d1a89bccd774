"""A hostile worker for the channel tests: speaks the handshake with raw sockets
(socket.recv_fds), maps the rings itself and breaks the protocol on purpose.

Reads one line per channel on stdin: "<case> <ref JSON>", attacks, prints "done <case>",
keeps the connection open until the next line (so the owner's verdict is the attack's,
not EOF), and closes it then.
"""
import json
import mmap
import os
import random
import socket
import struct
import sys

HELLO, WELCOME, CARRIER = 16, 17, 18
RING1 = 128 + 128


def connect(ref):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(ref["path"])
    s.sendall(struct.pack("<II", 40, HELLO) + bytes.fromhex(ref["token"])
              + struct.pack("<II", 1, 0))
    msg, fds, _flags, _addr = socket.recv_fds(s, 64, 4)
    length, ftype = struct.unpack_from("<II", msg)
    assert ftype == WELCOME, ftype
    _version, transport, cap0, cap1, inline_max = struct.unpack_from("<IIQQI", msg, 8)
    return s, fds, transport, cap0, cap1, inline_max


def sealed_memfd(data, seal=True):
    fd = os.memfd_create("snakepit-channel-msg", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seal:
        import fcntl
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd


def attack(case, ref, rng):
    s, fds, transport, cap0, cap1, inline_max = connect(ref)
    keep = [s]
    if transport == 2:  # socket transport: the attack goes over the socket
        if case == "bad_type":
            s.sendall(struct.pack("<II", 4, 99) + b"abcd")
        elif case in ("huge_len", "inline_too_big"):
            s.sendall(struct.pack("<II", 0xFFFFFFF0 if case == "huge_len" else inline_max + 8, 1))
        elif case == "region_nofd":
            s.sendall(struct.pack("<IIQQ", 16, 2, 100000, 0))
        elif case == "region_unsealed":
            fd = sealed_memfd(b"x" * 100000, seal=False)
            socket.send_fds(s, [struct.pack("<IIQQ", 16, 2, 100000, 0)], [fd])
        elif case == "random":
            s.sendall(rng.randbytes(rng.randrange(1, 4096)))
        return keep
    memfd, efd_owner, _efd_worker = fds
    mm = mmap.mmap(memfd, 4096 + cap0 + cap1)
    keep.append(mm)
    data1 = 4096 + cap0

    def publish(head):
        struct.pack_into("<Q", mm, RING1, head)
        os.write(efd_owner, struct.pack("<Q", 1))

    if case == "bad_type":
        struct.pack_into("<II", mm, data1, 4, 99)
        publish(16)
    elif case == "huge_len":
        struct.pack_into("<II", mm, data1, 0xFFFFFFF0, 1)
        publish(16)
    elif case == "inline_too_big":
        struct.pack_into("<II", mm, data1, inline_max + 8, 1)
        publish(8 + inline_max + 8)
    elif case == "head_beyond":
        publish(cap1 + 4096)
    elif case == "region_nofd":
        struct.pack_into("<IIQQ", mm, data1, 16, 2, 100000, 0)
        publish(24)
    elif case == "region_unsealed":
        fd = sealed_memfd(b"x" * 100000, seal=False)
        socket.send_fds(s, [struct.pack("<II", 0, CARRIER)], [fd])
        struct.pack_into("<IIQQ", mm, data1, 16, 2, 100000, 0)
        publish(24)
    elif case == "region_bad_seq":
        fd = sealed_memfd(b"x" * 100000)
        socket.send_fds(s, [struct.pack("<II", 0, CARRIER)], [fd])
        struct.pack_into("<IIQQ", mm, data1, 16, 2, 100000, 7)
        publish(24)
    elif case == "tail_beyond":
        struct.pack_into("<Q", mm, 128 + 64, 10 ** 12)  # ring 0 tail: the owner's producer
    elif case == "random":
        mm[data1:data1 + cap1] = rng.randbytes(cap1)
        publish(rng.randrange(0, 2 * cap1))
    elif case == "doorbell_storm":
        # Rings the owner's doorbell 20000 times without publishing anything (the owner
        # never reads the eventfd: it is edge-triggered), then publishes one frame.
        for _ in range(20000):
            os.write(efd_owner, struct.pack("<Q", 1))
        struct.pack_into("<II", mm, data1, 5, 1)
        mm[data1 + 8:data1 + 13] = b"after"
        publish(16)
    return keep


def main():
    rng = random.Random(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    print("connected hostile", flush=True)
    held = []
    for line in sys.stdin:
        for obj in held:
            obj.close()
        case, _, ref = line.strip().partition(" ")
        held = attack(case, json.loads(ref), rng)
        print("done", case, flush=True)


if __name__ == "__main__":
    main()
