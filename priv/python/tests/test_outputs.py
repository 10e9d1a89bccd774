"""Worker outputs (issue 13): allocate(), from_array(), the keep-alive until adoption."""

import gc
import json
import os
import subprocess
import sys
import time

import numpy
import pytest

import snakepit_shm
from snakepit_shm import _format as F
from conftest import requires_lib

pytestmark = requires_lib


def _adopt_by_hand(ref):
    """What the VM's adopt_region/2 does to the header: set the adopted bit."""
    fd = os.open(ref["control_path"], os.O_RDWR)
    try:
        state = int.from_bytes(os.pread(fd, 4, 2048), "little")
        os.pwrite(fd, (state | F.STATE_ADOPTED).to_bytes(4, "little"), 2048)
    finally:
        os.close(fd)


def _wait(predicate, seconds=10):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_allocate_a_typed_output_and_hand_back_its_ref():
    with snakepit_shm.allocate(24, dtype="float64", shape=(3,),
                               metadata={"tool": "t"}) as out:
        out.ndarray()[:] = [1.5, 2.5, 3.5]
        ref = out.ref
    assert ref["owner"] == "python" and ref["format"] == "numpy"
    assert ref["dtype"] == "float64" and ref["shape"] == [3]
    assert ref["metadata"] == {"tool": "t", "dtype": "float64", "shape": [3],
                               "format": "numpy"}
    json.dumps(ref)  # JSON-encodable, as Snakepit sends it
    # Closed, but kept alive for the VM: another process can still attach it.
    assert ref["region_id"] in snakepit_shm.pending_outputs()
    with snakepit_shm.attach(json.dumps(ref)) as again:
        assert again.ndarray().tolist() == [1.5, 2.5, 3.5]
    _adopt_by_hand(ref)
    assert _wait(lambda: ref["region_id"] not in snakepit_shm.pending_outputs())


def test_from_array_copies_dtype_shape_and_data():
    source = numpy.arange(12, dtype=numpy.int32).reshape(3, 4)[:, ::2]  # not contiguous
    region = snakepit_shm.from_array(source)
    arr = region.ndarray()
    assert arr.dtype == numpy.int32 and arr.shape == (3, 2)
    assert (arr == source).all()
    marker = region.zero_copy_ref()
    assert marker["__snakepit_zero_copy__"] is True and marker["kind"] == "shm"
    assert marker["bytes"] == 24 and marker["shape"] == [3, 2]
    del arr
    region.close()
    snakepit_shm.discard(region)
    assert region.region_id not in snakepit_shm.pending_outputs()
    with pytest.raises(snakepit_shm.RegionNotFound):
        snakepit_shm.attach(marker)


def test_posix_output_is_a_dev_shm_segment_removed_when_given_up():
    out = snakepit_shm.allocate(100, backend="posix")
    path = os.path.join("/dev/shm", out.region_id)
    assert os.path.exists(path) and out.backend == "posix"
    assert out.ref["format"] == "raw" and "control_path" not in out.ref
    out.close()
    assert os.path.exists(path)  # waiting for adoption
    snakepit_shm.discard(out.region_id)
    assert not os.path.exists(path)


def _lock_held_elsewhere(path):
    """True if some other open of `path` holds its liveness lock (byte 0), as the
    sweepers of every VM ask the kernel."""
    import fcntl
    import struct
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query)
        return struct.unpack("hhqqi4x", answer)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def test_pending_posix_output_holds_its_liveness_lock_until_given_up():
    # Found by attack run 3: once the Region was closed, only a plain descriptor kept a
    # pending POSIX output, and every VM's orphan sweep removed the live worker's output.
    out = snakepit_shm.allocate(100, backend="posix")
    path = os.path.join("/dev/shm", out.region_id)
    out.close()
    assert _lock_held_elsewhere(path)
    snakepit_shm.discard(out.region_id)
    assert not os.path.exists(path)


def _sweep_like_a_vm(path):
    """What every VM's orphan sweep does to a segment (Native.sweep_segment): take the
    liveness byte exclusively (F_OFD_SETLK, never waiting); if nobody holds it, remove
    the name. True if it removed it."""
    import fcntl
    import struct
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                        struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
        except OSError:
            return False
        os.unlink(path)
        return True
    finally:
        os.close(fd)


def test_posix_output_is_held_from_the_instant_create_returns(monkeypatch):
    # Found by attack run 4 (D): the core's create closed its own open of a POSIX output
    # and the worker re-opened it by name and locked it after, so a sweep in between
    # (any VM's, and since the presence sockets every VM sweeps whenever any worker or
    # VM connected to it exits) removed the live worker's output, and allocate() raised
    # "removed by an orphan sweep while it was being created".
    from snakepit_shm import _native
    lib = _native.library()
    real_create = type(lib).create
    swept = []

    def create_then_sweep(self, size, backend, metadata_json, idle_timeout_ns=0):
        created = real_create(self, size, backend, metadata_json, idle_timeout_ns)
        if backend == F.BACKEND_POSIX:
            swept.append(_sweep_like_a_vm(os.path.join("/dev/shm", created[0])))
        return created

    monkeypatch.setattr(type(lib), "create", create_then_sweep)
    out = snakepit_shm.allocate(100, backend="posix")
    path = os.path.join("/dev/shm", out.region_id)
    try:
        assert swept == [False], "a sweep found the worker's new output unheld"
        out.close()
        assert os.path.exists(path) and _lock_held_elsewhere(path)
    finally:
        snakepit_shm.discard(out.region_id)
    assert not os.path.exists(path)


