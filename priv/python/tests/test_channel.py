"""The worker end of the message channel against a real Elixir owner (channel_peer.exs),
over both transports; the asyncio API; layout constants against the C library."""

import asyncio
import json
import os
import signal
import subprocess
import time

import pytest

import snakepit_shm
from snakepit_shm import _channel_format as fmt
from snakepit_shm import aio, channel
from conftest import REPO, requires_lib
from test_real_regions import _peer_command

pytestmark = requires_lib
PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "channel_peer.exs")


class Owner:
    """A running channel_peer.exs."""

    def __init__(self, transport, mode="echo"):
        argv, env = _peer_command()
        argv = argv[:-1] + [PEER, transport, mode]
        self.process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True,
                                        cwd=REPO)
        self.ref = json.loads(self.process.stdout.readline())

    def last_line(self, timeout=60):  # waits for the peer VM to exit (slow when loaded)
        out, _ = self.process.communicate(timeout=timeout)
        return out.strip().splitlines()[-1]

    def kill(self):
        self.process.kill()
        self.process.wait()


def start_owner(transport, mode="echo"):
    """A running channel_peer.exs; skipped where it cannot start (failed in CI)."""
    try:
        return Owner(transport, mode)
    except LookupError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the channel tests, but {exc}")
        pytest.skip(f"{exc}: run `mix compile` first")


def fill_ring(send, message):
    """Sends ``message`` without waiting until the outgoing ring is full."""
    with pytest.raises(snakepit_shm.WouldBlock):
        for _ in range(100000):
            send(message, timeout=0)


@pytest.fixture(params=["shm", "socket"])
def owner(request):
    running = start_owner(request.param)
    running.transport = request.param
    yield running
    running.kill()


def test_layout_constants_match_the_c_library():
    layout = channel.layout()
    assert layout["magic"].encode() == fmt.MAGIC
    assert layout["version"] == fmt.VERSION
    assert layout["header_size"] == fmt.HEADER_SIZE
    assert layout["min_capacity"] == fmt.MIN_CAPACITY
    assert layout["max_capacity"] == fmt.MAX_CAPACITY
    assert layout["default_capacity"] == fmt.DEFAULT_CAPACITY
    assert layout["frame_header_size"] == fmt.FRAME_HEADER_SIZE
    assert layout["region_payload_size"] == fmt.REGION_PAYLOAD_SIZE
    assert layout["frame_types"] == {"data": fmt.FRAME_DATA, "region": fmt.FRAME_REGION,
                                     "hello": fmt.FRAME_HELLO, "welcome": fmt.FRAME_WELCOME,
                                     "carrier": fmt.FRAME_CARRIER}
    assert {k: tuple(v) for k, v in layout["fields"].items()} == fmt.FIELDS
    rc = layout["ring_control"]
    assert (rc["size"], rc["head"], rc["producer_waiting"], rc["tail"],
            rc["consumer_waiting"]) == (fmt.RING_CONTROL_SIZE, fmt.HEAD, fmt.PRODUCER_WAITING,
                                        fmt.TAIL, fmt.CONSUMER_WAITING)
    assert fmt.frame_size(0) == 8 and fmt.frame_size(1) == 16 and fmt.frame_size(8) == 16


def test_round_trips_small_and_large(owner):
    with snakepit_shm.Channel.connect(owner.ref) as ch:
        assert ch.transport == owner.transport
        for i in range(500):
            msg = os.urandom(i % 300)
            ch.send(msg)
            assert ch.recv(timeout=10) == msg
        big = os.urandom(3 << 20)              # above the inline threshold: a region message
        ch.send(big)
        back = ch.recv(timeout=30)
        assert isinstance(back, memoryview) and back.readonly
        assert back == big
        back.release()
        stats = ch.stats()
        assert stats["region_messages_sent"] == 1 and stats["region_messages_received"] == 1
        ch.send(b"stop")
    assert owner.last_line() == "closed by_elixir"


