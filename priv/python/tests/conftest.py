"""Fixtures of the snakepit_shm client tests.

Run with scripts/run-pytest.sh (Debian's /usr/bin/python3, SNAKEPIT_SHM_LIB set).
"""

import os
import struct
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # priv/python: the package under test
sys.path.insert(0, HERE)  # _forge

import _forge  # noqa: E402
from _forge import Forge  # noqa: E402
from snakepit_shm import _native  # noqa: E402

REPO = os.path.normpath(os.path.join(HERE, "..", "..", ".."))


def _our_leftovers():
    """Segments of these tests still in /dev/shm.

    A segment is ours if a test created it (_forge.CREATED_IDS) or if its header names
    as creator this process or a peer process started by the tests.  Other suites may
    run at the same time on a development machine: their segments are not reported
    here (scripts/shm-check.sh checks everything at the end of `make test`).
    """
    left = []
    for name in sorted(os.listdir("/dev/shm")):
        if not name.startswith("spshm_"):
            continue
        creator = None
        try:
            fd = os.open(os.path.join("/dev/shm", name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                creator = struct.unpack_from("<I", os.pread(fd, 64, 0), 48)[0]
            finally:
                os.close(fd)
        except (OSError, struct.error):
            pass
        if name in _forge.CREATED_IDS or creator in _forge.CREATOR_PIDS:
            left.append(name)
    return left


@pytest.fixture(scope="session", autouse=True)
def no_segment_left_behind():
    """Fail the session if any segment of ours remains in /dev/shm at the end."""
    yield
    left = _our_leftovers()
    assert not left, f"segments left in /dev/shm by the Python tests: {left}"


@pytest.fixture
def forge():
    """A Forge whose segments are removed after the test."""
    f = Forge()
    yield f
    f.cleanup()


def lib_missing_reason():
    """Why the C library cannot be used (None if it can)."""
    try:
        _native.library()
    except Exception as exc:  # noqa: BLE001 - any load failure is a skip reason
        return (f"libsnakepit_shm.so is not available ({exc}); build it with "
                "`mix compile` (CI builds it before running these tests)")
    return None


# In CI (CI set by .ci/run) nothing may be skipped: the library is built before these
# tests run, so its absence must fail them, not hide them.
_SKIP_WITHOUT_LIB = lib_missing_reason() is not None and not os.environ.get("CI")
requires_lib = pytest.mark.skipif(_SKIP_WITHOUT_LIB, reason=str(lib_missing_reason()))


@pytest.fixture
def lib():
    """The loaded C ABI library (the test is skipped if it is absent)."""
    if _SKIP_WITHOUT_LIB:
        pytest.skip(lib_missing_reason())
    return _native.library()


def private_index(tmp_path, monkeypatch):
    """A private runtime index of this test (the VM keeps writing its own): a 0700 base
    given to the client as SNAKEPIT_SHM_RUNTIME_DIR, and in it the 0700 subdirectory of
    this PID namespace where entries go (returned)."""
    from snakepit_shm import _locate
    base = tmp_path / "index"
    base.mkdir(mode=0o700)
    directory = base / _locate.namespace_dir_name()
    directory.mkdir(mode=0o700)
    monkeypatch.setenv(_locate.RUNTIME_DIR_ENV, str(base))
    return directory