def test_adopted_posix_output_is_not_removed():
    out = snakepit_shm.allocate(100, backend="posix")
    path = os.path.join("/dev/shm", out.region_id)
    _adopt_by_hand({"control_path": path})
    assert _wait(lambda: out.region_id not in snakepit_shm.pending_outputs())
    out.close()
    assert os.path.exists(path)
    os.unlink(path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(size=0), "positive"),
    (dict(size=16, dtype="float33"), "not a numpy dtype"),
    (dict(size=16, dtype="float32", shape=[100]), "needs 400 bytes"),
    (dict(size=10, dtype="float64"), "whole number"),
    (dict(size=16, dtype=numpy.dtype([("a", "<i4")])), "cannot be shared"),
    (dict(size=16, metadata={"format": "pickle"}), "format"),
    (dict(size=16, backend="shm"), "backend"),
    # Found by attack runs: each of these used to be accepted.
    (dict(size=16, metadata={"x": float("nan")}), "JSON"),
    (dict(size=16, timeout=-1), "timeout"),
    (dict(size=16, timeout=float("nan")), "timeout"),
    (dict(size=16, timeout="10"), "timeout"),
    (dict(size=16, keep_seconds=-1), "keep_seconds"),
    (dict(size=16, keep_seconds=float("nan")), "keep_seconds"),
    (dict(size=16, dtype="uint8", shape=[2 ** 64, 0]), "shape"),
    (dict(size=16, dtype="uint8", shape=[1] * 65), "64"),
    (dict(size=16, metadata="abc"), "metadata must be a dict"),
    (dict(size=16, metadata=[1, 2]), "metadata must be a dict"),
    # Attack run 5 (E2): adopted, the first lost all its metadata (dtype and shape
    # too) at the VM, the second read "a" there and "b" here, the others could not be
    # exported or read as Nx tensors by the VM.
    (dict(size=16, dtype="float32", shape=[4], metadata={"src": "x\udcff.npy"}),
     "lone surrogate"),
    (dict(size=16, metadata={"n": {1: "a", "1": "b"}}), "collide"),
    (dict(size=48, dtype="longdouble", shape=[3]), "astype"),
    (dict(size=96, dtype="clongdouble", shape=[3]), "astype"),
])
def test_allocate_validates_where_the_mistake_is_made(kwargs, match):
    before = snakepit_shm.pending_outputs()
    with pytest.raises(ValueError, match=match):
        snakepit_shm.allocate(**kwargs)
    assert snakepit_shm.pending_outputs() == before


def test_unadopted_output_dies_with_a_killed_worker():
    script = ("import json, sys, time, snakepit_shm\n"
              "out = snakepit_shm.allocate(4096)\n"
              "print(json.dumps(out.ref), flush=True)\n"
              "time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             text=True, env=os.environ)
    try:
        ref = json.loads(child.stdout.readline())
        region = snakepit_shm.attach(ref)  # alive while the worker keeps it
        region.close()
    finally:
        child.kill()
        child.wait()
    with pytest.raises(snakepit_shm.RegionNotFound):
        snakepit_shm.attach(ref)


def test_forked_child_does_not_keep_the_parent_outputs():
    out = snakepit_shm.allocate(64)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.write(write, json.dumps(snakepit_shm.pending_outputs()).encode())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert json.loads(os.read(read, 4096)) == []
    os.close(read)
    os.close(write)
    out.close()
    snakepit_shm.discard(out)
    gc.collect()


def test_allocate_takes_numpy_integers_for_size_and_shape():
    # Found by an attack run: sizes computed with numpy (4 * numpy.int64(n)) were
    # refused as "not a positive int".
    n = numpy.int64(4)
    out = snakepit_shm.allocate(4 * n, dtype="float32", shape=[n, numpy.int32(1)])
    try:
        assert out.size == 16
        assert out.ref["shape"] == [4, 1] and type(out.ref["shape"][0]) is int
        json.dumps(out.ref)
        assert out.ndarray().shape == (4, 1)
    finally:
        out.close()
        snakepit_shm.discard(out.region_id)
    with pytest.raises(ValueError):
        snakepit_shm.allocate(numpy.bool_(True))


def test_ndarray_takes_numpy_integers_in_its_shape():
    out = snakepit_shm.allocate(24)
    try:
        arr = out.ndarray("float32", shape=(numpy.int64(2), numpy.int32(3)))
        assert arr.shape == (2, 3)
        del arr
        assert out.ndarray("uint8", shape=numpy.int64(24)).shape == (24,)
    finally:
        out.close()
        snakepit_shm.discard(out.region_id)


def test_a_region_cannot_be_copied_or_pickled():
    # Found by an attack run: copy.copy() shared the mmaps, and closing the copy left
    # the original "open" over unmapped memory.
    import copy
    import pickle
    out = snakepit_shm.allocate(16)
    try:
        for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="ref"):
                attempt(out)
        out.write(0, b"still usable")
    finally:
        out.close()
        snakepit_shm.discard(out.region_id)


