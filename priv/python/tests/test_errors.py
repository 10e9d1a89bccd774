"""Every way attach() refuses, with the right exception and a helpful message."""

import json
import os
import struct
import time

import pytest

import snakepit_shm
from snakepit_shm import _format as F
from _forge import random_region_id
from conftest import requires_lib

pytestmark = requires_lib


class TestArguments:
    def test_unknown_id(self):
        with pytest.raises(snakepit_shm.RegionNotFound, match="does not exist"):
            snakepit_shm.attach(random_region_id())

    @pytest.mark.parametrize("bad", [
        "", "spshm_", "spshm_ABCDEFGHIJKLMNOPQRST", "spshm_aaaaaaaaaaaaaaaaaaa",
        "spshm_aaaaaaaaaaaaaaaaaaaaa", "spshm_aaaaaaaaaaaaaaaaaaa1", "../etc/passwd",
        "spshm_n_", "spshm_n_UPPER", "spshm_n_" + "a" * 22, "spshm_n_a/b",
        "spshm_aaaaaaaaaa\naaaaaaaaaa", "spshm_aaaaaaaaaaaaaaaaaaaa\0",
        "/dev/shm/spshm_aaaaaaaaaaaaaaaaaaaa"])
    def test_bad_id_string_touches_nothing(self, bad):
        with pytest.raises(ValueError, match="not a snakepit_shm region id"):
            snakepit_shm.attach(bad)

    @pytest.mark.parametrize("bad", [42, ["spshm_aaaaaaaaaaaaaaaaaaaa"], None, 3.5])
    def test_wrong_type(self, bad):
        with pytest.raises(TypeError, match="region id"):
            snakepit_shm.attach(bad)

    @pytest.mark.parametrize("edit, match", [
        ({"v": 2}, "version"),
        ({"region_id": "nope"}, "not a snakepit_shm region id"),
        ({"backend": "windows"}, "backend"),
        ({"control_path": "/etc/passwd"}, "control_path"),
        ({"size": "12"}, "wrong type"),
        ({"key": "!!!"}, "base64"),
        ({"key": "AAAA"}, "expected 32"),
        ({"shape": [2, -1]}, "shape"),
    ])
    def test_malformed_ref(self, forge, edit, match):
        seg = forge.posix(64)
        with pytest.raises(ValueError, match=match):
            snakepit_shm.attach(seg.ref(**edit))

    def test_memfd_ref_paths_must_be_proc_fd_paths(self, forge):
        seg = forge.memfd(64)
        with pytest.raises(ValueError, match="data_path"):
            snakepit_shm.attach(seg.ref(data_path="/dev/shm/x"))

    @pytest.mark.parametrize("bad", [{}, {"region_id": "spshm_aaaaaaaaaaaaaaaaaaaa"}, {"v": 1}])
    def test_not_a_ref(self, bad):
        # not "upgrade the Python package": it is no ref at all
        with pytest.raises(ValueError, match="not a snakepit_shm ref"):
            snakepit_shm.attach(bad)

    def test_invalid_json(self):
        with pytest.raises(ValueError, match="not valid JSON"):
            snakepit_shm.attach('{"v": 1,')

    def test_ref_that_disagrees_with_the_header(self, forge):
        seg = forge.posix(64)
        with pytest.raises(snakepit_shm.CorruptRegion, match="stale"):
            snakepit_shm.attach(seg.ref(size=65))


def corrupt_and_attach(seg, offset, data, fix_crc=False):
    seg.patch(offset, data, fix_crc=fix_crc)
    with pytest.raises(snakepit_shm.CorruptRegion) as info:
        snakepit_shm.attach(seg.region_id)
    return str(info.value)


