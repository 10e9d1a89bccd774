"""attach(): by id and by ref, buffers, numpy views, metadata, writes, lifecycle."""

import gc
import json
import os

import numpy as np
import pytest

import snakepit_shm
from conftest import requires_lib

pytestmark = requires_lib


def payload(size):
    """Deterministic, non-trivial bytes."""
    return bytes((i * 7 + 3) % 251 for i in range(size))


def address_range(region):
    """[start, end) of the region's data in this process's address space."""
    view = region.buf
    start = np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]
    view.release()
    return start, start + region.size


@pytest.mark.parametrize("backend", ["posix", "memfd"])
class TestLocate:
    def test_attach_by_id(self, forge, backend):
        seg = getattr(forge, backend)(8192, data=payload(8192))
        with snakepit_shm.attach(seg.region_id) as region:
            assert region.region_id == seg.region_id
            assert region.size == 8192
            assert region.backend == backend
            assert region.read() == payload(8192)

    def test_attach_by_ref_dict_and_json(self, forge, backend):
        seg = getattr(forge, backend)(100, data=payload(100))
        for target in (seg.ref(), json.dumps(seg.ref()), json.dumps(seg.ref()).encode()):
            with snakepit_shm.attach(target) as region:
                assert bytes(region.buf) == payload(100)


class TestBuffers:
    def test_buf_is_a_readonly_memoryview_in_mode_r(self, forge):
        seg = forge.posix(4096, data=payload(4096))
        with snakepit_shm.attach(seg.region_id) as region:
            view = region.buf
            assert isinstance(view, memoryview)
            assert view.readonly and view.nbytes == 4096
            assert view[10] == payload(4096)[10]
            with pytest.raises(TypeError):
                view[0] = 1
            view.release()

    @pytest.mark.parametrize("backend", ["posix", "memfd"])
    def test_ndarray_is_zero_copy(self, forge, backend):
        data = np.arange(1024, dtype=np.float32).tobytes()
        seg = getattr(forge, backend)(len(data), data=data)
        with snakepit_shm.attach(seg.ref()) as region:
            start, end = address_range(region)
            arr = region.ndarray(np.float32)
            address = arr.__array_interface__["data"][0]
            assert start <= address and address + arr.nbytes <= end
            assert not arr.flags.writeable and not arr.flags.owndata
            assert arr[1000] == 1000.0
            # The same memory, not a copy: a change through the segment shows up.
            seg.write_data(0, np.float32(42.5).tobytes())
            assert arr[0] == 42.5
            del arr

    def test_ndarray_defaults_come_from_metadata(self, forge):
        data = np.arange(12, dtype=np.int16).tobytes()
        seg = forge.posix(len(data), data=data,
                          metadata={"dtype": "int16", "shape": [3, 4], "label": "x"})
        with snakepit_shm.attach(seg.region_id) as region:
            assert region.metadata == {"dtype": "int16", "shape": [3, 4], "label": "x"}
            arr = region.ndarray()
            assert arr.dtype == np.int16 and arr.shape == (3, 4)
            assert arr[2, 3] == 11
            del arr

    def test_ref_dtype_and_shape_override_metadata(self, forge):
        data = np.arange(12, dtype=np.int16).tobytes()
        seg = forge.posix(len(data), data=data, metadata={"dtype": "int16", "shape": [12]})
        ref = seg.ref(dtype="uint8", shape=[4, 6])
        with snakepit_shm.attach(ref) as region:
            arr = region.ndarray()
            assert arr.dtype == np.uint8 and arr.shape == (4, 6)
            explicit = region.ndarray(dtype="int16", shape=(2, 6))
            assert explicit[1, 5] == 11
            del arr, explicit

    def test_ndarray_default_is_uint8_over_everything(self, forge):
        seg = forge.posix(10, data=payload(10))
        with snakepit_shm.attach(seg.region_id) as region:
            arr = region.ndarray()
            assert arr.dtype == np.uint8 and arr.tobytes() == payload(10)
            del arr

    def test_ndarray_offset_and_bad_shapes(self, forge):
        seg = forge.posix(64, data=np.arange(16, dtype=np.uint32).tobytes())
        with snakepit_shm.attach(seg.region_id) as region:
            tail = region.ndarray(np.uint32, 4, offset=48)
            assert list(tail) == [12, 13, 14, 15]
            del tail
            with pytest.raises(ValueError, match="needs 68 bytes"):
                region.ndarray(np.uint32, (17,))
            with pytest.raises(ValueError, match="whole number"):
                region.ndarray(np.float64, offset=4)
            with pytest.raises(ValueError, match="outside the region"):
                region.ndarray(offset=65)

    def test_ndarray_of_a_zero_size_dtype_is_a_clear_error(self, forge):
        # numpy.dtype("S"), "U", "V" (and "S1099511627776", which numpy wraps) have
        # itemsize 0: ndarray() divided by it (ZeroDivisionError) without a shape.
        seg = forge.posix(64, data=payload(64))
        with snakepit_shm.attach(seg.region_id) as region:
            for dtype in ("S", "U", "V", "S0", "S1099511627776"):
                for shape in (None, (3,)):
                    with pytest.raises(ValueError, match="0 bytes per item"):
                        region.ndarray(dtype, shape)

    def test_readinto(self, forge):
        seg = forge.memfd(100, data=payload(100))
        with snakepit_shm.attach(seg.region_id) as region:
            out = bytearray(10)
            assert region.readinto(out, 90) == 10 and out == payload(100)[90:]
            arr = np.zeros(25, dtype=np.uint32)
            region.readinto(arr)
            assert arr.tobytes() == payload(100)
            with pytest.raises(ValueError, match="outside"):
                region.readinto(bytearray(11), 90)
            with pytest.raises(TypeError, match="writable"):
                region.readinto(b"immutable")
            with pytest.raises(TypeError, match="C-contiguous"):
                region.readinto(np.zeros((10, 10), dtype=np.uint8)[:, :5])

    def test_partial_read(self, forge):
        seg = forge.posix(1000, data=payload(1000))
        with snakepit_shm.attach(seg.region_id) as region:
            assert region.read(10, 5) == payload(1000)[10:15]
            assert region.read(995) == payload(1000)[995:]
            with pytest.raises(ValueError):
                region.read(990, 11)