def test_from_array_copies_a_strided_or_broadcast_array_without_a_temporary():
    # Found by an attack run: numpy.ascontiguousarray() first made a full private copy
    # (a broadcast scalar of 32 MiB cost 32 MiB of worker memory before the copy).
    import tracemalloc
    src = numpy.broadcast_to(numpy.float64(2.5), (4 * 1024 * 1024,))
    tracemalloc.start()
    try:
        out = snakepit_shm.from_array(src)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        assert peak < 4 * 1024 * 1024
        arr = out.ndarray()
        assert arr.shape == src.shape and float(arr[0]) == 2.5 and float(arr[-1]) == 2.5
        del arr
        strided = numpy.arange(30, dtype=numpy.int32).reshape(5, 6)[:, ::2].T
        out2 = snakepit_shm.from_array(strided)
        try:
            assert (out2.ndarray() == strided).all()
            assert out2.ref["shape"] == [3, 5]
        finally:
            out2.close()
            snakepit_shm.discard(out2.region_id)
    finally:
        out.close()
        snakepit_shm.discard(out.region_id)


def test_an_output_given_up_unadopted_at_keep_seconds_says_so():
    # Attack run 5 (E2): an output nobody adopted within keep_seconds (600 s by
    # default; a slow queue on the Elixir side) was freed without a word, and the VM's
    # later adopt_region/2 failed with :not_found naming neither cause nor remedy.
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lost = snakepit_shm.allocate(64, keep_seconds=0.2)
        adopted = snakepit_shm.allocate(64, keep_seconds=0.2)
        given_up = snakepit_shm.allocate(64, keep_seconds=0.2)
        lost.close()
        adopted.close()
        given_up.close()
        _adopt_by_hand(adopted.ref)
        snakepit_shm.discard(given_up)
        ids = {lost.region_id, adopted.region_id}
        assert _wait(lambda: not ids & set(snakepit_shm.pending_outputs()))
        time.sleep(0.1)
    said = [str(w.message) for w in caught
            if issubclass(w.category, snakepit_shm.UnadoptedOutputWarning)]
    assert len(said) == 1, said
    assert lost.region_id in said[0] and "keep_seconds=0.2" in said[0]
    with pytest.raises(snakepit_shm.RegionNotFound):
        snakepit_shm.attach(lost.ref)


def test_out_of_descriptors_with_outputs_pending_says_they_hold_them():
    # Attack run 5 (E2): a worker making outputs faster than the VM adopts them ran out
    # of descriptors with "close regions and files it no longer uses", naming nothing
    # it could close: its pending outputs hold 2 descriptors each until adopted.
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    made = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 24, hard))
    try:
        with pytest.raises(snakepit_shm.SnakepitShmError, match="unadopted outputs") as info:
            for _ in range(100):
                out = snakepit_shm.allocate(64)
                out.close()
                made.append(out)
        assert "descriptors" in str(info.value) and "discard()" in str(info.value)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for out in made:
            snakepit_shm.discard(out)
    assert not set(o.region_id for o in made) & set(snakepit_shm.pending_outputs())


def test_a_worker_exiting_right_after_its_reply_waits_for_the_adoption():
    # Attack run 5 (E2): a worker that returned an output's ref and then exited normally
    # (a recycled pool worker, a one-shot script) took the output with it, mostly
    # before the VM had read the reply: the result was lost. At exit it now waits for
    # the adoption (SNAKEPIT_SHM_EXIT_GRACE, 5 s by default), then warns of what is lost.
    script = ("import json, numpy, snakepit_shm\n"
              "out = snakepit_shm.from_array(numpy.arange(4.0))\n"
              "out.close()\n"
              "print(json.dumps(out.ref), flush=True)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=os.environ)
    ref = json.loads(child.stdout.readline())
    time.sleep(0.3)  # the VM reads the reply a little later
    assert child.poll() is None, "the worker exited with its output unadopted"
    region = snakepit_shm.attach(ref)  # what adopt_region/2 opens
    try:
        _adopt_by_hand(ref)
        child.wait(timeout=3)  # leaves once adopted, not at the end of the grace
        assert child.returncode == 0
        assert list(region.ndarray()) == [0.0, 1.0, 2.0, 3.0]
    finally:
        region.close()
    assert "UnadoptedOutputWarning" not in child.stderr.read()

    # Nobody adopts: the worker leaves after the grace and says what is lost.
    env = dict(os.environ, SNAKEPIT_SHM_EXIT_GRACE="0.2")
    lost = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=30)
    assert lost.returncode == 0
    region_id = json.loads(lost.stdout)["region_id"]
    assert "UnadoptedOutputWarning" in lost.stderr and region_id in lost.stderr
