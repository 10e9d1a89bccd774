"""`pip install priv/python` into a fresh venv works offline (issue 13)."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, requires_lib

pytestmark = requires_lib

SOURCE = os.path.join(REPO, "priv", "python")
LIB = os.path.join(REPO, "priv", "libsnakepit_shm.so")

CHECK = """
import os, sys, snakepit_shm
assert os.path.realpath(snakepit_shm.__file__).startswith(os.path.realpath(sys.prefix)), \\
    snakepit_shm.__file__
with snakepit_shm.attach(sys.argv[1]) as region:
    print(snakepit_shm.__file__, region.size, region.read(0, 4).hex())
"""


def _venv_or_skip(path):
    python = "/usr/bin/python3"
    probe = subprocess.run([python, "-c", "import ensurepip, venv"], capture_output=True)
    if probe.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("python3-venv is missing: scripts/install-deps.sh test installs it")
        reason = "python3-venv is not installed (apt-get install python3-venv)"
        print(f"SKIP test_install: {reason}", file=sys.stderr)
        pytest.skip(reason)
    subprocess.run([python, "-m", "venv", "--system-site-packages", str(path)], check=True)
    return os.path.join(str(path), "bin")


def _install(bin_dir, source):
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [os.path.join(bin_dir, "pip"), "install", "--no-index", "--no-build-isolation",
         "--quiet", source], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def _run(bin_dir, target, lib, cwd):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "SNAKEPIT_SHM_LIB")}
    if lib is not None:
        env["SNAKEPIT_SHM_LIB"] = lib
    return subprocess.run([os.path.join(bin_dir, "python"), "-c", CHECK, target],
                          env=env, capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A venv with the package installed from a copy of priv/python.

    The copy (pip builds in the source directory: build/, egg-info) carries the C
    library beside the package, as a deployment without SNAKEPIT_SHM_LIB would.
    """
    root = tmp_path_factory.mktemp("install")
    bin_dir = _venv_or_skip(root / "venv")
    source = shutil.copytree(SOURCE, root / "src",
                             ignore=shutil.ignore_patterns("tests", "__pycache__"))
    shutil.copy(LIB, os.path.join(source, "snakepit_shm", "libsnakepit_shm.so"))
    _install(bin_dir, str(source))
    return bin_dir, str(root)


def test_pip_install_into_a_venv_and_attach_with_snakepit_shm_lib(venv, forge):
    bin_dir, cwd = venv
    seg = forge.posix(64, data=bytes(range(64)))
    result = _run(bin_dir, seg.region_id, LIB, cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split()[1:] == ["64", "00010203"]


def test_library_beside_the_installed_package_is_found(venv, forge):
    bin_dir, cwd = venv
    seg = forge.memfd(64, data=bytes(range(64)))
    result = _run(bin_dir, seg.region_id, None, cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split()[1:] == ["64", "00010203"]


def test_a_missing_library_says_what_to_set(venv, forge):
    bin_dir, cwd = venv
    seg = forge.posix(64)
    result = _run(bin_dir, seg.region_id, os.path.join(cwd, "nothing.so"), cwd)
    assert result.returncode != 0 and "SNAKEPIT_SHM_LIB" in result.stderr
