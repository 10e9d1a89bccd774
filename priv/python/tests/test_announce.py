"""Holder announcements (snakepit_shm._announce): the event that replaces the VM's poll.

An announcement is a hint, so it must never fail an attach, never block, and cost
little on the attach path.
"""

import os
import socket
import time

import pytest

from snakepit_shm import _announce


@pytest.fixture
def receiver(tmp_path):
    path = str(tmp_path / "ev-test.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_announce_sends_kind_and_region_id(receiver):
    path, sock = receiver
    _announce.announce((path,), _announce.PREFIX_ATTACH, "spshm_abc")
    _announce.announce((path,), _announce.PREFIX_RELEASE, "spshm_n_x-1")
    assert sock.recv(512) == b"Aspshm_abc"
    assert sock.recv(512) == b"Rspshm_n_x-1"


def test_announce_never_raises_nor_blocks(tmp_path, receiver):
    path, sock = receiver
    missing = str(tmp_path / "nobody.sock")
    not_a_socket = str(tmp_path / "file")
    open(not_a_socket, "w").close()
    start = time.monotonic()
    # No listener, a regular file, a path too long for sun_path, a full queue.
    for _ in range(5000):
        _announce.announce((missing, not_a_socket, "/x" * 80, path),
                           _announce.PREFIX_ATTACH, "spshm_abc")
    assert time.monotonic() - start < 30


def test_targets_creator_and_inherited(monkeypatch, tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)  # the creator's socket is only looked for in a private dir
    monkeypatch.setenv("SNAKEPIT_SHM_QUOTA_DIR", str(private))
    monkeypatch.setattr(_announce, "_dir", None)
    monkeypatch.setattr(_announce, "_targets", {})
    monkeypatch.delenv("SNAKEPIT_SHM_EVENTS", raising=False)
    (mine,) = _announce.targets(12, 34)
    assert os.path.basename(mine) == "ev-12-34.sock"
    monkeypatch.setenv("SNAKEPIT_SHM_EVENTS", "/elsewhere/ev-1-2.sock")
    assert _announce.targets(12, 34) == (mine, "/elsewhere/ev-1-2.sock")
    monkeypatch.setenv("SNAKEPIT_SHM_EVENTS", mine)
    assert _announce.targets(12, 34) == (mine,)


def test_a_forked_child_uses_its_own_socket(receiver):
    path, sock = receiver
    _announce.announce((path,), _announce.PREFIX_ATTACH, "spshm_parent")
    parent_sock = _announce._sock
    pid = os.fork()
    if pid == 0:
        try:
            _announce.announce((path,), _announce.PREFIX_ATTACH, "spshm_child")
            os._exit(0 if _announce._sock is not parent_sock else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert sorted([sock.recv(512), sock.recv(512)]) == [b"Aspshm_child", b"Aspshm_parent"]


@pytest.mark.parametrize("hostile", ["other_uid", "open_mode", "symlink"])
def test_no_announcement_into_a_directory_we_do_not_control(tmp_path, monkeypatch, hostile):
    # The creator's socket is looked for in the quota directory, which may be the
    # world-writable /tmp fallback: a directory another user made (or opened to others)
    # would let them bind ev-<pid>-<start>.sock there and learn every region id this
    # worker attaches. The VM refuses such a directory; so must the sender.
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    directory = tmp_path / "snakepit_shm"
    if hostile == "other_uid":
        directory.mkdir(mode=0o700)
        if os.geteuid() != 0:
            pytest.skip("needs root to give the directory to another uid")
        os.chown(directory, 65534, 65534)
    elif hostile == "open_mode":
        directory.mkdir()
        os.chmod(directory, 0o777)
    else:
        directory.symlink_to(real)
    monkeypatch.setenv("SNAKEPIT_SHM_QUOTA_DIR", str(directory))
    monkeypatch.delenv("SNAKEPIT_SHM_EVENTS", raising=False)
    monkeypatch.setattr(_announce, "_dir", None)
    monkeypatch.setattr(_announce, "_targets", {})
    assert _announce.targets(12, 34) == ()
    monkeypatch.setenv("SNAKEPIT_SHM_EVENTS", "/run/vm/ev-1-2.sock")
    assert _announce.targets(12, 34) == ("/run/vm/ev-1-2.sock",)


def test_announcements_go_to_a_private_directory_of_ours(tmp_path, monkeypatch):
    directory = tmp_path / "snakepit_shm"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv("SNAKEPIT_SHM_QUOTA_DIR", str(directory))
    monkeypatch.delenv("SNAKEPIT_SHM_EVENTS", raising=False)
    monkeypatch.setattr(_announce, "_dir", None)
    monkeypatch.setattr(_announce, "_targets", {})
    assert _announce.targets(12, 34) == (str(directory / "ev-12-34.sock"),)