def test_recv_many_and_timeout(owner):
    with snakepit_shm.Channel.connect(owner.ref) as ch:
        for i in range(10):
            ch.send(b"m%d" % i)
        got = []
        while len(got) < 10:
            got += ch.recv_many(10, timeout=10)
        assert got == [b"m%d" % i for i in range(10)]
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            ch.recv(timeout=0.05)
        assert time.monotonic() - t0 < 5


def test_recv_many_batches_keep_order_content_and_region_messages(owner):
    """recv_many takes the waiting messages in batches (one library call per batch):
    every size from empty up to the inline threshold, region messages in between, batches
    that fill the buffer, in order and intact, over both transports."""
    import random
    rng = random.Random(15)
    with snakepit_shm.Channel.connect(owner.ref) as ch:
        sizes = [ch.inline_max + 1 if i % 100 == 50 else
                 rng.choice([0, 1, 7, 8, 255, 4096, ch.inline_max, rng.randrange(0, 3000)])
                 for i in range(2000)]
        msgs = [os.urandom(n) for n in sizes]
        got, batches, sent = [], 0, 0
        while sent < len(msgs):
            # a burst that fits in the rings both ways, then its echo in batches
            burst, room = [], ch.inline_max
            while sent < len(msgs) and (not burst or room >= len(msgs[sent]) + 16):
                room -= min(len(msgs[sent]), ch.inline_max) + 16
                burst.append(msgs[sent])
                sent += 1
            for m in burst:
                ch.send(m)
            target = len(got) + len(burst)
            while len(got) < target:
                batch = ch.recv_many(700, timeout=30)
                assert 1 <= len(batch) <= 700
                batches += 1
                got += [bytes(m) for m in batch]
        assert got == msgs
        assert batches < len(msgs)  # some batches held several messages
        assert ch.stats()["region_messages_received"] == sizes.count(ch.inline_max + 1)


def test_python_close_is_peer_closed_for_elixir(owner):
    ch = snakepit_shm.Channel.connect(owner.ref)
    ch.send(b"hello")
    assert ch.recv(timeout=10) == b"hello"
    ch.close()
    ch.close()
    assert owner.last_line() == "closed peer_closed"
    with pytest.raises(snakepit_shm.ChannelClosed):
        ch.send(b"x")


