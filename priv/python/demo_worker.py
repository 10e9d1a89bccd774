"""Persistent Python worker of `mix snakepit.shm.demo`.

Started by the demo through an Erlang Port (stdin/stdout, `{packet, 4}`: every message
is a 4-byte big-endian length followed by that many bytes).  A request's first byte
says what it is:

* ``J`` + a JSON object: a command (below); the reply is one JSON object.
* ``B`` + raw bytes: the Port baseline: the payload itself came through the pipe; the
  worker reads every byte (xor over a uint64 view) and replies like ``read``.

Commands (``"op"``):

* ``hello``: versions and pid.
* ``read``: attach ``ref`` read-only (or reuse the attachment kept by an earlier
  ``read`` with ``"keep": true``), xor-reduce every byte, reply the xor.  Without
  ``keep`` the region is closed again before replying.
* ``verify``: attach ``ref`` and check the data with numpy, zero-copy: equal to
  ``arange(n) & 0xFFFFFF`` as float32, the float64 sum, and that the array's buffer
  lies inside a shared mapping of the region (from /proc/self/maps).
* ``compute``: attach ``ref`` read-only and ``out`` read-write; write the float64 sum
  of every row of ``ref`` into ``out``.
* ``release``: close kept attachments.  ``quit``: exit.

Errors are replied as ``{"ok": false, "error": "..."}``; the worker keeps running.
"""

import json
import os
import struct
import sys
import time

import numpy as np

import snakepit_shm

MASK = 0xFFFFFF  # values stay exact integers in float32
CHUNK = 1 << 20  # elements per chunk when comparing against the expected values


class Worker:
    """The worker's state: attachments kept between requests, the pipe buffer."""

    def __init__(self, stdin, stdout):
        self.stdin = stdin
        self.stdout = stdout
        self.kept = {}
        self.pipe_buffer = bytearray()

    def serve(self):
        """Answer requests until ``quit`` or the end of stdin."""
        while True:
            length = self._read_length()
            if length is None:
                break
            kind = self.stdin.read(1)
            if kind == b"B":
                reply = self._port_payload(length - 1)
            else:
                request = json.loads(self._read_exactly(length - 1))
                if request.get("op") == "quit":
                    self.release()
                    self._reply({"ok": True})
                    break
                reply = self._command(request)
            self._reply(reply)
        self.release()

    def _command(self, request):
        handler = getattr(self, "op_" + str(request.get("op")), None)
        if handler is None:
            return {"ok": False, "error": f"unknown op {request.get('op')!r}"}
        try:
            started = time.perf_counter()
            reply = handler(request)
            reply.setdefault("ok", True)
            reply["worker_us"] = round((time.perf_counter() - started) * 1e6)
            return reply
        except Exception as exc:  # reported to Elixir, which prints it
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    # ---- commands ----

    def op_hello(self, _request):
        return {"pid": os.getpid(), "python": sys.version.split()[0],
                "numpy": np.__version__, "client": snakepit_shm.__version__}

    def op_read(self, request):
        ref = request["ref"]
        region_id = ref["region_id"]
        region = self.kept.get(region_id)
        fresh = region is None
        if fresh:
            region = snakepit_shm.attach(ref)
        words = region.ndarray(dtype=np.uint64, shape=(region.size // 8,))
        value = int(np.bitwise_xor.reduce(words))
        del words
        if request.get("keep"):
            self.kept[region_id] = region
        elif fresh:
            region.close()
        return {"xor": value, "attached": fresh}

    def op_verify(self, request):
        with snakepit_shm.attach(request["ref"]) as region:
            array = region.ndarray()
            flat = array.reshape(-1)
            equal = all(
                np.array_equal(flat[start:start + CHUNK], _expected(start, CHUNK, flat.size))
                for start in range(0, flat.size, CHUNK))
            address = array.__array_interface__["data"][0]
            mapping = _mapping_of(address)
            reply = {
                "dtype": str(array.dtype),
                "shape": list(array.shape),
                "equal": equal,
                "sum": int(flat.sum(dtype=np.float64)),
                "address": address,
                "mapping": mapping,
                "zero_copy": _is_region_mapping(mapping, region.region_id, address,
                                                array.nbytes),
                "holders": [h["pid"] for h in region.info()["holders"]],
            }
            del array, flat
            return reply

    def op_compute(self, request):
        with snakepit_shm.attach(request["ref"]) as data, \
                snakepit_shm.attach(request["out"], mode="rw") as out:
            matrix = data.ndarray()
            sums = out.ndarray()
            np.sum(matrix, axis=1, dtype=np.float64, out=sums)
            first = float(sums[0])
            del matrix, sums
            return {"rows": request["out"]["shape"][0], "first": first}

    def op_release(self, _request):
        count = len(self.kept)
        self.release()
        return {"released": count}

    def release(self):
        """Close every kept attachment."""
        for region in self.kept.values():
            region.close()
        self.kept.clear()

    # ---- the Port baseline ----

    def _port_payload(self, length):
        if len(self.pipe_buffer) != length:
            self.pipe_buffer = bytearray(length)
        view = memoryview(self.pipe_buffer)
        self._read_into(view)
        words = np.frombuffer(self.pipe_buffer, dtype=np.uint64, count=length // 8)
        value = int(np.bitwise_xor.reduce(words))
        del words, view
        return {"ok": True, "xor": value}

    # ---- framing ----

    def _read_length(self):
        header = self.stdin.read(4)
        if len(header) < 4:
            return None
        return struct.unpack(">I", header)[0]

    def _read_exactly(self, length):
        data = self.stdin.read(length)
        if len(data) != length:
            raise EOFError("stdin closed in the middle of a message")
        return data

    def _read_into(self, view):
        done = 0
        while done < len(view):
            got = self.stdin.readinto(view[done:])
            if not got:
                raise EOFError("stdin closed in the middle of a message")
            done += got

    def _reply(self, reply):
        body = json.dumps(reply).encode()
        self.stdout.write(struct.pack(">I", len(body)) + body)
        self.stdout.flush()


def _expected(start, count, total):
    """The values the demo writes: float32(i & 0xFFFFFF) for i in [start, start+count)."""
    stop = min(start + count, total)
    return (np.arange(start, stop, dtype=np.int64) & MASK).astype(np.float32)


def _mapping_of(address):
    """The line of /proc/self/maps whose range holds ``address``, as a dict."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                path = fields[5].strip() if len(fields) > 5 else ""
                return {"start": low, "end": high, "perms": fields[1], "path": path}
    return None


def _is_region_mapping(mapping, region_id, address, nbytes):
    """True if the array lies in a shared mapping of the region's own segment."""
    if mapping is None or address + nbytes > mapping["end"]:
        return False
    path = mapping["path"]
    names = (f"/dev/shm/{region_id}", f"/memfd:{region_id}.data")
    return mapping["perms"][3] == "s" and path.startswith(names)


def main():
    worker = Worker(sys.stdin.buffer, sys.stdout.buffer)
    # Nothing else may write on stdout: it carries the framed replies.
    sys.stdout = sys.stderr
    worker.serve()


if __name__ == "__main__":
    main()
