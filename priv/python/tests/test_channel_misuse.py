"""A careless caller of snakepit_shm.Channel (session-4 attack): arguments of the wrong
type or a malformed ref give an exception that names the argument, not an operator error
from inside the client nor a ConnectionRefusedError for a ref that could never work."""

import asyncio

import pytest

import snakepit_shm
from snakepit_shm import aio, channel
from conftest import requires_lib
from test_channel import start_owner

pytestmark = requires_lib


@pytest.fixture
def owner():
    running = start_owner("shm")
    yield running
    running.kill()


def test_connect_names_a_numeric_option_of_the_wrong_type(owner):
    # Were: TypeError "'>' not supported between instances of 'int' and 'str'" (timeout),
    # "'<' not supported ..." (spin), "'<=' not supported ..." (flush_interval); a
    # max_batch_size of "7" was taken (int("7")).
    for bad in (dict(timeout="1"), dict(spin="x"), dict(flush_interval="x"),
                dict(timeout=True), dict(max_batch_size="7"), dict(max_batch_size=2.5)):
        with pytest.raises(TypeError, match=list(bad)[0]):
            snakepit_shm.Channel.connect(owner.ref, **bad)
    # Negative values were taken silently (a timeout of -1 tried once, a spin of -1 never
    # spun): refused like the other out-of-range values.
    for bad in (dict(timeout=-1), dict(spin=-1e-6)):
        with pytest.raises(ValueError, match=list(bad)[0]):
            snakepit_shm.Channel.connect(owner.ref, **bad)
    with snakepit_shm.Channel.connect(owner.ref) as ch:  # nothing was sent to the owner
        ch.send(b"ok")
        assert ch.recv(timeout=10) == b"ok"


def test_a_malformed_ref_is_a_value_error_naming_the_field(owner):
    # Were ConnectionRefusedError ("the channel token must be 64 hex characters", "bad
    # channel socket path"): a ref that can never connect is the caller's error.
    for field, value in (("token", "zz"), ("token", "g" * 64), ("token", "a" * 65),
                         ("path", "/tmp/" + "a" * 200)):
        ref = dict(owner.ref, **{field: value})
        with pytest.raises(ValueError, match=repr(field)):
            snakepit_shm.Channel.connect(ref)
    with snakepit_shm.Channel.connect(owner.ref) as ch:
        ch.send(b"ok")
        assert ch.recv(timeout=10) == b"ok"


def test_receive_timeouts_of_the_wrong_type_are_named(owner):
    # recv(timeout="1") raised TypeError "unsupported operand type(s) for +: 'float' and
    # 'str'" (from inside the client).
    with snakepit_shm.Channel.connect(owner.ref) as ch:
        for call in (lambda: ch.recv(timeout="1"), lambda: ch.recv_many(2, timeout="1"),
                     lambda: ch.recv(timeout=[1])):
            with pytest.raises(TypeError, match="timeout must be a number of seconds"):
                call()

        async def main():
            achan = aio.AsyncChannel(ch)
            with pytest.raises(TypeError, match="timeout must be a number of seconds"):
                await achan.recv(timeout="1")
            await achan.send(b"still open")
            assert await achan.recv(timeout=10) == b"still open"

        asyncio.run(main())


class _CountingLib:
    """The channel's C library, counting region preparations and answering "ring full"
    to the first ``full`` region sends."""

    def __init__(self, lib, full):
        self._lib, self.full, self.prepared = lib, full, 0

    def __getattr__(self, name):
        fn = getattr(self._lib, name)
        if name == "spshm_ch_prepare_region":
            def prepare(*args):
                self.prepared += 1
                return fn(*args)
            return prepare
        if name == "spshm_ch_send_region":
            def send_region(*args):
                if self.full > 0:
                    self.full -= 1
                    return channel._WOULD_BLOCK
                return fn(*args)
            return send_region
        return fn


def test_asyncio_send_copies_a_region_message_once(owner):
    """AsyncChannel.send of a message above the inline threshold retried the whole
    Channel.send after a full ring: every attempt copied the message into a fresh memfd
    again (3 full rings: 4 copies of 8 MiB)."""
    import zlib
    with snakepit_shm.Channel.connect(owner.ref) as ch:
        counting = _CountingLib(ch._lib, full=3)
        ch._lib = counting
        ch._prepare_wait = lambda *args: False  # "space now": retry at once

        async def main():
            achan = aio.AsyncChannel(ch)
            big = bytes(range(256)) * (8 << 12)  # 8 MiB
            await achan.send(big)
            back = await achan.recv(timeout=30)
            assert zlib.crc32(back) == zlib.crc32(big)

        asyncio.run(main())
        assert counting.full == 0
        assert counting.prepared == 1


OUT_OF_FDS = """
import json, os, resource, sys
sys.path.insert(0, sys.argv[1])
import snakepit_shm
from snakepit_shm import channel
channel._lib()  # loaded before the table is full
ref = json.loads(sys.argv[2])
n = len(os.listdir('/proc/self/fd'))
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 2, n + 2))
held = []
while True:
    try:
        held.append(os.open('/dev/null', os.O_RDONLY))
    except OSError:
        break
os.close(held.pop())  # room for the socket, none for the welcome's descriptors
try:
    snakepit_shm.Channel.connect(ref, timeout=5)
    print('connected')
except Exception as exc:
    print(type(exc).__name__, exc.errno if isinstance(exc, OSError) else '', exc)
"""


def test_a_worker_out_of_descriptors_at_connect_is_told_so(owner):
    """The kernel drops the welcome's memfd and doorbells for a process at its limit:
    connect raised PermissionError "the channel owner refused the connection (wrong
    token, already connected or closed)", blaming the owner and the token."""
    import json
    import os
    import subprocess
    import sys
    package = os.path.dirname(os.path.dirname(os.path.abspath(snakepit_shm.__file__)))
    child = subprocess.run([sys.executable, "-c", OUT_OF_FDS, package, json.dumps(owner.ref)],
                           capture_output=True, text=True, timeout=60)
    out = child.stdout.strip()
    assert out.startswith("OSError 24 "), out + child.stderr[-2000:]
    assert "out of file descriptors (RLIMIT_NOFILE)" in out