def test_elixir_sigkill_is_seen_within_a_second(owner):
    with snakepit_shm.Channel.connect(owner.ref) as ch:
        ch.send(b"ping")
        assert ch.recv(timeout=10) == b"ping"
        os.kill(owner.process.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(snakepit_shm.ChannelClosed) as info:
            ch.recv(timeout=10)
        assert info.value.reason == "peer_closed"
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(snakepit_shm.ChannelClosed):
            ch.send(b"after")


def test_wrong_token_is_refused(owner):
    bad = dict(owner.ref, token="0" * 64)
    with pytest.raises(PermissionError):
        snakepit_shm.Channel.connect(bad, timeout=2)
    with snakepit_shm.Channel.connect(owner.ref) as ch:   # the real worker still gets in
        ch.send(b"ok")
        assert ch.recv(timeout=10) == b"ok"


def test_bad_refs():
    with pytest.raises(ValueError, match="not a channel ref"):
        snakepit_shm.Channel.connect({"kind": "other"})
    with pytest.raises(ValueError, match="not a channel ref .not JSON"):
        snakepit_shm.Channel.connect("nope")
    with pytest.raises(OSError):
        snakepit_shm.Channel.connect({"kind": "snakepit_shm_channel",
                                      "path": "/nonexistent/ctl", "token": "00" * 32})


@pytest.mark.parametrize("transport", ["shm", "socket"])
def test_back_pressure_would_block(transport):
    mute = start_owner(transport, "mute")
    try:
        with snakepit_shm.Channel.connect(mute.ref) as ch:
            fill_ring(ch.send, b"x" * 1000)
            t0 = time.monotonic()
            with pytest.raises(snakepit_shm.WouldBlock):
                for _ in range(1000):   # waits up to the timeout each time, then gives up
                    ch.send(b"y" * 1000, timeout=0.05)
            assert time.monotonic() - t0 >= 0.05
    finally:
        mute.kill()


def test_asyncio_round_trips(owner):
    async def main():
        ch = await aio.connect(owner.ref)
        async with ch:
            for i in range(200):
                await ch.send(b"a%d" % i)
                assert await ch.recv(timeout=10) == b"a%d" % i
            # Many in flight at once, received by a concurrent task.
            received = []

            async def reader():
                while len(received) < 300:
                    received.append(await ch.recv(timeout=10))

            task = asyncio.create_task(reader())
            for i in range(300):
                await ch.send(b"b%d" % i)
            await asyncio.wait_for(task, 30)
            assert received == [b"b%d" % i for i in range(300)]
            big = os.urandom(1 << 20)
            await ch.send(big)
            assert await ch.recv(timeout=30) == big
            with pytest.raises(TimeoutError):
                await ch.recv(timeout=0.05)

    asyncio.run(main())


def test_connect_async_classmethod(owner):
    async def main():
        ch = await snakepit_shm.Channel.connect_async(owner.ref)
        await ch.send(b"x")
        assert await ch.recv(timeout=10) == b"x"
        ch.close()

    asyncio.run(main())


# ---- the waiting receive (spshm_ch_recv_io: spin, then sleep inside the library) ----

def test_blocking_recv_sees_elixir_sigkill_while_it_sleeps(owner):
    """recv() without a timeout sleeps inside the library (GIL released): the owner's
    SIGKILL, sent from another thread meanwhile, ends it with peer_closed at once."""
    import threading
    with snakepit_shm.Channel.connect(owner.ref, spin=20e-6) as ch:
        ch.send(b"ping")
        assert ch.recv(timeout=10) == b"ping"
        killer = threading.Timer(0.3, os.kill, (owner.process.pid, signal.SIGKILL))
        t0 = time.monotonic()
        killer.start()
        try:
            with pytest.raises(snakepit_shm.ChannelClosed) as info:
                ch.recv()
        finally:
            killer.cancel()
        assert info.value.reason == "peer_closed"
        assert time.monotonic() - t0 < 5.0


def test_blocking_recv_lets_signal_handlers_run(owner):
    """A signal interrupts the wait in the library; the Python handler runs and what it
    raises comes out of recv() (Ctrl-C works on a worker blocked in recv)."""
    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted()

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        with snakepit_shm.Channel.connect(owner.ref) as ch:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            t0 = time.monotonic()
            with pytest.raises(Interrupted):
                ch.recv()
            assert time.monotonic() - t0 < 5.0
            # the channel still works after the interruption
            ch.send(b"after")
            assert ch.recv(timeout=10) == b"after"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("load,spins", [("100", False), ("0", True)])
def test_spin_only_while_a_cpu_is_free(owner, monkeypatch, load, spins):
    """The receiver spins before it sleeps only while the other runnable tasks are fewer
    than the CPUs: on an overloaded machine it would take the CPU its peer needs to answer.
    (SNAKEPIT_SHM_CHANNEL_LOADAVG stands in for that count; re-read every 50 ms.)"""
    if owner.transport != "shm":
        pytest.skip("the spin watches the shared-memory ring")
    if os.cpu_count() < 2 and spins:
        pytest.skip("never spins on one CPU")
    monkeypatch.setenv("SNAKEPIT_SHM_CHANNEL_LOADAVG", load)
    time.sleep(0.25)
    with snakepit_shm.Channel.connect(owner.ref, spin=100e-6) as ch:
        for _ in range(10):
            with pytest.raises(TimeoutError):
                ch.recv(timeout=0.003)
        stats = ch.stats()
        if spins:
            assert stats["spin_misses"] >= 5
        else:
            assert stats["spin_misses"] == 0 and stats["spin_hits"] == 0
        ch.send(b"late")
        assert ch.recv(timeout=10) == b"late"
    monkeypatch.delenv("SNAKEPIT_SHM_CHANNEL_LOADAVG")
    time.sleep(0.25)


def test_spin_zero_never_spins(owner):
    with snakepit_shm.Channel.connect(owner.ref, spin=0) as ch:
        for i in range(20):
            ch.send(b"%d" % i)
            assert ch.recv(timeout=10) == b"%d" % i
        stats = ch.stats()
        assert stats["spin_hits"] == 0 and stats["spin_misses"] == 0


def test_close_from_another_thread_wakes_a_blocked_recv(owner):
    """close() while a thread sleeps in recv() (inside the library): that recv ends with
    ChannelClosed at once, and nothing is freed under it (no crash)."""
    import threading
    ch = snakepit_shm.Channel.connect(owner.ref)
    ch.send(b"ping")
    assert ch.recv(timeout=10) == b"ping"
    outcome = []

    def receiver():
        try:
            ch.recv()
            outcome.append("message")
        except snakepit_shm.ChannelClosed as exc:
            outcome.append(exc.reason)

    thread = threading.Thread(target=receiver)
    thread.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    ch.close()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - t0 < 2.0
    assert outcome == ["closed"]
    assert owner.last_line() == "closed peer_closed"


def test_send_blocked_on_a_full_ring_while_another_thread_sleeps_in_recv(owner):
    """One thread sleeps in recv() while another sends faster than the echo drains the
    ring: the sender's waits for space and the receiver's waits for data share the
    channel's wake-ups, and neither may lose the other's (it hung before)."""
    import threading
    count, size = 400, 16_000
    got = []

    with snakepit_shm.Channel.connect(owner.ref) as ch:
        def receiver():
            try:
                while len(got) < count:
                    got.append(bytes(ch.recv(timeout=30)))
            except Exception as exc:  # reported by the assertion below
                got.append(exc)

        thread = threading.Thread(target=receiver)
        thread.start()
        for i in range(count):
            ch.send(bytes([i % 251]) * size, timeout=30)
        thread.join(60)
        assert not thread.is_alive()
        assert [m[0] if isinstance(m, bytes) else m for m in got] == \
            [i % 251 for i in range(count)]
        assert all(len(m) == size for m in got)


def test_stats_stay_valid_while_the_counters_move(owner):
    # The counters change between the library's "how long" and "copy" calls while another
    # thread sends and receives: stats() once parsed a truncated text (JSONDecodeError).
    import threading
    with snakepit_shm.Channel.connect(owner.ref) as ch:
        stop = threading.Event()

        def stream():
            while not stop.is_set():
                for i in range(64):
                    ch.send(b"s" * (i % 40))
                for _ in range(64):
                    ch.recv(timeout=10)

        streamer = threading.Thread(target=stream)
        streamer.start()
        try:
            seen = set()
            # At least 1.5 s of stats() calls, and until the counters were seen to move
            # (the streamer may wait for a CPU on a loaded machine).
            start = time.monotonic()
            while (time.monotonic() < start + 1.5
                   or len(seen) <= 10 and time.monotonic() < start + 30):
                seen.add(ch.stats()["messages_sent"])
        finally:
            stop.set()
            streamer.join(timeout=30)
        assert len(seen) > 10          # the counters did move under it
        ch.send(b"stop")
    assert owner.last_line() == "closed by_elixir"


def test_a_worker_out_of_descriptors_is_told_so_not_blamed_on_the_peer(owner):
    # A region message's memfd comes by SCM_RIGHTS; a process at RLIMIT_NOFILE gets it
    # dropped by the kernel (MSG_CTRUNC). That used to close the channel as a
    # "protocol_error" of the Elixir side.
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    with snakepit_shm.Channel.connect(owner.ref) as ch:
        big = ch.inline_max + 1
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8,
                                                        hard))
            while True:
                try:
                    held.append(os.dup(0))
                except OSError:
                    break
            ch.send(b"big:%d" % big)
            with pytest.raises(snakepit_shm.ChannelClosed) as closed:
                ch.recv(timeout=30)
        finally:
            for fd in held:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert closed.value.reason == "io_error"
        assert "out of file descriptors" in str(closed.value)
        assert not isinstance(closed.value, snakepit_shm.ChannelProtocolError)
    assert owner.last_line() == "closed peer_closed"