@pytest.mark.parametrize("backend", ["posix", "memfd"])
class TestCorruption:
    def test_bad_magic(self, forge, backend):
        seg = getattr(forge, backend)(64)
        assert "bad magic" in corrupt_and_attach(seg, 0, b"NOTOURS!", fix_crc=True)

    def test_unpublished_header(self, forge, backend):
        seg = getattr(forge, backend)(64)
        assert "not published" in corrupt_and_attach(seg, 0, bytes(8))

    def test_bad_crc(self, forge, backend):
        seg = getattr(forge, backend)(64)
        at = F.FIELD["created_at_ns"][0]
        # Flip a bit (writing a fixed byte changed nothing 1 time in 256: no error).
        flipped = bytes([seg.read_header()[at] ^ 1])
        assert "CRC" in corrupt_and_attach(seg, at, flipped)

    def test_metadata_is_covered_by_the_crc(self, forge, backend):
        seg = getattr(forge, backend)(64, metadata={"a": 1})
        assert "CRC" in corrupt_and_attach(seg, F.METADATA_OFFSET + 6, b"2")

    def test_newer_version(self, forge, backend):
        seg = getattr(forge, backend)(64)
        message = corrupt_and_attach(seg, 8, struct.pack("<I", 2), fix_crc=True)
        assert "format version 2" in message and "upgrade" in message

    def test_reserved_bytes(self, forge, backend):
        seg = getattr(forge, backend)(64)
        assert "reserved0" in corrupt_and_attach(seg, 200, b"\x01", fix_crc=True)
        seg.patch(200, b"\x00", fix_crc=True)
        assert "reserved1" in corrupt_and_attach(seg, 4000, b"\x01")

    def test_size_beyond_the_object(self, forge, backend):
        seg = getattr(forge, backend)(64)
        fields = (("data_size", 65), ("data_capacity", 65))
        for name, value in fields:
            seg.patch(F.FIELD[name][0], struct.pack("<Q", value))
        seg.patch(0, b"", fix_crc=True)
        assert "truncated" in corrupt_and_attach(seg, 0, b"")

    def test_metadata_not_json(self, forge, backend):
        seg = getattr(forge, backend)(64, metadata={"a": 1})
        assert "not valid UTF-8 JSON" in corrupt_and_attach(
            seg, F.METADATA_OFFSET, b"[", fix_crc=True)

    def test_another_regions_header(self, forge, backend):
        seg = getattr(forge, backend)(64)
        other = random_region_id().encode()
        assert "holds region" in corrupt_and_attach(seg, 96, other, fix_crc=True)


class TestForeignObjects:
    def test_truncated_file(self, forge):
        seg = forge.posix(64)
        os.truncate(seg.control_path, 1000)
        with pytest.raises(snakepit_shm.CorruptRegion, match="truncated"):
            snakepit_shm.attach(seg.region_id)
        os.truncate(seg.control_path, 0)
        with pytest.raises(snakepit_shm.CorruptRegion, match="truncated"):
            snakepit_shm.attach(seg.region_id)

    def test_truncated_data(self, forge):
        seg = forge.posix(8192)
        os.truncate(seg.control_path, 4096 + 100)
        with pytest.raises(snakepit_shm.CorruptRegion, match="truncated"):
            snakepit_shm.attach(seg.region_id)

    def test_foreign_file(self, forge):
        region_id = random_region_id()
        path = f"/dev/shm/{region_id}"
        forge.track(path)
        with open(path, "wb") as f:
            f.write(os.urandom(8192))
        with pytest.raises(snakepit_shm.CorruptRegion, match="bad magic"):
            snakepit_shm.attach(region_id)

    def test_symlink_in_place_of_a_segment(self, forge):
        seg = forge.posix(64)
        region_id = random_region_id()
        link = f"/dev/shm/{region_id}"
        os.symlink(seg.control_path, link)
        forge.track(link)
        with pytest.raises(snakepit_shm.CorruptRegion, match="symbolic link"):
            snakepit_shm.attach(region_id)
        assert seg.u32("refcount") == 0

    def test_fifo_in_place_of_a_segment_does_not_block(self, forge):
        region_id = random_region_id()
        path = f"/dev/shm/{region_id}"
        os.mkfifo(path, 0o600)
        forge.track(path)
        with pytest.raises(snakepit_shm.CorruptRegion, match="not a regular file"):
            snakepit_shm.attach(region_id)

    @pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
    def test_file_of_another_uid(self, forge):
        seg = forge.posix(64)
        os.chown(seg.control_path, 65534, 65534)
        with pytest.raises(snakepit_shm.PermissionError, match="uid 65534") as info:
            snakepit_shm.attach(seg.region_id)
        assert isinstance(info.value, PermissionError)  # the builtin one too
        assert isinstance(info.value, snakepit_shm.SnakepitShmError)
        assert seg.u32("refcount") == 0

    def test_stale_memfd_ref(self, forge):
        seg = forge.memfd(64)
        other = forge.memfd(64)
        ref = seg.ref(data_path=other.data_path)
        # The descriptor number now names something else: the region is gone.
        with pytest.raises(snakepit_shm.RegionNotFound, match="reused"):
            snakepit_shm.attach(ref)
        assert seg.u32("refcount") == 0

    def test_memfd_of_an_exited_process(self, forge):
        seg = forge.memfd(64)
        ref = seg.ref(control_path="/proc/999999999/fd/3", data_path="/proc/999999999/fd/4")
        with pytest.raises(snakepit_shm.RegionNotFound, match="fresh ref"):
            snakepit_shm.attach(ref)


