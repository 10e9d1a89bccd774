"""Signals raising in the middle of a receive (Ctrl-C, a handler's exception): every
message the channel took from the ring reaches the program once, in order. Also refs and
options the C library would misread.

Python runs a signal's handler between two bytecodes; one raising right after a call
returned, in the caller's frame, drops the returned value whatever the library does
(``data = sock.recv(n)`` has the same window). So the handler here raises only when it
runs inside the library's frames, and counts the other times."""

import os
import signal
import time

import pytest

import snakepit_shm
from conftest import requires_lib
from test_channel import start_owner

pytestmark = requires_lib


class Interrupted(Exception):
    pass


def _message(i, inline_max):
    """Message i: its number, every 250th above the inline threshold (a region message)."""
    return b"%08d" % i + (b"r" * inline_max if i % 250 == 125 else b"")


LIBRARY = os.path.dirname(os.path.abspath(snakepit_shm.__file__))


def _storm(owner_mode, receive, count=6000, burst=1500):
    """Sends ``count`` numbered messages in bursts to an echoing owner, then receives
    their echoes with ``receive(ch, got)`` while one SIGALRM per call fires 20 µs to 1 ms
    into it and its handler raises inside the library; returns (messages received,
    interruptions)."""
    owner = start_owner("shm", owner_mode)
    interrupts = tries = 0
    got = []

    def handler(signum, frame):
        if os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == LIBRARY:
            raise Interrupted()

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        with snakepit_shm.Channel.connect(owner.ref) as ch:
            inline_max = ch.inline_max
            for start in range(0, count, burst):
                for i in range(start, min(count, start + burst)):
                    ch.send(_message(i, ch.inline_max))
                want = min(count, start + burst)
                deadline = time.monotonic() + 15
                while len(got) < want and time.monotonic() < deadline:
                    # one shot per call (progress), at a point that moves along it
                    tries += 1
                    signal.setitimer(signal.ITIMER_REAL, 20e-6 * (1 + tries % 50))
                    try:
                        receive(ch, got)
                    except Interrupted:
                        interrupts += 1
                    except TimeoutError:
                        pass
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        owner.kill()
    return [bytes(m) for m in got], interrupts, inline_max


@pytest.mark.parametrize("receive", [
    pytest.param(lambda ch, got: got.extend(ch.recv_many(2000, timeout=1)), id="recv_many"),
    pytest.param(lambda ch, got: [got.append(ch.recv(timeout=1)) for _ in range(50)],
                 id="recv"),
])
def test_a_signal_raising_mid_receive_loses_no_message(receive):
    got, interrupts, inline_max = _storm("echo", receive)
    expected = [_message(i, inline_max) for i in range(6000)]
    missing = sorted(set(expected) - set(got))
    assert interrupts > 0, "the storm never interrupted a receive: the test proves nothing"
    assert not missing, f"{len(missing)} messages lost by {interrupts} interruptions, " \
                        f"e.g. {[m[:8] for m in missing[:5]]}"
    assert got == expected  # once each, in order


def test_a_ref_or_option_the_c_library_would_misread_is_refused():
    """A NUL in the ref's path made the library connect to the path cut there
    ("/tmp/\\0x" -> "/tmp/"); an infinite max_message_size raised OverflowError."""
    ref = {"kind": "snakepit_shm_channel", "path": "/nonexistent/ctl", "token": "00" * 32}
    for key in ("path", "token"):
        with pytest.raises(ValueError, match=f"'{key}' contains a NUL"):
            snakepit_shm.Channel.connect(dict(ref, **{key: ref[key] + "\0x"}))
    for bad in (float("inf"), float("nan"), -1, 1 << 64, 1e30):
        with pytest.raises(ValueError, match="max_message_size must be"):
            snakepit_shm.Channel.connect(ref, max_message_size=bad)


def test_recv_many_counts_past_u32_and_refuses_non_ints():
    """max_count went to the library as a u32: 2**32 + 2 asked for 2 messages, 2**32 for
    none after the first; a float raised ctypes' ArgumentError after a message was
    taken."""
    owner = start_owner("shm")
    try:
        with snakepit_shm.Channel.connect(owner.ref) as ch:
            for i in range(5):
                ch.send(b"m%d" % i)
            with pytest.raises(TypeError, match="max_count must be an int"):
                ch.recv_many(2.5, timeout=10)
            got = []
            deadline = time.monotonic() + 30
            while len(got) < 5 and time.monotonic() < deadline:
                got += ch.recv_many(1 << 32, timeout=10)
            assert got == [b"m%d" % i for i in range(5)]
    finally:
        owner.kill()
