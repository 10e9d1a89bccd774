"""A POSIX segment truncated by a peer (same uid: it may ``ftruncate`` the segment)
while a worker maps it: the worker's reads, writes and header checks must turn the lost
pages into an error, never a SIGBUS that kills the worker."""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import requires_lib

pytestmark = requires_lib

CHILD = textwrap.dedent("""
    import os, sys, warnings
    import snakepit_shm
    warnings.simplefilter("ignore")
    region_id, path, length = sys.argv[1], sys.argv[2], int(sys.argv[3])
    region = snakepit_shm.attach(region_id, "rw")
    assert region.read(0, 4) == b"\\x07" * 4
    os.truncate(path, length)  # what a hostile peer does (the kernel does not care who)
    print("TRUNCATED", flush=True)
    for label, call in [("read", lambda: region.read(0, 100)),
                        ("read_end", lambda: region.read(region.size - 10, 10)),
                        ("readinto", lambda: region.readinto(bytearray(100))),
                        ("write", lambda: region.write(0, b"x" * 100)),
                        ("write_end", lambda: region.write(region.size - 10, b"x" * 10)),
                        ("buf", lambda: bytes(region.buf[-10:]))]:
        try:
            call()
            print(label, "returned", flush=True)
        except snakepit_shm.SnakepitShmError as exc:
            print(label, "error", type(exc).__name__, exc, flush=True)
    region.close()
    print("ALIVE", flush=True)
""")


def _run(script, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("length", [0, 4096 + 8192])
def test_a_truncated_posix_segment_is_an_error_not_a_sigbus(forge, length):
    seg = forge.posix(65536, data=b"\x07" * 65536)
    child = _run(CHILD, seg.region_id, seg.control_path, length)
    out = child.stdout
    assert child.returncode == 0, f"worker died (status {child.returncode}): {out}" \
                                  f"{child.stderr[-2000:]}"
    assert "TRUNCATED" in out and "ALIVE" in out
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    # the data lost by the truncation is refused, naming the cause; what is left works
    lost = ["read_end", "write_end"] + (["read", "readinto", "write"] if length == 0 else [])
    for label in ("read", "read_end", "readinto", "write", "write_end"):
        if label in lost:
            assert lines[label].startswith("error") and "truncated" in lines[label], out
        else:
            assert lines[label] == "returned", out
    # a raw view of lost pages reads zeros (the page was replaced), it does not kill
    assert lines["buf"] == "returned", out


ENCRYPTED_CHILD = textwrap.dedent("""
    import json, os, sys, warnings
    import snakepit_shm
    warnings.simplefilter("ignore")
    ref = json.loads(sys.argv[1])
    region = snakepit_shm.attach(ref, "rw")
    assert region.read(0, 4) == b"\\x07" * 4
    os.truncate(ref["control_path"], 4096 + 8192)
    for label, call in [("read", lambda: region.read(0, region.size)),
                        ("write", lambda: region.write(region.size - 10, b"x" * 10))]:
        try:
            call()
            print(label, "returned", flush=True)
        except snakepit_shm.SnakepitShmError as exc:
            print(label, "error", type(exc).__name__, exc, flush=True)
    region.close()
    print("ALIVE", flush=True)
""")


def test_a_truncated_encrypted_segment_says_truncated(forge):
    """The chunks past the cut read as zeros: not a failed authentication (\"modified
    outside snakepit_shm\") but the truncation."""
    import json
    seg = forge.posix(65536, data=b"\x07" * 65536, key=os.urandom(32))
    child = _run(ENCRYPTED_CHILD, json.dumps(seg.ref()))
    assert child.returncode == 0, child.stdout + child.stderr[-2000:]
    assert "ALIVE" in child.stdout
    for label in ("read", "write"):
        line = [x for x in child.stdout.splitlines() if x.startswith(label + " ")][0]
        assert "was truncated by another process" in line, child.stdout
