"""resolve(), Snakepit markers in attach(), asyncio helpers (issue 13)."""

import asyncio
import gc
import json

import numpy
import pytest

import snakepit_shm
from conftest import requires_lib

pytestmark = requires_lib


def marker(ref):
    return snakepit_shm.to_zero_copy_ref(ref)


def test_attach_accepts_a_snakepit_marker(forge):
    seg = forge.memfd(16, data=bytes(range(16)))
    with snakepit_shm.attach(marker(seg.ref())) as region:
        assert region.read(0, 4) == bytes([0, 1, 2, 3])
    with snakepit_shm.attach(json.dumps(marker(seg.ref()))) as region:
        assert region.size == 16
    with pytest.raises(ValueError, match="kind 'dlpack'"):
        snakepit_shm.attach({"__snakepit_zero_copy__": True, "kind": "dlpack", "ref": 1})


def test_resolve_walks_nested_args_and_releases_on_exit(forge):
    floats = forge.posix(16, data=numpy.arange(4, dtype=numpy.float32).tobytes())
    raw = forge.memfd(8, data=b"rawbytes")
    args = json.dumps({
        "x": marker(floats.ref(dtype="float32", shape=[4])),
        "nested": [{"blob": raw.ref()}, 3, "text"],
        "other": {"__snakepit_zero_copy__": True, "kind": "dlpack", "ref": "abc"},
        "factor": 2,
    })
    with snakepit_shm.resolve(args) as a:
        assert isinstance(a["x"], numpy.ndarray)
        result = float((a["x"] * a["factor"]).sum())
        blob = a["nested"][0]["blob"]
        assert isinstance(blob, snakepit_shm.Region) and blob.read() == b"rawbytes"
        assert a["nested"][1:] == [3, "text"]
        assert a["other"]["kind"] == "dlpack"  # not ours: passed through
        assert floats.u32("refcount") == 1 and raw.u32("refcount") == 1
        kept = a["x"][1:]
    assert result == 12.0
    assert raw.u32("refcount") == 0  # released
    assert kept.tolist() == [1.0, 2.0, 3.0]  # a returned view stays valid
    del a, kept
    gc.collect()
    assert floats.u32("refcount") == 0


def test_resolve_releases_what_it_attached_when_one_ref_fails(forge):
    good = forge.posix(8)
    bad = {"v": 1, "backend": "posix", "region_id": "spshm_aaaaaaaaaaaaaaaaaaaa"}
    with pytest.raises(snakepit_shm.RegionNotFound):
        with snakepit_shm.resolve({"a": good.ref(), "b": bad}):
            pass
    assert good.u32("refcount") == 0


def test_async_reads_run_in_an_executor(forge):
    key = bytes(range(32))
    seg = forge.memfd(200_000, data=bytes(200_000), key=key)

    async def main():
        region = await snakepit_shm.attach_async(seg.ref(), mode="rw")
        with region:
            await region.write_async(0, b"async")
            data = await region.read_async(0, 5)
            buffer = bytearray(5)
            await region.readinto_async(buffer)
            return data, bytes(buffer)

    assert asyncio.run(main()) == (b"async", b"async")


def test_resolve_refuses_cyclic_args_with_a_clear_error():
    args = {"a": [1, 2]}
    args["a"].append(args)
    with pytest.raises(ValueError, match="cycle"):
        with snakepit_shm.resolve(args):
            pass
    # The same object twice (not a cycle) is fine.
    shared = [1]
    with snakepit_shm.resolve({"x": shared, "y": shared}) as got:
        assert got == {"x": [1], "y": [1]}
