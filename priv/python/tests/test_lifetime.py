"""Seen 1 (issue 13): leaving a `with` block with live views never loses a result."""

import gc

import numpy
import pytest

import snakepit_shm
from conftest import requires_lib

pytestmark = requires_lib


def payload(n):
    return bytes(range(256)) * (n // 256) + bytes(range(n % 256))


def test_seen_1_with_block_and_a_live_array_does_not_raise(forge):
    seg = forge.posix(4096, data=payload(4096), metadata={"dtype": "uint8"})
    # The exact code of the issue: no `del arr`.
    with snakepit_shm.attach(seg.ref()) as region:
        arr = region.ndarray()
        total = float(arr.sum())
    assert total == float(numpy.frombuffer(payload(4096), numpy.uint8).sum())
    assert region.closed and not region.released
    assert seg.u32("refcount") == 1  # the live array keeps the hold
    assert arr[:4].tolist() == [0, 1, 2, 3]  # and the data
    with pytest.raises(ValueError, match="closed"):
        region.read()
    del arr
    gc.collect()
    assert region.released and seg.u32("refcount") == 0


def test_returning_a_slice_out_of_the_block_keeps_it_valid(forge):
    seg = forge.memfd(1024, data=payload(1024))

    def tool(ref):
        with snakepit_shm.attach(ref) as region:
            return region.ndarray("uint8")[10:20]

    part = tool(seg.ref())
    gc.collect()
    assert part.tolist() == list(range(10, 20))
    assert seg.u32("refcount") == 1
    del part
    gc.collect()
    assert seg.u32("refcount") == 0


def test_memoryview_slices_defer_too(forge):
    seg = forge.posix(64, data=payload(64))
    with snakepit_shm.attach(seg.region_id) as region:
        view = region.buf[8:16]
    assert bytes(view) == payload(64)[8:16]
    assert seg.u32("refcount") == 1
    view.release()
    gc.collect()
    assert seg.u32("refcount") == 0


def test_close_returns_whether_it_released_now(forge):
    seg = forge.posix(64)
    region = snakepit_shm.attach(seg.region_id)
    arr = region.ndarray()
    assert region.close() is False
    assert region.close() is False  # idempotent, still deferred
    del arr
    gc.collect()
    assert region.close() is True and region.released


def test_strict_close_still_refuses(forge):
    seg = forge.posix(64)
    with pytest.raises(snakepit_shm.ViewsStillAlive):
        with snakepit_shm.attach(seg.region_id) as region:
            arr = region.ndarray()
            region.close(strict=True)
    # the with block then closed it leniently: nothing lost, hold kept by `arr`
    assert region.closed and seg.u32("refcount") == 1
    del arr
    gc.collect()
    assert seg.u32("refcount") == 0


def test_exception_inside_the_block_propagates_and_releases(forge):
    seg = forge.posix(64)
    with pytest.raises(ZeroDivisionError):
        with snakepit_shm.attach(seg.region_id) as region:
            region.ndarray().sum() / 0 if False else 1 / 0
    gc.collect()
    assert seg.u32("refcount") == 0
