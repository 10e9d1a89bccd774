"""The worker's presence to the VMs (snakepit_shm._presence, docs/FORMAT.md "Presence
sockets"): what it sends, where it looks, and what it refuses to trust."""

import json
import os
import socket
import struct

import pytest

from snakepit_shm import _presence, _proc


@pytest.fixture
def fresh(monkeypatch):
    """A presence state as in a new process (join() runs once per process)."""
    monkeypatch.setattr(_presence, "_joined_pid", None)
    monkeypatch.setattr(_presence, "_sockets", {})
    monkeypatch.setattr(_presence, "_refused", set())
    yield
    for sock in _presence._sockets.values():
        sock.close()


def _vms(tmp_path, mode=0o700):
    vms = tmp_path / f"snakepit_shm-{os.geteuid()}" / "vms"
    vms.mkdir(parents=True)
    os.chmod(vms.parent, 0o700)
    os.chmod(vms, mode)
    return vms


def _listener(path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    server.settimeout(5)
    return server


def _frame(conn):
    header = conn.recv(4, socket.MSG_WAITALL)
    (length,) = struct.unpack(">I", header)
    return json.loads(conn.recv(length, socket.MSG_WAITALL))


def test_introduces_itself_to_every_vm_with_its_creator_identity(tmp_path, fresh):
    vms = _vms(tmp_path)
    servers = [_listener(vms / f"vm-{n}.sock") for n in ("a", "b")]
    (vms / "vm-dead.sock").touch()  # not a socket: refused, skipped
    try:
        assert _presence.join(str(tmp_path)) == 2
        pid, start_time = _proc.self_identity()
        for server in servers:
            conn, _ = server.accept()
            with conn:
                assert _frame(conn) == {"snakepit_shm_peer": 1, "os_pid": pid,
                                        "start_time": start_time,
                                        "boot_id": _proc.boot_id().hex()}
        # Once per process.
        assert _presence.join(str(tmp_path)) == 2
        assert _presence.connected() == 2
    finally:
        for server in servers:
            server.close()


def test_no_directory_means_no_presence(tmp_path, fresh):
    assert _presence.join(str(tmp_path / "missing")) == 0
    assert _presence.connected() == 0


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o701])
def test_a_directory_others_can_enter_is_not_trusted(tmp_path, fresh, mode):
    vms = _vms(tmp_path, mode)
    server = _listener(vms / "vm-a.sock")
    try:
        assert _presence.join(str(tmp_path)) == 0
    finally:
        server.close()


def test_a_symlinked_directory_is_not_followed(tmp_path, fresh):
    real = _vms(tmp_path / "real")
    server = _listener(real / "vm-a.sock")
    link_parent = tmp_path / "shm" / f"snakepit_shm-{os.geteuid()}"
    link_parent.mkdir(parents=True)
    os.chmod(link_parent, 0o700)
    os.symlink(real, link_parent / "vms")
    try:
        assert _presence.join(str(tmp_path / "shm")) == 0
    finally:
        server.close()


def test_joins_again_the_vms_whose_presence_restarted_or_that_started_later(tmp_path, fresh):
    # Found by attack run 4 (D): join() ran once per process, so after a restart of a VM's
    # presence (the application stopped and started again, the Peers process restarted:
    # a new socket name) or a VM started after the worker's first output, the worker was
    # connected to nobody, for good: killed with SIGKILL, its unadopted POSIX outputs
    # stayed until the next VM start.
    vms = _vms(tmp_path)
    first = _listener(vms / "vm-a.sock")
    try:
        assert _presence.join(str(tmp_path)) == 1
        conn, _ = first.accept()
        _frame(conn)
        # The VM's presence ends (its connection closes, its name goes)...
        conn.close()
    finally:
        first.close()
        os.unlink(vms / "vm-a.sock")
    # ...and comes back under a new name, next to a VM started since.
    servers = [_listener(vms / f"vm-{n}.sock") for n in ("b", "c")]
    try:
        assert _presence.join(str(tmp_path)) == 2
        conns = [server.accept()[0] for server in servers]
        for conn in conns:
            assert _frame(conn)["os_pid"] == os.getpid()
        # The dead connection was closed, not kept.
        assert _presence.connected() == 2 and len(_presence._sockets) == 2
        for conn in conns:
            conn.close()
        assert _presence.connected() == 0
    finally:
        for server in servers:
            server.close()


def test_a_name_that_refused_is_not_tried_again(tmp_path, fresh, monkeypatch):
    # Attack run 4 (D): join() runs before every POSIX output since it joins VMs that
    # appeared; the names of dead VMs (refused until a VM start removes them, or planted)
    # must not cost a connect each time.
    vms = _vms(tmp_path)
    for n in range(50):
        (vms / f"vm-dead{n}.sock").touch()
    made = []
    real = socket.socket

    def counting(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_presence.socket, "socket", counting)
    assert _presence.join(str(tmp_path)) == 0
    assert len(made) == 50
    assert _presence.join(str(tmp_path)) == 0
    assert len(made) == 50


def test_out_of_descriptors_join_does_not_raise(tmp_path, fresh, monkeypatch):
    vms = _vms(tmp_path)
    server = _listener(vms / "vm-a.sock")

    def no_descriptor(*args, **kwargs):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(_presence.socket, "socket", no_descriptor)
    try:
        assert _presence.join(str(tmp_path)) == 0
    finally:
        server.close()
