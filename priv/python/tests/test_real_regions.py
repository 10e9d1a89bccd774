"""The client against regions created by the real core, in a real Elixir VM.

A peer VM (tests/elixir_peer.exs) creates regions through the NIF and answers
questions about them, so these tests see what the Elixir side sees: holds, writes,
seals, encryption and deallocation done by the other side.
"""

import json
import os
import select
import shutil
import subprocess

import pytest

import _forge
import snakepit_shm
from conftest import REPO, requires_lib

pytestmark = requires_lib
PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "elixir_peer.exs")


def pattern(size, start=0):
    return bytes((i * 7 + 3) % 251 for i in range(start, start + size))


def _peer_command():
    """Return (argv, env) to start the peer, or raise LookupError saying what is missing."""
    elixir = shutil.which("elixir")
    if elixir is None:
        raise LookupError("`elixir` is not on PATH")
    envs = [os.environ.get("MIX_ENV"), "dev", "test"]
    for env in filter(None, envs):
        ebin = os.path.join(REPO, "_build", env, "lib", "snakepit_shm", "ebin")
        if os.path.exists(os.path.join(ebin, "Elixir.Snakepit.SharedMemory.Native.beam")):
            break
    else:
        raise LookupError("the Elixir app is not compiled (no _build/*/lib/snakepit_shm)")
    nif_dir = os.path.join(REPO, "priv")
    if not os.path.exists(os.path.join(nif_dir, "snakepit_shm_nif.so")):
        raise LookupError("priv/snakepit_shm_nif.so is not built")
    return [elixir, "-pa", ebin, PEER], dict(os.environ, SNAKEPIT_SHM_NIF_DIR=nif_dir)


class Peer:
    """A running elixir_peer.exs: one command per line, one reply per line."""

    def __init__(self, argv, env):
        self.process = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=REPO)
        _forge.CREATOR_PIDS.add(self.process.pid)

    def ask(self, *words, timeout=60):
        self.process.stdin.write(" ".join(str(w) for w in words) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, f"the Elixir peer did not answer {words} within {timeout} s"
        reply = self.process.stdout.readline().rstrip("\n")
        status, _, rest = reply.partition(" ")
        return status, rest

    def ok(self, *words):
        status, rest = self.ask(*words)
        assert status == "ok", f"peer: {words} -> {status} {rest}"
        return rest

    def create(self, size, backend, encrypted=False):
        ref = json.loads(self.ok("create", size, backend, int(encrypted)))
        _forge.CREATED_IDS.add(ref["region_id"])
        return ref

    def holds(self, region_id):
        refcount, _, holders = self.ok("header", region_id).partition(" ")
        pids = {int(h.split(":")[0]): (int(h.split(":")[1]), h.split(":")[2] == "true")
                for h in holders.split(",") if h}
        return int(refcount), pids

    def stop(self):
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        finally:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def peer():
    try:
        argv, env = _peer_command()
    except LookupError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the real-region tests, but {exc}")
        pytest.skip(f"{exc}: run `mix compile` first")
    running = Peer(argv, env)
    yield running
    running.stop()


@pytest.mark.parametrize("backend", ["memfd", "posix"])
def test_attach_a_region_created_by_elixir(peer, backend):
    ref = peer.create(70000, backend)
    for target in (ref, json.dumps(ref), ref["region_id"]):
        with snakepit_shm.attach(target) as region:
            assert region.backend == backend and region.size == 70000
            assert region.metadata == {"dtype": "uint8", "shape": [70000],
                                       "from": "elixir"}
            arr = region.ndarray()
            assert arr.shape == (70000,)
            assert arr.tobytes() == pattern(70000)
            del arr


@pytest.mark.parametrize("backend", ["memfd", "posix"])
def test_elixir_sees_the_python_hold(peer, backend):
    ref = peer.create(4096, backend)
    assert peer.holds(ref["region_id"]) == (0, {})
    with snakepit_shm.attach(ref, mode="rw"):
        assert peer.holds(ref["region_id"]) == (1, {os.getpid(): (1, True)})
    assert peer.holds(ref["region_id"]) == (0, {})


@pytest.mark.parametrize("backend", ["memfd", "posix"])
def test_elixir_reads_what_python_wrote(peer, backend):
    ref = peer.create(4096, backend)
    with snakepit_shm.attach(ref, mode="rw") as region:
        region.write(1000, b"from python")
        region.ndarray()[2000] = 0xAB
    assert peer.ok("read", ref["region_id"], 1000, 11) == b"from python".hex()
    assert peer.ok("read", ref["region_id"], 2000, 1) == "ab"


@pytest.mark.parametrize("backend", ["memfd", "posix"])
def test_seal_and_writable_holds_exclude_each_other(peer, backend):
    ref = peer.create(4096, backend)
    writer = snakepit_shm.attach(ref, mode="rw")
    status, reason = peer.ask("seal", ref["region_id"])
    assert status == "error" and reason.startswith("busy")
    writer.close()
    peer.ok("seal", ref["region_id"])
    with pytest.raises(snakepit_shm.PermissionError, match="sealed"):
        snakepit_shm.attach(ref, mode="rw")
    with snakepit_shm.attach(ref) as reader:
        assert reader.sealed and reader.read(0, 10) == pattern(10)


@pytest.mark.parametrize("backend", ["memfd", "posix"])
def test_encrypted_region_of_the_core(peer, backend):
    ref = peer.create(150000, backend, encrypted=True)
    with snakepit_shm.attach(ref, mode="rw") as region:
        assert region.encrypted
        assert region.read() == pattern(150000)
        region.write(65530, b"across chunks")
    assert peer.ok("read", ref["region_id"], 65530, 13) == b"across chunks".hex()
    keyless = {k: v for k, v in ref.items() if k != "key"}
    with snakepit_shm.attach(keyless) as region:
        with pytest.raises(snakepit_shm.PermissionError, match="include_key"):
            region.read()


@pytest.mark.parametrize("backend", ["memfd", "posix"])
def test_deallocated_by_elixir(peer, backend):
    ref = peer.create(4096, backend)
    peer.ok("deallocate", ref["region_id"])
    with pytest.raises(snakepit_shm.RegionNotFound):
        snakepit_shm.attach(ref)


def test_the_core_boot_id_is_the_one_refs_are_checked_against(peer):
    # export_ref/2 writes the core's boot id (Native.self_info/0), the one in headers.
    ref = peer.create(64, "memfd")
    from snakepit_shm import _locate
    assert snakepit_shm.inspect(ref)["boot_id"] == _locate.host_boot_id()
