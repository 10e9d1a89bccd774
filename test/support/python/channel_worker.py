"""Worker for the channel tests: connects with the ref in $SPSHM_CHANNEL_REF and runs a mode.

echo          send back every message until the channel closes
echo_checksum reply with "<len>:<crc32>" of every message (checks content without copying
              large messages back)
sink N        receive N messages, then send b"done:<count>:<crc of all>"
slow          sleep 0.05 s before each receive (back-pressure)
burst N SIZE  send N messages of SIZE bytes, then wait for the channel to close
drain DELAY   sleep DELAY seconds, then receive until the channel closes and print
              "received <count> <reason>"
hang          connect, then sleep forever (to be killed)
"""
import json
import os
import sys
import time
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "priv", "python"))

import snakepit_shm  # noqa: E402


def main():
    ref = json.loads(os.environ["SPSHM_CHANNEL_REF"])
    mode = sys.argv[1]
    args = sys.argv[2:]
    with snakepit_shm.Channel.connect(ref) as ch:
        print("connected", ch.transport, flush=True)
        try:
            if mode == "echo":
                while True:
                    ch.send(ch.recv())
            elif mode == "echo_checksum":
                while True:
                    m = ch.recv()
                    ch.send(b"%d:%d" % (len(m), zlib.crc32(m)))
            elif mode == "sink":
                n = int(args[0])
                crc = 0
                for _ in range(n):
                    m = ch.recv()
                    crc = zlib.crc32(m, crc)
                ch.send(b"done:%d:%d" % (n, crc))
                ch.recv()
            elif mode == "slow":
                while True:
                    time.sleep(0.05)
                    ch.send(ch.recv())
            elif mode == "burst":
                n, size = int(args[0]), int(args[1])
                for i in range(n):
                    ch.send(i.to_bytes(4, "little") * (size // 4))
                ch.recv()
            elif mode == "drain":
                time.sleep(float(args[0]))
                n = 0
                try:
                    while True:
                        ch.recv(timeout=30)
                        n += 1
                except snakepit_shm.ChannelClosed as exc:
                    print("received", n, exc.reason, flush=True)
            elif mode == "hang":
                time.sleep(3600)
        except snakepit_shm.ChannelClosed as exc:
            print("closed", exc.reason, flush=True)


if __name__ == "__main__":
    main()