@pytest.mark.parametrize("backend", ["posix", "memfd"])
class TestState:
    def test_expired(self, forge, backend):
        seg = getattr(forge, backend)(64, idle_timeout_ns=1_000_000)
        seg.set_u64("last_access_ns", time.time_ns() - 5_000_000_000)
        with pytest.raises(snakepit_shm.RegionExpired, match="timeout"):
            snakepit_shm.attach(seg.region_id)
        assert seg.u32("refcount") == 0

    def test_not_expired_within_the_timeout(self, forge, backend):
        seg = getattr(forge, backend)(64, idle_timeout_ns=3600 * 10**9)
        with snakepit_shm.attach(seg.region_id) as region:
            assert not region.info()["expired"]

    def test_deallocated(self, forge, backend):
        seg = getattr(forge, backend)(64)
        seg.set_u32("state", F.STATE_DEALLOCATED)
        with pytest.raises(snakepit_shm.RegionNotFound, match="was deallocated"):
            snakepit_shm.attach(seg.region_id)
        assert seg.u32("refcount") == 0

    def test_rw_attach_of_a_sealed_region(self, forge, backend):
        seg = getattr(forge, backend)(64, data=b"s" * 64)
        seg.set_u32("state", F.STATE_SEALED)
        with pytest.raises(snakepit_shm.PermissionError, match="sealed") as info:
            snakepit_shm.attach(seg.region_id, mode="rw")
        assert "mode='r'" in str(info.value)
        assert seg.u32("refcount") == 0
        with snakepit_shm.attach(seg.region_id) as region:  # read-only is fine
            assert region.sealed and region.read() == b"s" * 64
            with pytest.raises(snakepit_shm.PermissionError):
                region.write(0, b"x")


def test_sealed_memfd_data_cannot_be_mapped_writable(forge):
    """F_SEAL_FUTURE_WRITE: even if the state bit were missed, mapping fails."""
    seg = forge.memfd(64, seal_data=True)
    with pytest.raises(snakepit_shm.PermissionError, match="sealed"):
        snakepit_shm.attach(seg.ref(), mode="rw")
    assert seg.u32("refcount") == 0
    with snakepit_shm.attach(seg.ref()) as region:
        assert region.read() == bytes(64)


def test_sealed_posix_region_for_the_owner(forge):
    """Mode 0400 after seal: as root the header still opens writable, so we hold."""
    seg = forge.posix(64)
    seg.set_u32("state", F.STATE_SEALED)
    os.chmod(seg.control_path, 0o400)
    if os.geteuid() == 0:
        with snakepit_shm.attach(seg.region_id) as region:
            assert region.held and seg.u32("refcount") == 1
    with pytest.raises(snakepit_shm.PermissionError, match="sealed"):
        snakepit_shm.attach(seg.region_id, mode="rw")


def test_error_hierarchy():
    for cls in (snakepit_shm.RegionNotFound, snakepit_shm.CorruptRegion,
                snakepit_shm.RegionExpired, snakepit_shm.PermissionError,
                snakepit_shm.ViewsStillAlive, snakepit_shm.LibraryNotFound):
        assert issubclass(cls, snakepit_shm.SnakepitShmError)
    assert issubclass(snakepit_shm.PermissionError, PermissionError)
    assert issubclass(snakepit_shm.ViewsStillAlive, BufferError)
    json.dumps(snakepit_shm.__all__)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_sealed_posix_region_as_a_non_root_owner_attaches_unheld(forge):
    """A 0400 segment cannot take a hold: mode "r" attaches unheld, with a warning."""
    import subprocess
    import sys
    seg = forge.posix(64, data=b"q" * 64)
    seg.set_u32("state", F.STATE_SEALED)
    os.chown(seg.control_path, 65534, 65534)
    os.chmod(seg.control_path, 0o400)
    code = (
        "import sys, warnings, snakepit_shm\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    with snakepit_shm.attach(sys.argv[1]) as r:\n"
        "        assert not r.held and r.read() == b'q' * 64, r\n"
        "assert [w.category.__name__ for w in caught] == ['UnheldAttachWarning'], caught\n"
        "try:\n"
        "    snakepit_shm.attach(sys.argv[1], mode='rw')\n"
        "except snakepit_shm.PermissionError as e:\n"
        "    assert 'sealed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('rw attach of a sealed region succeeded')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

    def drop_privileges():
        os.setgid(65534)
        os.setuid(65534)

    result = subprocess.run([sys.executable, "-c", code, seg.region_id], env=env,
                            capture_output=True, text=True, preexec_fn=drop_privileges,
                            cwd="/", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert seg.u32("refcount") == 0
