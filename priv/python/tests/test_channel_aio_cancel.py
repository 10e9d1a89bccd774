"""Cancelling snakepit_shm.aio.connect (carried note, attack run 4 A): the handshake ran
on in its executor thread after the cancellation, so the owner took the abandoned
connection as the channel's one worker (it saw peer_closed once the discarded Channel
was collected) and the real worker's connect was refused with "No such file or
directory". A cancelled connect now stops the handshake; if the owner had accepted it
already, the connection is closed at once and a later connect says what happened."""

import asyncio
import gc
import os
import signal
import time

import pytest

from snakepit_shm import aio, errors
from conftest import requires_lib
from test_channel import start_owner

pytestmark = requires_lib


@pytest.fixture(params=["shm", "socket"])
def owner(request):
    running = start_owner(request.param)
    yield running
    if running.process.poll() is None:
        os.kill(running.process.pid, signal.SIGCONT)
    running.kill()


def _fds():
    # Collected first: channels earlier tests dropped without close() hold descriptors
    # until then, and must not count as this test's (or as closed by it).
    gc.collect()
    return sorted(os.listdir("/proc/self/fd"))


async def _settled(before, within=3.0):
    """The descriptors once the abandoned handshake's executor thread has returned (at
    once: the cancellation stops it), compared with ``before``."""
    deadline = time.monotonic() + within
    while _fds() != before and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return _fds()


async def _echo(ref):
    ch = await aio.connect(ref, timeout=10)
    try:
        await ch.send(b"ping")
        return await ch.recv(timeout=10)
    finally:
        ch.close()


def test_a_connect_cancelled_before_the_owner_accepted_leaves_the_channel_free(owner):
    """The owner VM is stopped: the cancelled connect waits for the welcome. Once the VM
    runs again it must not take that abandoned connection: the real worker connects."""
    async def main():
        before = _fds()
        os.kill(owner.process.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(aio.connect(owner.ref), 0.3)
            assert time.monotonic() - t0 < 2  # propagated at once
            # the executor thread stops at once too: nothing of it stays open
            assert await _settled(before, 1.0) == before
        finally:
            os.kill(owner.process.pid, signal.SIGCONT)
        assert await _echo(owner.ref) == b"ping"  # was: ConnectionRefusedError (ENOENT)
        assert await _settled(before) == before

    asyncio.run(main())


def test_a_task_cancelled_after_the_handshake_closes_the_connection_and_says_so(owner):
    """The handshake completes while the loop is busy, then the task is cancelled: the
    channel (one worker for life) was taken; the connection is closed at once (the owner
    sees peer_closed), and the next connect names the cancelled connect."""
    async def main():
        before = _fds()
        task = asyncio.ensure_future(aio.connect(owner.ref))
        await asyncio.sleep(0)  # the task hands the handshake to the executor
        time.sleep(1.0)  # the loop is busy meanwhile: the handshake completes
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _settled(before) == before
        with pytest.raises(errors.PermissionError, match="was cancelled"):
            await aio.connect(owner.ref)
        assert await _settled(before) == before

    asyncio.run(main())
    assert owner.last_line() == "closed peer_closed"


@pytest.mark.parametrize("timeout", [0, 1e-3])
def test_a_connect_timed_out_by_wait_for_never_leaves_the_channel_unusable(owner, timeout):
    """wait_for(connect, tiny timeout), as the attack did: whichever way the race ends,
    the next worker either connects or is told that a cancelled connect took the channel
    (whose owner then saw peer_closed)."""
    async def main():
        before = _fds()
        try:
            (await asyncio.wait_for(aio.connect(owner.ref), timeout)).close()
            return "connected"  # the handshake won the race: nothing to check
        except asyncio.TimeoutError:
            pass
        assert await _settled(before) == before
        try:
            assert await _echo(owner.ref) == b"ping"
            return "free"
        except errors.PermissionError as exc:
            assert "was cancelled" in str(exc)
            return "taken"

    before = _fds()
    outcome = asyncio.run(main())
    gc.collect()
    assert _fds() == before
    if outcome == "taken":
        assert owner.last_line() == "closed peer_closed"
