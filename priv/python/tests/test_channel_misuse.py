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


# A child connects, then makes the preparation of a region message fail (out of
# descriptors, or a message above RLIMIT_FSIZE) and sends one.
REGION_FAILURE = """
import errno, json, os, resource, sys
sys.path.insert(0, sys.argv[1])
import snakepit_shm
ref, how = json.loads(sys.argv[2]), sys.argv[3]
ch = snakepit_shm.Channel.connect(ref, timeout=10)
big = b"x" * (ch.inline_max + 1)
held = []
if how == "fds":
    n = len(os.listdir('/proc/self/fd'))
    resource.setrlimit(resource.RLIMIT_NOFILE, (n + 2, n + 2))
    while True:
        try:
            held.append(os.open('/dev/null', os.O_RDONLY))
        except OSError:
            break
else:
    resource.setrlimit(resource.RLIMIT_FSIZE, (ch.inline_max, resource.RLIM_INFINITY))
try:
    ch.send(big, timeout=5)
    print('sent')
except OSError as exc:
    print(type(exc).__name__, exc.errno, exc.strerror)
"""


@pytest.mark.parametrize("how, number, words", [
    ("fds", 24, "out of file descriptors (RLIMIT_NOFILE)"),
    ("fsize", 27, "file size limit (RLIMIT_FSIZE"),
])
def test_a_region_message_that_cannot_be_prepared_names_the_real_cause(owner, how, number,
                                                                       words):
    """Carried note (attack run 4 A): any failure to prepare a region message raised
    OSError(ENOMEM, "cannot prepare a region message: ..."): a process out of descriptors
    (EMFILE) or above its file size limit (EFBIG) was told it was out of memory."""
    import json
    import os
    import subprocess
    import sys
    package = os.path.dirname(os.path.dirname(os.path.abspath(snakepit_shm.__file__)))
    child = subprocess.run([sys.executable, "-c", REGION_FAILURE, package,
                            json.dumps(owner.ref), how],
                           capture_output=True, text=True, timeout=60)
    out = child.stdout.strip()
    assert out.startswith(f"OSError {number} "), out + child.stderr[-2000:]
    assert words in out
    assert "as a region message" in out and "send smaller messages" in out
    assert "out of memory" not in out and "region" not in out.replace("region message", "")


def test_a_message_above_max_message_size_is_emsgsize_naming_the_option(owner):
    """Was OSError(EIO, "channel failure: message larger than max_message_size (code
    -6)"): neither the size, nor the limit, nor what to do."""
    import errno
    with snakepit_shm.Channel.connect(owner.ref, max_message_size=1 << 20) as ch:
        with pytest.raises(OSError) as info:
            ch.send(b"y" * ((1 << 20) + 1), timeout=5)
        assert info.value.errno == errno.EMSGSIZE
        assert "max_message_size (1048576 bytes)" in str(info.value)
        assert "channel failure" not in str(info.value)
        ch.send(b"ok")
        assert ch.recv(timeout=10) == b"ok"
