"""Refs carry the host's boot id: a ref of another host is refused before any open."""

import pytest

import snakepit_shm
from snakepit_shm import _locate


def other_boot_id():
    here = _locate.host_boot_id()
    assert here is not None, "this host has no /proc/sys/kernel/random/boot_id"
    return ("0" if here[0] != "0" else "1") + here[1:]


@pytest.mark.parametrize("backend", ["posix", "memfd"])
def test_ref_of_this_host_attaches(forge, backend):
    seg = getattr(forge, backend)(4096, data=b"x" * 4096)
    with snakepit_shm.attach(seg.ref(boot_id=_locate.host_boot_id())) as region:
        assert region.read(0, 1) == b"x"


@pytest.mark.parametrize("backend", ["posix", "memfd"])
def test_ref_of_another_host_is_refused_without_mapping_the_namesake(forge, backend):
    # A region of the same id exists on this host: it must not be mapped in its place.
    seg = getattr(forge, backend)(4096, data=b"y" * 4096)
    before = snakepit_shm.inspect(seg.region_id)["refcount"]
    ref = seg.ref(boot_id=other_boot_id(), node="shm@elsewhere")
    with pytest.raises(snakepit_shm.ForeignHostRegion) as info:
        snakepit_shm.attach(ref)
    message = str(info.value)
    assert "another host" in message and "shm@elsewhere" in message
    assert "fetch" in message.lower()
    # Still a RegionNotFound for callers that only know that one.
    assert isinstance(info.value, snakepit_shm.RegionNotFound)
    assert snakepit_shm.inspect(seg.region_id)["refcount"] == before


def test_older_refs_without_boot_id_still_attach(forge):
    seg = forge.memfd(64, data=b"z" * 64)
    ref = seg.ref()
    assert "boot_id" not in ref
    with snakepit_shm.attach(ref) as region:
        assert region.read(0, 2) == b"zz"


@pytest.mark.parametrize("bad", ["", "xyz", "0" * 31, "G" * 32, 42])
def test_malformed_boot_id_is_a_value_error(forge, bad):
    seg = forge.posix(64)
    with pytest.raises(ValueError):
        snakepit_shm.attach(seg.ref(boot_id=bad))
