"""asyncio API of the message channel::

    import snakepit_shm.aio

    async def main(ref):
        async with await snakepit_shm.aio.connect(ref) as ch:
            msg = await ch.recv()
            await ch.send(msg)

Waiting uses ``loop.add_reader`` on the channel's descriptor: no thread, no polling.
The handshake runs in the default executor so it never blocks the loop.
"""

import asyncio
import functools
import os
import time

from .channel import Channel, WouldBlock, _deadline

__all__ = ["connect", "AsyncChannel"]


async def connect(ref, **options):
    """Connect to a channel (see :meth:`snakepit_shm.Channel.connect`) without blocking."""
    loop = asyncio.get_running_loop()
    ch = await loop.run_in_executor(None, functools.partial(Channel.connect, ref, **options))
    return AsyncChannel(ch)


class AsyncChannel:
    """A :class:`snakepit_shm.Channel` with awaitable ``send`` and ``recv``."""

    def __init__(self, channel):
        """Wrap a connected :class:`Channel`."""
        self.channel = channel
        # Every task sleeping on the channel (a sender waiting for space and a receiver
        # task, say) shares one add_reader registration: asyncio keeps a single reader
        # callback per descriptor, so a second add_reader would replace the first
        # waiter's callback and that waiter would never be woken.
        self._waiters = set()
        self._reader_fd = None

    def _events(self):
        """Take the channel's events and wake every waiting task: taking them withdraws
        every "about to sleep" announcement of the channel, the other tasks' too, so each
        of them must look again and announce again before it sleeps (a task left asleep
        unannounced is never rung: a send waiting for space beside a waiting recv hung)."""
        self.channel._handle_events()
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)

    async def _wait(self, want_data, want_space, need, deadline):
        ch = self.channel
        if not ch._prepare_wait(want_data, want_space, need):
            self._events()  # ready now (or closed): the caller looks again
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self._waiters:
            self._reader_fd = ch.fileno()
            loop.add_reader(self._reader_fd, self._events)
        self._waiters.add(fut)
        try:
            if deadline is None:
                await fut
            else:
                left = max(0.0, deadline - time.monotonic())
                try:
                    await asyncio.wait_for(fut, left)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._waiters.discard(fut)
            if not self._waiters:
                loop.remove_reader(self._reader_fd)
                self._reader_fd = None

    async def recv(self, timeout=None):
        """Receive one message (``bytes`` or a zero-copy ``memoryview``)."""
        deadline = _deadline(timeout)
        while True:
            self.channel._check_open()
            msg = self.channel._try_recv()
            if msg is not None:
                return msg
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("no message on the channel within the timeout")
            await self._wait(True, False, 0, deadline)

    async def send(self, data, timeout=None):
        """Send one message, waiting (without blocking the loop) while the ring is full."""
        deadline = _deadline(timeout)
        size = memoryview(data).nbytes  # bytes, not elements (array('i'), numpy)
        if size > self.channel.inline_max:
            await self._send_region(data, deadline)
            return
        while True:
            try:
                self.channel.send(data, timeout=0)
                return
            except WouldBlock:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                size = memoryview(data).nbytes  # bytes, not elements (array('i'), numpy)
                await self._wait(False, True,
                                 16 if size > self.channel.inline_max else size, deadline)

    async def _send_region(self, data, deadline):
        # A region message is copied into its memfd once: a retry after a full ring
        # sends the same memfd again (each attempt used to copy the whole message).
        ch = self.channel
        ch._check_open()
        fd, length = ch._prepare_region(data)
        try:
            while not ch._try_send_region(fd, length):
                if deadline is not None and time.monotonic() >= deadline:
                    raise WouldBlock("the channel's ring is full: the Elixir side does not "
                                     "read fast enough")
                await self._wait(False, True, 16, deadline)
            fd = -1
        finally:
            if fd >= 0:
                os.close(fd)

    def fileno(self):
        """The channel's wait descriptor."""
        return self.channel.fileno()

    def stats(self):
        """Counters of this end."""
        return self.channel.stats()

    def close(self):
        """Close the channel."""
        self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()