@pytest.mark.parametrize("backend", ["posix", "memfd"])
class TestWrites:
    def test_rw_writes_are_visible_to_another_attach(self, forge, backend):
        seg = getattr(forge, backend)(4096)
        with snakepit_shm.attach(seg.ref(), mode="rw") as writer, \
                snakepit_shm.attach(seg.ref()) as reader:
            writer.write(100, b"hello")
            arr = writer.ndarray(np.uint8)
            assert arr.flags.writeable
            arr[200:203] = [1, 2, 3]
            writer.buf[300] = 9
            assert reader.read(100, 5) == b"hello"
            assert reader.read(200, 3) == b"\x01\x02\x03"
            assert reader.buf[300] == 9
            del arr
        assert seg.read_data()[100:105] == b"hello"

    def test_write_in_mode_r_is_refused(self, forge, backend):
        seg = getattr(forge, backend)(64)
        with snakepit_shm.attach(seg.region_id) as region:
            with pytest.raises(snakepit_shm.PermissionError, match="mode='rw'"):
                region.write(0, b"x")

    def test_write_bounds(self, forge, backend):
        seg = getattr(forge, backend)(64)
        with snakepit_shm.attach(seg.region_id, mode="rw") as region:
            with pytest.raises(ValueError, match="outside the region"):
                region.write(60, b"12345")
            region.write(59, b"12345")
            region.write(0, np.arange(4, dtype=np.uint16))
            assert region.read(0, 8) == np.arange(4, dtype=np.uint16).tobytes()
            with pytest.raises(TypeError, match="C-contiguous"):
                region.write(0, np.arange(8, dtype=np.uint8)[::2])
            with pytest.raises(TypeError, match="bytes-like"):
                region.write(0, "text")


class TestLifecycle:
    def test_context_manager_closes(self, forge):
        seg = forge.posix(64)
        with snakepit_shm.attach(seg.region_id) as region:
            assert not region.closed
        assert region.closed
        with pytest.raises(ValueError, match="closed"):
            region.read()
        with pytest.raises(ValueError, match="closed"):
            region.buf

    def test_close_is_idempotent(self, forge):
        seg = forge.posix(64)
        region = snakepit_shm.attach(seg.region_id)
        region.close()
        region.close()
        assert region.closed and not region.held

    def test_close_with_live_views_refuses_and_stays_usable(self, forge):
        seg = forge.posix(64, data=payload(64))
        region = snakepit_shm.attach(seg.region_id)
        arr = region.ndarray()
        view = region.buf
        with pytest.raises(snakepit_shm.ViewsStillAlive, match="del arr") as info:
            region.close(strict=True)
        assert isinstance(info.value, BufferError)
        assert not region.closed and region.held
        assert region.read(0, 4) == payload(64)[:4]  # still usable
        del arr
        with pytest.raises(BufferError):
            region.close_now()  # the memoryview is still alive
        view.release()
        assert region.close(strict=True) is True
        assert region.closed and seg.u32("refcount") == 0

    def test_garbage_collected_region_keeps_its_hold_while_arrays_live(self, forge):
        seg = forge.posix(64, data=payload(64))
        arr = snakepit_shm.attach(seg.region_id).ndarray()
        gc.collect()
        assert seg.u32("refcount") == 1  # the Region is gone, the array holds on
        assert arr.tobytes() == payload(64)
        del arr
        gc.collect()
        assert seg.u32("refcount") == 0

    def test_garbage_collected_region_releases_its_hold(self, forge):
        seg = forge.posix(64)
        region = snakepit_shm.attach(seg.region_id)
        assert seg.u32("refcount") == 1
        del region
        gc.collect()
        assert seg.u32("refcount") == 0

    def test_info_and_repr(self, forge):
        seg = forge.memfd(128, metadata={"k": 1})
        with snakepit_shm.attach(seg.region_id, mode="rw") as region:
            info = region.info()
            assert info["region_id"] == seg.region_id and info["backend"] == "memfd"
            assert info["size"] == 128 and info["refcount"] == 1
            assert info["holders"][0]["pid"] == os.getpid()
            assert info["metadata"] == {"k": 1}
            json.dumps(info)
            assert seg.region_id in repr(region) and "held" in repr(region)

    def test_attach_touches_last_access(self, forge):
        seg = forge.posix(64)
        seg.set_u64("last_access_ns", 1)
        with snakepit_shm.attach(seg.region_id) as region:
            assert region.info()["last_access_ns"] > 1


def test_mode_must_be_r_or_rw(forge):
    seg = forge.posix(64)
    with pytest.raises(ValueError, match="mode"):
        snakepit_shm.attach(seg.region_id, mode="w")


def test_ndarray_without_numpy_says_what_to_do(forge, monkeypatch):
    import sys
    seg = forge.posix(64)
    with snakepit_shm.attach(seg.region_id) as region:
        monkeypatch.setitem(sys.modules, "numpy", None)  # import numpy now fails
        with pytest.raises(ImportError, match="python3-numpy.*Region.buf"):
            region.ndarray()
