"""A Python peer of the host quota tests: one command per line on stdin, one answer per
line on stdout (see test/support/host_quota_peer.exs for the commands)."""

import math
import os
import sys

import snakepit_shm


def main():
    quota = snakepit_shm.HostQuota.connect(dir=os.environ["SNAKEPIT_SHM_QUOTA_DIR"],
                                           label="quota_peer.py")
    held = {}
    print("READY %d" % os.getpid(), flush=True)
    for line in sys.stdin:
        words = line.split()
        try:
            if words[0] == "reserve":
                wait = int(words[3]) / 1000.0
                res = quota.reserve(words[1], int(words[2]), wait=wait)
                held[str(res.id)] = res
                reply = "ok %d" % res.id
            elif words[0] == "release":
                held.pop(words[1]).release()
                reply = "ok"
            elif words[0] == "used":
                reply = "used %d" % sum(q["used"] for q in quota.usage(words[1]))
            elif words[0] == "stress":
                limit = int(words[2])
                for i in range(1, int(words[3]) + 1):
                    amount = i % max(limit // 2, 1) + 1
                    quota.reserve(words[1], amount, wait=math.inf).release()
                reply = "done"
            else:
                reply = "error unknown command"
        except snakepit_shm.QuotaError as e:
            reply = "error %s" % e.reason
        print(reply, flush=True)


if __name__ == "__main__":
    main()
