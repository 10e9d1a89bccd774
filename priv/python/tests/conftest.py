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

from _forge import Forge  # noqa: E402
from snakepit_shm import _native  # noqa: E402

REPO = os.path.normpath(os.path.join(HERE, "..", "..", ".."))


def _our_leftovers(started_by_others):
    """Segments of ours still in /dev/shm, ignoring live regions of other processes.

    Other suites may run at the same time on a development machine: a segment whose
    creator (header field creator_pid) is another live process, and which existed
    before this session or belongs to that process, is theirs and is not reported.
    """
    left = []
    for name in sorted(os.listdir("/dev/shm")):
        if not name.startswith("spshm_"):
            continue
        path = os.path.join("/dev/shm", name)
        creator = None
        try:
            with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as f:
                creator = struct.unpack_from("<I", f.read(64), 48)[0]
        except OSError:
            pass
        foreign_and_alive = (creator not in (None, 0, os.getpid())
                             and os.path.exists(f"/proc/{creator}"))
        if foreign_and_alive or name in started_by_others:
            continue
        left.append(name)
    return left


@pytest.fixture(scope="session", autouse=True)
def no_segment_left_behind():
    """Fail the session if any segment of ours remains in /dev/shm at the end."""
    before = {n for n in os.listdir("/dev/shm") if n.startswith("spshm_")}
    yield
    left = _our_leftovers(before)
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
