"""Worker-side attach cost (issue 14): one-shot, prints JSON.

Usage: ``attach_micro.py PRIV_PYTHON_DIR REQUEST_JSON`` where the request is
``{"ref": <ref of a 4 KiB region>, "bare_id": <id of a memfd region among many live>,
"arena_id": <id of a default 4 KiB (arena) region among many live> (optional),
"arena_ref": <ref of that region> (optional),
"rounds": r, "per_round": n, "scan_iterations": k}``.

Times, in paired rounds (order rotated each round), the median of ``per_round`` runs of:

* ``ref``: ``snakepit_shm.attach(ref)``, ``ndarray()``, ``close()`` (a 4 KiB region
  with ``backend: :memfd``: two memfds);
* ``arena_ref``: the same with the ref of a default 4 KiB region (an arena chunk: one
  object);
* ``mp``: ``multiprocessing.shared_memory.SharedMemory(name=...)``, a numpy view of
  its buffer, ``close()`` (a 4 KiB segment this script created once): Python's own
  attach + close;
* ``bare_id``: ``attach(region_id)``, ``ndarray()``, ``close()`` through the runtime
  index, and ``find``: the bare-id lookup alone;
* ``arena_bare_id`` and ``arena_find``: the same for a region carved from an arena
  (its index entry is an ``arena`` one, written by the VM's background writer);

and, ``scan_iterations`` times, the lookup with the /proc/*/fd scan (the index ignored),
as the fallback costs with the same live regions (``scan``; ``arena_scan``: the scan
and the walk of every arena that finds an arena region without its entry). Prints one JSON object of lists of
microseconds (one per round; the scan: one per iteration).
"""

import json
import os
import statistics
import sys
import time
from multiprocessing import shared_memory

import numpy as np

clock = time.perf_counter_ns


def median_us(fn, count):
    samples = []
    for _ in range(count):
        started = clock()
        fn()
        samples.append(clock() - started)
    return statistics.median(samples) / 1000


def main():
    sys.path.insert(0, sys.argv[1])
    import snakepit_shm
    from snakepit_shm import _locate

    request = json.loads(sys.argv[2])
    ref, bare_id = request["ref"], request["bare_id"]
    arena_id = request.get("arena_id")
    arena_ref = request.get("arena_ref")
    segment = shared_memory.SharedMemory(create=True, size=4096)

    def by_ref():
        region = snakepit_shm.attach(ref)
        words = region.ndarray()
        del words
        region.close()

    def by_id():
        region = snakepit_shm.attach(bare_id)
        words = region.ndarray()
        del words
        region.close()

    def mp():
        shm = shared_memory.SharedMemory(name=segment.name)
        words = np.frombuffer(shm.buf, dtype=np.uint8)
        del words
        shm.close()

    def find():
        _locate.find_by_id(bare_id)

    def arena_by_id():
        region = snakepit_shm.attach(arena_id)
        words = region.ndarray()
        del words
        region.close()

    def by_arena_ref():
        region = snakepit_shm.attach(arena_ref)
        words = region.ndarray()
        del words
        region.close()

    def arena_find():
        _locate.find_by_id(arena_id)

    paths = {"ref": by_ref, "mp": mp, "bare_id": by_id, "find": find}
    if arena_id:
        paths.update(arena_bare_id=arena_by_id, arena_find=arena_find)
    if arena_ref:
        paths.update(arena_ref=by_arena_ref)
    out = {name: [] for name in paths}
    try:
        for fn in paths.values():  # warm: the library, numpy, the tracker
            for _ in range(50):
                fn()
        names = list(paths)
        for round_no in range(request["rounds"]):
            order = names[round_no % len(names):] + names[:round_no % len(names)]
            for name in order:
                out[name].append(median_us(paths[name], request["per_round"]))
        out["index"] = _locate.index_entry(bare_id) is not None
        if arena_id:
            entry = _locate.index_entry(arena_id)
            out["arena_index"] = entry is not None and entry[0] == "arena"
        # The fallback: the index out of the way (a directory that does not exist).
        os.environ[_locate.RUNTIME_DIR_ENV] = "/nonexistent/snakepit_shm_bench"
        out["scan"] = [median_us(find, 1) for _ in range(request["scan_iterations"])]
        if arena_id:
            out["arena_scan"] = [median_us(arena_find, 1)
                                 for _ in range(request["scan_iterations"])]
    finally:
        segment.close()
        segment.unlink()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