def test_a_forked_child_can_neither_use_nor_close_the_parents_channel(owner):
    """A child forked while the channel is open shares its socket and rings: its close()
    (leaving a ``with`` block, or the object's collection) shut the socket down under the
    parent, which then lost its messages (shm: sent into a ring nobody reads) or saw
    peer_closed; its send/recv raced the parent's on the same rings. In the child, every
    use raises ChannelClosed("forked") and close() leaves the parent's channel alone."""
    with snakepit_shm.Channel.connect(owner.ref) as ch:
        ch.send(b"before")
        assert ch.recv(timeout=10) == b"before"
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what each call did, then drop the channel
            try:
                report = []
                for call in (lambda: ch.send(b"from the child"), lambda: ch.recv(timeout=0.2),
                             ch.stats, ch.fileno):
                    try:
                        call()
                        report.append("ok")
                    except snakepit_shm.ChannelClosed as exc:
                        report.append(exc.reason)
                    except BaseException as exc:
                        report.append(type(exc).__name__)
                ch.close()
                ch.__del__()
                os.write(write_end, json.dumps(report).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        with os.fdopen(read_end) as pipe:
            assert json.loads(pipe.read()) == ["forked"] * 4
        assert not ch.closed
        ch.send(b"after")
        assert ch.recv(timeout=10) == b"after"
        ch.send(b"stop")
    assert owner.last_line() == "closed by_elixir"


def test_threads_receiving_at_once_get_every_message_once_and_intact(owner):
    """Several threads calling recv()/recv_many() on one channel: they shared the
    channel's receive buffer, so one thread's message was overwritten by another's before
    it was copied out (corrupt, duplicated and lost messages, silently). Receivers now
    take turns; each message reaches exactly one of them, whole."""
    import threading
    count = 6000
    got = [[] for _ in range(3)]
    stop = threading.Event()

    with snakepit_shm.Channel.connect(owner.ref) as ch:
        def receiver(j):
            try:
                while not stop.is_set():
                    try:
                        if j == 2:
                            got[j].extend(bytes(m) for m in ch.recv_many(50, timeout=0.2))
                        else:
                            got[j].append(bytes(ch.recv(timeout=0.2)))
                    except TimeoutError:
                        pass
            except Exception as exc:  # reported by the assertion below
                got[j].append(exc)

        threads = [threading.Thread(target=receiver, args=(j,)) for j in range(3)]
        for thread in threads:
            thread.start()
        try:
            for i in range(count):
                ch.send(b"%08d" % i + bytes([i % 251]) * (i % 700), timeout=30)
            deadline = time.monotonic() + 30
            while sum(map(len, got)) < count and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
        everything = got[0] + got[1] + got[2]
        assert not [m for m in everything if not isinstance(m, bytes)]
        ids = sorted(int(m[:8]) for m in everything)
        assert ids == list(range(count))
        assert all(m[8:] == bytes([int(m[:8]) % 251]) * (int(m[:8]) % 700) for m in everything)
        for per_thread in got:     # each thread saw its share in order
            mine = [int(m[:8]) for m in per_thread]
            assert mine == sorted(mine)


def test_infinite_and_nan_timeouts(owner):
    """timeout=math.inf means forever (it raised OverflowError: cannot convert float
    infinity to integer), so does a huge finite one; NaN is refused with a ValueError that
    names the timeout."""
    import math
    import threading
    with snakepit_shm.Channel.connect(owner.ref) as ch:
        timer = threading.Timer(0.1, ch.send, (b"late",))
        timer.start()
        try:
            assert ch.recv(timeout=math.inf) == b"late"
            timer.join()
            timer = threading.Timer(0.1, ch.send, (b"later",))
            timer.start()
            assert ch.recv_many(5, timeout=math.inf) == [b"later"]
            timer.join()
            timer = threading.Timer(0.1, ch.send, (b"latest",))
            timer.start()
            assert ch.recv(timeout=1e300) == b"latest"
        finally:
            timer.cancel()
        for call in (lambda: ch.recv(timeout=math.nan), lambda: ch.recv_many(2, math.nan)):
            with pytest.raises(ValueError, match="timeout"):
                call()

        async def main():
            achan = aio.AsyncChannel(ch)
            await achan.send(b"async", timeout=math.inf)
            assert await achan.recv(timeout=math.inf) == b"async"
            with pytest.raises(ValueError, match="timeout"):
                await achan.recv(timeout=math.nan)

        asyncio.run(main())


@pytest.mark.parametrize("timeout", [float("inf"), 1e300])
@pytest.mark.parametrize("transport", ["shm", "socket"])
def test_send_with_an_infinite_timeout_waits_on_a_full_ring(transport, timeout):
    import threading
    mute = start_owner(transport, "mute")
    try:
        with snakepit_shm.Channel.connect(mute.ref) as ch:
            fill_ring(ch.send, b"x" * 1000)
            outcome = []

            def sender():
                try:
                    while True:  # the socket transport's buffers may take a few more
                        ch.send(b"y" * 1000, timeout=timeout)
                except Exception as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=sender)
            thread.start()
            time.sleep(0.3)
            ch.close()
            thread.join(5)
            assert not thread.is_alive()
            assert len(outcome) == 1 and isinstance(outcome[0], snakepit_shm.ChannelClosed)
    finally:
        mute.kill()


