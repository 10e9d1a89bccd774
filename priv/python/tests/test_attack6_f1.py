"""Attack run 6 (F1): the worker's end of the message channel, attacked as a careless
program or a flooding peer would."""

import asyncio
import gc
import os
import signal
import time

import pytest

import snakepit_shm
from snakepit_shm import aio
from conftest import requires_lib
from test_channel import start_owner

pytestmark = requires_lib


def _message_mappings():
    with open("/proc/self/maps") as f:
        return f.read().count("memfd:snakepit-channel-msg")


@pytest.fixture
def owner():
    running = start_owner("shm")
    yield running
    running.kill()


def test_region_messages_kept_hold_no_mapping_each(owner):
    # Were: every region message was a memoryview over its own mmap, kept as long as the
    # view lived: a worker keeping its messages (a list of inputs) held one mapping per
    # message against vm.max_map_count (65 530), and past it every mmap of the process
    # failed (the next region message raised, and with it the message was lost).
    with snakepit_shm.Channel.connect(owner.ref) as ch:
        size = ch.inline_max + 4000  # a region message
        before = _message_mappings()
        kept = []
        for _ in range(2000):
            ch.send(b"big:%d" % size)
            msg = ch.recv(timeout=10)
            assert isinstance(msg, memoryview) and msg.readonly and msg.nbytes == size
            kept.append(msg)
        held = _message_mappings() - before
        assert held < 10, f"{held} mappings held by 2000 kept messages"
        assert all(m == b"b" * size for m in kept[::97])
        # above 1 MiB: still zero-copy, one mapping while the view lives
        ch.send(b"big:%d" % (2 << 20))
        big = ch.recv(timeout=10)
        assert big.readonly and big.nbytes == 2 << 20 and big[-1:] == b"b"
        assert _message_mappings() - before == held + 1
        big.release()
        assert _message_mappings() - before == held


def _fds():
    """This process's descriptors other than pipes (the owner's stdout pipe closes when
    it exits)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            continue
        if not target.startswith("pipe:"):
            out.append(target)
    return sorted(out)


def test_a_channel_dropped_without_close_ends_at_once_and_leaves_no_descriptor(owner):
    # Held: collecting an unclosed Channel closes it (the owner sees peer_closed) and
    # frees every descriptor it had, also with a region message taken and kept.
    before = _fds()
    ch = snakepit_shm.Channel.connect(owner.ref)
    ch.send(b"big:%d" % (ch.inline_max + 1))
    kept = ch.recv(timeout=10)
    del ch
    gc.collect()
    assert owner.last_line(timeout=60) == "closed peer_closed"
    assert _fds() == before
    assert kept.nbytes > 0 and kept[:1] == b"b"


class _Interrupted(Exception):
    pass


def test_an_exception_from_a_signal_during_a_blocked_send_leaves_the_channel_usable():
    # Held: a send blocked on a full ring (the owner never reads) and ended by a signal
    # handler's exception sends nothing, keeps no descriptor (a region message's memfd
    # is closed), and the channel still answers: WouldBlock at once, then a clean close.
    mute = start_owner("shm", "mute")

    def raise_(*_):
        raise _Interrupted()

    old = signal.signal(signal.SIGALRM, raise_)
    try:
        with snakepit_shm.Channel.connect(mute.ref) as ch:
            while True:
                try:
                    ch.send(b"x" * 1000, timeout=0)
                except snakepit_shm.WouldBlock:
                    break
            before = _fds()
            for message in (b"y" * 1000, b"z" * (ch.inline_max + 1)):
                signal.setitimer(signal.ITIMER_REAL, 0.2)
                t0 = time.monotonic()
                with pytest.raises(_Interrupted):
                    ch.send(message)
                assert time.monotonic() - t0 < 5
                assert _fds() == before
            with pytest.raises(snakepit_shm.WouldBlock):
                ch.send(b"w" * 1000, timeout=0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        mute.kill()


def test_a_cancelled_aio_recv_loses_no_message(owner):
    # Held: cancelling `await achan.recv()` (a cancelled task, wait_for's timeout) while
    # the answer is on its way leaves the answer for the next recv, in order.
    async def main():
        with snakepit_shm.Channel.connect(owner.ref) as ch:
            achan = aio.AsyncChannel(ch)
            for i in range(200):
                task = asyncio.ensure_future(achan.recv())
                await asyncio.sleep(0)
                await achan.send(b"%d" % i)
                if i % 2:
                    await asyncio.sleep(0.001 * (i % 3))
                task.cancel()
                try:
                    got = await task
                except asyncio.CancelledError:
                    got = await achan.recv(timeout=10)
                assert got == b"%d" % i

    asyncio.run(main())
