"""Bench helper of part host_quota: the Python side of the host quota server.

    quota_client.py rt DIR NAME N        -> {"ns_per_pair": X, "spin_hits": H, "spin_misses": M}
                                            (reserve + release, the defaults, N pairs)
    quota_client.py rt-sync DIR NAME N   -> the same with release(sync=True)
    quota_client.py rt-nospin DIR NAME N -> the same with connect(spin=0)
    quota_client.py hold DIR NAME AMOUNT -> prints READY, then on the line "die" prints
                                            KILL <CLOCK_REALTIME ns> and SIGKILLs itself
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "priv", "python"))

import snakepit_shm  # noqa: E402


def main():
    mode, qdir, name = sys.argv[1], sys.argv[2], sys.argv[3]
    spin = {"spin": 0} if mode == "rt-nospin" else {}
    quota = snakepit_shm.HostQuota.connect(dir=qdir, label="bench", **spin)
    if mode in ("rt", "rt-sync", "rt-nospin"):
        n = int(sys.argv[4])
        release = {"sync": True} if mode == "rt-sync" else {}
        for _ in range(min(n, 500)):
            quota.reserve(name, 1).release(**release)
        before = quota.stats()
        t0 = time.perf_counter_ns()
        for _ in range(n):
            quota.reserve(name, 1).release(**release)
        ns = (time.perf_counter_ns() - t0) / n
        stats = quota.stats()
        print('{"ns_per_pair": %.1f, "spin_hits": %d, "spin_misses": %d}'
              % (ns, stats["spin_hits"] - before["spin_hits"],
                 stats["spin_misses"] - before["spin_misses"]), flush=True)
    elif mode == "hold":
        quota.reserve(name, int(sys.argv[4]))
        print("READY", flush=True)
        sys.stdin.readline()
        print("KILL %d" % time.time_ns(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
