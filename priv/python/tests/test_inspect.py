"""inspect() and `python3 -m snakepit_shm info`: read-only, no hold, no C library."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import snakepit_shm
from snakepit_shm import _format as F
from _forge import random_region_id


@pytest.mark.parametrize("backend", ["posix", "memfd"])
def test_inspect_reports_the_header_without_holding(forge, backend):
    seg = getattr(forge, backend)(100, metadata={"dtype": "uint8"})
    for target in (seg.region_id, seg.ref(), json.dumps(seg.ref())):
        info = snakepit_shm.inspect(target)
        assert info["region_id"] == seg.region_id
        assert info["backend"] == backend
        assert info["size"] == 100 and info["capacity"] == 100
        assert info["metadata"] == {"dtype": "uint8"}
        assert info["creator_pid"] == os.getpid()
        assert info["refcount"] == 0 and info["holders"] == []
        assert not info["sealed"] and not info["deallocated"] and not info["expired"]
    assert seg.u32("refcount") == 0


def test_inspect_reports_state_bits(forge):
    seg = forge.posix(64)
    seg.set_u32("state", F.STATE_SEALED | F.STATE_DEALLOCATED)
    info = snakepit_shm.inspect(seg.region_id)
    assert info["sealed"] and info["deallocated"]


def test_inspect_validates(forge):
    seg = forge.posix(64)
    seg.patch(0, b"XXXXXXXX")
    with pytest.raises(snakepit_shm.CorruptRegion, match="bad magic"):
        snakepit_shm.inspect(seg.region_id)
    with pytest.raises(snakepit_shm.RegionNotFound):
        snakepit_shm.inspect(random_region_id())


def run_cli(*args, stdin=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-m", "snakepit_shm", *args], env=env,
                          input=stdin, capture_output=True, text=True, timeout=60)


def test_cli_info_prints_json(forge):
    seg = forge.memfd(256, metadata={"shape": [16, 16]})
    # The memfds live in this process: the CLI child finds them by id in /proc.
    result = run_cli("info", seg.region_id)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["region_id"] == seg.region_id and info["size"] == 256
    assert info["metadata"] == {"shape": [16, 16]}
    from_stdin = run_cli("info", "-", stdin=json.dumps(seg.ref()))
    assert json.loads(from_stdin.stdout)["region_id"] == seg.region_id


def test_cli_exit_codes():
    missing = run_cli("info", random_region_id())
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    bad = run_cli("info", "not-an-id")
    assert bad.returncode == 1 and "not a snakepit_shm region id" in bad.stderr
    usage = run_cli()
    assert usage.returncode == 2


def test_attach_without_the_library_says_how_to_build_it(forge, monkeypatch):
    from snakepit_shm import _native
    seg = forge.posix(64)
    monkeypatch.setenv("SNAKEPIT_SHM_LIB", "/nonexistent/libsnakepit_shm.so")
    monkeypatch.setattr(_native, "_library", None)
    with pytest.raises(snakepit_shm.LibraryNotFound, match="mix compile"):
        snakepit_shm.attach(seg.region_id)
    assert seg.u32("refcount") == 0


def test_cli_reader_gone_is_no_traceback(forge):
    """`python3 -m snakepit_shm info ID | head -1`: the reader closes the pipe before the
    output is written; no traceback, not even from the interpreter's last flush."""
    seg = forge.memfd(256)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-m", "snakepit_shm", "info", seg.region_id],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()
    _, err = child.communicate(timeout=60)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
    assert child.returncode == 1


def test_cli_interrupted_while_reading_stdin_is_no_traceback():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-m", "snakepit_shm", "info", "-"], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        # wait until it blocks reading stdin (syscall 0 on fd 0, x86-64), then Ctrl-C
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with open(f"/proc/{child.pid}/syscall") as f:
                if f.read().startswith("0 0x0 "):
                    break
            time.sleep(0.01)
        else:
            pytest.skip("the CLI never blocked reading stdin (not x86-64?)")
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
        child.wait()
    assert b"Traceback" not in err, err.decode()
    assert child.returncode == 130 and b"interrupted" in err


def test_cli_messages_cut_a_huge_target():
    result = run_cli("info", "-", stdin="x" * 1_000_000)
    assert result.returncode == 1
    assert "not a snakepit_shm region id" in result.stderr
    assert len(result.stderr) < 1000
