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


BOARD_PEER = """
# Logger writes to stdout, where the test reads READY: the start-up sweep's info lines
# (segments and channel directories other tests left) must not come first.
Logger.configure(level: :warning)
{:ok, _} = Application.ensure_all_started(:snakepit_shm)
[name] = System.argv()
{:ok, board} = Snakepit.SharedMemory.StatusBoard.create(name, capacity: 4)
IO.puts("READY")
IO.gets("")
Snakepit.SharedMemory.StatusBoard.delete(board)
"""

BOARD_CHILD = textwrap.dedent("""
    import os, sys
    from snakepit_shm import board
    name, path = sys.argv[1], sys.argv[2]
    slot = board.StatusBoard.join(name, "w1")
    slot.update(state="busy", queue=3)
    os.truncate(path, 0)
    print("TRUNCATED", flush=True)
    for label, call in [("deleted", lambda: slot.deleted),
                        ("update", lambda: slot.update(queue=4))]:
        try:
            print(label, "returned", call(), flush=True)
        except Exception as exc:
            print(label, "error", type(exc).__name__, exc, flush=True)
    slot.leave()
    print("ALIVE", flush=True)
""")


def test_a_worker_on_a_truncated_status_board_lives():
    """The board's segment is a POSIX segment too: a worker's update() after a peer
    truncated it died of SIGBUS (the fault guard was only installed by attach)."""
    from test_real_regions import _peer_command
    import secrets
    try:
        argv, env = _peer_command()
    except LookupError as exc:
        pytest.skip(str(exc))
    name = "a3tb" + secrets.token_hex(4)
    script = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"board_peer_{name}.exs")
    with open(script, "w") as f:
        f.write(BOARD_PEER)
    peer = subprocess.Popen(argv[:-1] + [script, name], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout.readline().strip() == "READY"
        child = _run(BOARD_CHILD, name, f"/dev/shm/spshm_n_{name}")
        assert child.returncode == 0, child.stdout + child.stderr[-2000:]
        assert "ALIVE" in child.stdout
        update = [x for x in child.stdout.splitlines() if x.startswith("update ")][0]
        assert update.startswith("update error"), child.stdout
    finally:
        peer.communicate("\n", timeout=60)
        os.unlink(script)
