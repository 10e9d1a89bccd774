"""Holds: attaching registers (pid, start time) in the header's holder table."""

import json
import os
import subprocess
import sys
import threading

import pytest

import snakepit_shm
from snakepit_shm import _format as F
from snakepit_shm import _proc
from conftest import requires_lib

pytestmark = requires_lib


def holders(seg):
    return F.unpack_holders(seg.read_header())


@pytest.mark.parametrize("backend", ["posix", "memfd"])
def test_attach_registers_and_close_releases(forge, backend):
    seg = getattr(forge, backend)(64)
    generation = seg.u32("holders_generation")
    region = snakepit_shm.attach(seg.region_id)
    assert region.held
    assert seg.u32("refcount") == 1
    assert holders(seg) == [{"pid": os.getpid(),
                             "start_time": _proc.process_start_time(os.getpid()),
                             "count": 1, "writable": False}]
    assert seg.u32("holders_generation") > generation
    region.close()
    assert seg.u32("refcount") == 0
    assert holders(seg) == []


def test_holds_add_up_and_rw_marks_the_slot_writable(forge):
    seg = forge.posix(64)
    first = snakepit_shm.attach(seg.region_id)
    second = snakepit_shm.attach(seg.ref(), mode="rw")
    assert seg.u32("refcount") == 2
    # One slot per attachment (per open of the control object, which holds the slot's
    # lock): a slot dies with its attachment, whatever the rest of the process does.
    slots = holders(seg)
    assert sorted((s["count"], s["writable"]) for s in slots) == [(1, False), (1, True)]
    assert {s["pid"] for s in slots} == {os.getpid()}
    first.close()
    assert seg.u32("refcount") == 1
    [slot] = holders(seg)
    assert slot["count"] == 1 and slot["writable"]
    second.close()
    second.close()  # idempotent: releases once
    assert seg.u32("refcount") == 0 and holders(seg) == []


def test_failed_attach_leaves_no_hold(forge):
    seg = forge.posix(64)
    seg.set_u32("state", F.STATE_SEALED)
    with pytest.raises(snakepit_shm.PermissionError):
        snakepit_shm.attach(seg.region_id, mode="rw")
    assert seg.u32("refcount") == 0 and holders(seg) == []


def test_start_time_matches_the_core(lib):
    pid = os.getpid()
    assert _proc.process_start_time(pid) == lib.process_start_time(pid)
    assert _proc.self_identity() == (pid, lib.process_start_time(pid))


def test_holds_of_another_process_are_its_own(forge):
    """A worker process attaches; its pid is in the table until it closes."""
    seg = forge.memfd(64)
    code = (
        "import sys, snakepit_shm\n"
        "r = snakepit_shm.attach(sys.argv[1])\n"
        "print('attached', flush=True)\n"
        "sys.stdin.readline()\n"
        "r.close()\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", code, seg.region_id],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "attached"
        assert [h["pid"] for h in holders(seg)] == [child.pid]
        assert seg.u32("refcount") == 1
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()
        child.wait()
    assert seg.u32("refcount") == 0 and holders(seg) == []


def test_forked_child_does_not_release_the_parents_hold(forge):
    seg = forge.posix(64)
    region = snakepit_shm.attach(seg.region_id)
    pid = os.fork()
    if pid == 0:  # child: closing must not touch the parent's hold
        try:
            region.close()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert seg.u32("refcount") == 1
    region.close()
    assert seg.u32("refcount") == 0


def test_a_forked_child_holds_under_its_own_pid(forge):
    # The client caches its pid (os.getpid() is a system call): a child of os.fork()
    # must register, see and release its holds as itself, not as the parent.
    seg = forge.memfd(64)
    parent = snakepit_shm.attach(seg.region_id)  # the parent's caches are warm
    assert _proc.pid() == os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            assert _proc.pid() == os.getpid()
            assert _proc.self_identity()[0] == os.getpid()
            region = snakepit_shm.attach(seg.region_id)
            pids = sorted(h["pid"] for h in holders(seg))
            assert pids == sorted([os.getppid(), os.getpid()]), pids
            assert region.close()
            assert [h["pid"] for h in holders(seg)] == [os.getppid()]
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [h["pid"] for h in holders(seg)] == [os.getpid()]
    parent.close()
    assert seg.u32("refcount") == 0 and holders(seg) == []


def test_concurrent_attach_and_close_from_threads_and_processes(forge):
    seg = forge.memfd(64)
    ref = seg.ref()
    code = (
        "import sys, json, snakepit_shm\n"
        "ref = json.loads(sys.argv[1])\n"
        "for _ in range(200):\n"
        "    snakepit_shm.attach(ref).close()\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    children = [subprocess.Popen([sys.executable, "-c", code, json.dumps(ref)], env=env)
                for _ in range(3)]
    failures = []

    def worker():
        try:
            for _ in range(200):
                with snakepit_shm.attach(ref, mode="rw") as region:
                    region.write(0, b"x")
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [child.wait(timeout=120) for child in children] == [0, 0, 0]
    assert failures == []
    assert seg.u32("refcount") == 0 and holders(seg) == []
