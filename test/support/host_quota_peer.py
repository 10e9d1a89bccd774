"""A Python peer of the host quota tests: one command per line on stdin, one answer per
line on stdout (see test/support/host_quota_peer.exs for the commands; also
``cycle NAME AMOUNT N`` -> done | error REASON)."""

import math
import os
import sys
import threading

import snakepit_shm


def cycle(quota, name, amount, n):
    """n times: reserve the whole quota (wait=0) and release it the default way
    (pipelined), alternately in two threads handing over after each release: every
    reserve must find the amount free (one ordered socket)."""
    turns = [threading.Semaphore(1), threading.Semaphore(0)]
    failures = []

    def run(me):
        for _ in range(n // 2):
            turns[me].acquire()
            try:
                quota.reserve(name, amount).release()
            except snakepit_shm.QuotaError as e:
                failures.append(e.reason)
            turns[1 - me].release()

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return "error %s" % failures[0] if failures else "done"


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
            elif words[0] == "cycle":
                reply = cycle(quota, words[1], int(words[2]), int(words[3]))
            else:
                reply = "error unknown command"
        except snakepit_shm.QuotaError as e:
            reply = "error %s" % e.reason
        print(reply, flush=True)


if __name__ == "__main__":
    main()