def test_connect_checks_its_numeric_options(owner):
    """connect's numbers went to C integers unchecked: timeout=math.inf raised
    OverflowError, a timeout above 2**31 ms (about 25 days) wrapped negative and failed at
    once, max_batch_size=-1 / flush_interval=-1 / max_message_size=-1 wrapped to huge
    unsigned values silently, max_batch_size=0 came out as a ConnectionRefusedError.
    Now: an infinite or huge timeout waits as long as needed, bad values raise ValueError
    naming the option (before anything is sent to the owner)."""
    import math
    for bad in (dict(max_batch_size=0), dict(max_batch_size=-1),
                dict(max_batch_size=1 << 32), dict(flush_interval=-1),
                dict(flush_interval=math.nan), dict(max_message_size=-1),
                dict(timeout=math.nan), dict(spin=math.inf), dict(spin=math.nan)):
        with pytest.raises(ValueError, match=list(bad)[0]):
            snakepit_shm.Channel.connect(owner.ref, **bad)
    with snakepit_shm.Channel.connect(owner.ref, timeout=3e6) as ch:   # 3e9 ms
        ch.send(b"ok")
        assert ch.recv(timeout=10) == b"ok"
    assert owner.last_line() == "closed peer_closed"


def test_connect_with_an_infinite_timeout(owner):
    import math
    with snakepit_shm.Channel.connect(owner.ref, timeout=math.inf) as ch:
        ch.send(b"ok")
        assert ch.recv(timeout=10) == b"ok"


