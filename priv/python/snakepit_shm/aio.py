"""asyncio API of the message channel::

    import snakepit_shm.aio

    async def main(ref):
        async with await snakepit_shm.aio.connect(ref) as ch:
            msg = await ch.recv()
            await ch.send(msg)

Waiting uses ``loop.add_reader`` on the channel's descriptor: no thread, no polling.
The handshake runs in the default executor so it never blocks the loop; cancelling it
leaves no connection behind (see :func:`connect`).
"""

import asyncio
import os
import threading
import time

from .channel import Channel, WouldBlock, _deadline

__all__ = ["connect", "AsyncChannel"]


async def connect(ref, **options):
    """Connect to a channel (see :meth:`snakepit_shm.Channel.connect`) without blocking.

    Cancellation (a cancelled task, ``asyncio.wait_for``'s timeout) propagates at once
    (``CancelledError``, ``TimeoutError``) and never leaves a connection behind in this
    process or in the owner. The handshake, which runs in an executor thread, is told to
    stop: if the owner had not accepted the connection yet, nothing is sent to it (or its
    socket is shut down first, so that it can no longer accept it: it drops it and keeps
    listening) and the channel still waits for its worker: the next connect succeeds. A
    channel takes one worker for life, so if the owner had already accepted it (its
    welcome had come, or the handshake had completed when the cancellation arrived), the
    connection is closed at once: the owner sees ``:peer_closed``, and a later connect of
    this process to the same ref raises ``PermissionError`` saying that a cancelled connect
    took the channel. No descriptor stays open either way (the executor thread closes
    what it opened as soon as it returns, which the cancellation makes it do at once).
    """
    loop = asyncio.get_running_loop()
    attempt = _Attempt(ref, options)
    try:
        fut = loop.run_in_executor(None, attempt.run)
        # shielded: the thread always runs, and always cleans up after itself
        ch = await asyncio.shield(fut)
        attempt.take()
        return AsyncChannel(ch)
    finally:
        attempt.leave()


class _Attempt:
    """One connect in an executor thread, which the waiting coroutine may leave (cancelled)
    at any time: whatever the thread made after that is closed, by whichever of the two
    comes last."""

    def __init__(self, ref, options):
        self._ref = ref
        self._options = options
        self._lock = threading.Lock()
        self._left = False      # the coroutine no longer waits for the result
        self._taken = False     # the coroutine got the channel
        self._channel = None    # connected by the thread, not taken (yet)
        # The read end is the thread's to close (it runs whatever happens: the future is
        # shielded); the coroutine closes the write end when it stops waiting, which
        # makes the read end readable: the library then stops the handshake.
        self._r, self._w = os.pipe2(os.O_CLOEXEC)

    def run(self):
        """The executor thread's part: connects unless given up (closing self._w makes
        self._r readable: the library stops the handshake)."""
        try:
            try:
                ch = Channel.connect(self._ref, _cancel_fd=self._r, **self._options)
            finally:
                os.close(self._r)
        except BaseException:
            with self._lock:
                if self._left:
                    return None  # nobody waits for this error
            raise
        with self._lock:
            if not self._left:
                self._channel = ch
                return ch
        ch._abandon()  # connected after the coroutine left: the owner sees peer_closed
        return None

    def take(self):
        with self._lock:
            self._taken = True
            self._channel = None

    def leave(self):
        """The coroutine stops waiting (returned, raised or cancelled): tells the thread,
        and closes a channel it connected that the coroutine did not take."""
        with self._lock:
            self._left = True
            ch = None if self._taken else self._channel
            self._channel = None
        if self._w >= 0:
            w, self._w = self._w, -1
            os.close(w)  # the read end turns readable (hang-up): the handshake stops
        if ch is not None:
            ch._abandon()


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
        """Receive one message (``bytes`` or a read-only ``memoryview``, see
        :meth:`Channel.recv`)."""
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
