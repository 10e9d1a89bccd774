"""POSIX segments outside /dev/shm (the VM's shm_path): refs carrying such paths, and
bare-id lookup through $SNAKEPIT_SHM_PATH."""

import os

import pytest

from snakepit_shm import _format, _locate, errors

ID = "spshm_abcdefghijklmnopqrst"


def _ref(path):
    return {"v": 1, "region_id": ID, "backend": "posix",
            "control_path": path, "data_path": path}


def test_a_ref_may_carry_another_directory():
    loc = _locate.parse_target(_ref(f"/run/snakepit_shm/{ID}"))
    assert loc.control_path == loc.data_path == f"/run/snakepit_shm/{ID}"
    assert loc.backend == _format.BACKEND_POSIX


@pytest.mark.parametrize("path", [
    "/run/snakepit_shm/spshm_zzzzzzzzzzzzzzzzzzzz",   # another region's segment
    f"/run/../etc/{ID}",                               # not normalised
    f"run/{ID}",                                       # relative
    f"/run/{ID}/",                                     # a directory
])
def test_a_ref_path_must_name_this_regions_segment(path):
    with pytest.raises(ValueError, match="is not the POSIX segment"):
        _locate.parse_target(_ref(path))


def test_control_and_data_paths_must_agree():
    ref = _ref(f"/run/a/{ID}")
    ref["data_path"] = f"/run/b/{ID}"
    with pytest.raises(ValueError):
        _locate.parse_target(ref)


def test_bare_ids_are_looked_up_in_snakepit_shm_path(tmp_path, monkeypatch):
    monkeypatch.setenv("SNAKEPIT_SHM_PATH", str(tmp_path))
    (tmp_path / ID).write_bytes(b"")
    loc = _locate.parse_target(ID)
    assert loc.control_path == os.path.join(str(tmp_path), ID)
    # A ref without paths uses the same directory.
    ref = {"v": 1, "region_id": ID, "backend": "posix"}
    assert _locate.parse_target(ref).control_path == os.path.join(str(tmp_path), ID)


def test_without_the_variable_bare_ids_mean_dev_shm(monkeypatch):
    monkeypatch.delenv("SNAKEPIT_SHM_PATH", raising=False)
    with pytest.raises(errors.RegionNotFound, match=f"/dev/shm/{ID}"):
        _locate.parse_target(ID)


def test_a_relative_snakepit_shm_path_is_refused(monkeypatch):
    monkeypatch.setenv("SNAKEPIT_SHM_PATH", "relative/dir")
    with pytest.raises(ValueError, match="SNAKEPIT_SHM_PATH"):
        _locate.parse_target(ID)


def test_posix_outputs_are_created_in_snakepit_shm_path(tmp_path, monkeypatch):
    # A VM with shm_path adopts POSIX outputs from its own directory: the worker must
    # create them there, not in /dev/shm.
    import snakepit_shm
    monkeypatch.setenv("SNAKEPIT_SHM_PATH", str(tmp_path))
    out = snakepit_shm.allocate(64, backend="posix", keep_seconds=60)
    rid = out.region_id
    try:
        assert os.path.exists(os.path.join(str(tmp_path), rid))
        assert not os.path.exists(os.path.join("/dev/shm", rid))
        out.write(0, b"abc")
        with snakepit_shm.attach(out.ref) as again:
            assert bytes(again.read(0, 3)) == b"abc"
    finally:
        out.close()
        snakepit_shm.discard(rid)
    # Given up: its name is removed from that directory too.
    assert not os.path.exists(os.path.join(str(tmp_path), rid))
    assert not os.path.exists(os.path.join("/dev/shm", rid))