def test_recv_many_refuses_a_count_below_one(owner):
    """recv_many(0) (or a negative count) returned one message anyway, more than asked;
    it raises ValueError and leaves the message for the next receive."""
    with snakepit_shm.Channel.connect(owner.ref) as ch:
        ch.send(b"kept")
        for count in (0, -1):
            with pytest.raises(ValueError, match="max_count"):
                ch.recv_many(count, timeout=10)
        assert ch.recv_many(1, timeout=10) == [b"kept"]


def test_a_signal_handler_may_receive_while_its_thread_waits_in_recv(owner):
    """A signal handler runs in the thread that waits in recv(); if it receives on the
    same channel it must not wait for that thread's own turn (a self-deadlock)."""
    import threading
    got = []

    def handler(signum, frame):
        ch.send(b"in the handler")
        got.append(ch.recv(timeout=5))

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        with snakepit_shm.Channel.connect(owner.ref) as ch:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            later = threading.Timer(1.0, ch.send, (b"for the main recv",))
            later.start()
            try:
                assert ch.recv(timeout=10) == b"for the main recv"
            finally:
                later.cancel()
            assert got == [b"in the handler"]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("transport", ["shm", "socket"])
def test_asyncio_sender_waiting_for_space_beside_a_waiting_receiver(transport):
    """A task waits in recv() (nothing comes: the peer only reads) while another sends
    faster than the peer reads. Each woken task called handle_events(), which withdraws
    every "about to sleep" announcement of the channel, also the one the other task had
    just made: that task then slept unannounced, the peer never rang, and send hung."""
    sink = start_owner(transport, "sink")

    async def main():
        ch = await aio.connect(sink.ref)
        async with ch:
            receiver = asyncio.create_task(ch.recv())

            async def sender():
                for i in range(3000):
                    await ch.send(bytes([i % 251]) * 12_000)

            await asyncio.wait_for(sender(), 30)   # hung after a few messages
            assert not receiver.done()
            receiver.cancel()
            await ch.send(b"stop")

    try:
        asyncio.run(main())
        assert sink.last_line() == "closed by_elixir"
    finally:
        sink.kill()


@pytest.mark.parametrize("transport", ["shm", "socket"])
def test_asyncio_send_of_a_typed_buffer_waits_without_freezing_the_loop(transport):
    """aio send measured the message as len(memoryview(data)): elements, not bytes (an
    array('i') of 320 items is 1280 bytes, not 320). On a full ring it waited for room
    for 320 bytes, found it, tried again, failed again: a busy loop that never yielded,
    freezing the event loop (here for the whole timeout; without one, for good)."""
    import array
    mute = start_owner(transport, "mute")

    async def main():
        ch = await aio.connect(mute.ref)
        async with ch:
            typed = array.array("i", range(320))   # 1280 bytes; the ring's last 1136 free
            fill_ring(ch.channel.send, typed)
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            task = asyncio.create_task(ticker())
            await asyncio.sleep(0)
            with pytest.raises(snakepit_shm.WouldBlock):
                for _ in range(1000):
                    await ch.send(typed, timeout=0.5)
            task.cancel()
            assert ticks >= 10     # the loop ran meanwhile

    try:
        asyncio.run(main())
    finally:
        mute.kill()


def test_the_spin_ends_at_the_timeout_and_at_close(owner, monkeypatch):
    """recv spun for the whole ``spin`` before it looked at its timeout or at a close:
    with spin=0.5, recv(timeout=0.05) took half a second, and close() from another thread
    did not end a recv() until its spin was over (spin=50 - meant as µs, like Elixir's
    :spin - burnt 50 s of CPU per idle recv, deaf to close)."""
    import threading
    if owner.transport != "shm":
        pytest.skip("the spin watches the shared-memory ring")
    monkeypatch.setenv("SNAKEPIT_SHM_CHANNEL_LOADAVG", "0")   # a CPU is free: it spins
    time.sleep(0.25)
    second = Owner("shm")
    try:
        with snakepit_shm.Channel.connect(owner.ref, spin=0.5) as ch:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                ch.recv(timeout=0.05)
            assert time.monotonic() - t0 < 0.3
        with snakepit_shm.Channel.connect(second.ref, spin=5.0) as ch:
            closer = threading.Timer(0.2, ch.close)
            closer.start()
            t0 = time.monotonic()
            with pytest.raises(snakepit_shm.ChannelClosed):
                ch.recv()
            assert time.monotonic() - t0 < 2.0
            closer.join()
    finally:
        second.kill()
        monkeypatch.delenv("SNAKEPIT_SHM_CHANNEL_LOADAVG")
        time.sleep(0.25)
