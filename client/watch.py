"""Following a run's event stream across dropped connections.

``resumable_events`` wraps ``MixerHandle.events``: it remembers the offset of
the last event it yielded and, when the connection to Temporal drops (an RPC
error that says "try again"), subscribes again from that offset plus one, so
a watcher sees every event exactly once however often the link breaks.

``EventPump`` runs that stream in a task and hands the reader whatever has
arrived as one batch, with a timeout, so a view can refresh its progress once
per burst of events instead of polling.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TypeVar

from temporalio.client import WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.service import RPCError, RPCStatusCode

from llmmixer.client.mixer import MixerHandle
from llmmixer.core.contracts import MixerEvent

T = TypeVar("T")

#: RPC outcomes that mean "the link or the server hiccuped", not "this is wrong".
_TRANSIENT = {
    RPCStatusCode.UNAVAILABLE,
    RPCStatusCode.DEADLINE_EXCEEDED,
    RPCStatusCode.CANCELLED,
    RPCStatusCode.RESOURCE_EXHAUSTED,
    RPCStatusCode.ABORTED,
    RPCStatusCode.UNKNOWN,
    RPCStatusCode.INTERNAL,
}

#: Give up after this long without one successful call (the error is raised).
GIVE_UP_AFTER_S = 120.0
_FIRST_DELAY_S = 0.25
_MAX_DELAY_S = 5.0


def is_disconnect(error: BaseException) -> bool:
    """True for errors a reconnect can cure (a dropped link, a restarting server)."""
    if isinstance(error, WorkflowUpdateRPCTimeoutOrCancelledError | ConnectionError):
        return True
    return isinstance(error, RPCError) and error.status in _TRANSIENT


#: Told of each reconnect: the error, the delay before it, and its number in this outage.
OnRetry = Callable[[BaseException, float, int], None]


class _Backoff:
    """Delays between reconnects; raises once ``give_up_s`` passed without success."""

    def __init__(self, give_up_s: float) -> None:
        self.give_up_s = give_up_s
        self._failing_since: float | None = None
        self._delay = _FIRST_DELAY_S
        self._attempt = 0

    def succeeded(self) -> None:
        self._failing_since = None
        self._delay = _FIRST_DELAY_S
        self._attempt = 0

    async def wait(self, error: BaseException, on_retry: OnRetry | None) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._failing_since >= self.give_up_s:
            raise error
        self._attempt += 1
        if on_retry is not None:
            on_retry(error, self._delay, self._attempt)
        await asyncio.sleep(self._delay)
        self._delay = min(self._delay * 2, _MAX_DELAY_S)


async def retrying(
    call: Callable[[], Awaitable[T]],
    *,
    on_retry: OnRetry | None = None,
    give_up_s: float = GIVE_UP_AFTER_S,
) -> T:
    """``await call()``, again after a disconnect, until it answers or ``give_up_s`` passed."""
    backoff = _Backoff(give_up_s)
    while True:
        try:
            return await call()
        except Exception as error:
            if not is_disconnect(error):
                raise
            await backoff.wait(error, on_retry)


async def resumable_events(
    handle: MixerHandle,
    from_offset: int = 0,
    *,
    on_retry: OnRetry | None = None,
    give_up_s: float = GIVE_UP_AFTER_S,
) -> AsyncGenerator[MixerEvent, None]:
    """``handle.events(from_offset)`` that survives dropped connections.

    Ends when the run has closed and every event was read, like the stream
    it wraps; each event is yielded once, in offset order.
    """
    next_offset = from_offset
    backoff = _Backoff(give_up_s)
    while True:
        stream = handle.events(next_offset)
        try:
            async for event in stream:
                backoff.succeeded()
                if event.offset < next_offset:
                    continue  # never hand on an event twice, whatever the server replays
                next_offset = event.offset + 1
                yield event
            return
        except Exception as error:
            if not is_disconnect(error):
                raise
            await backoff.wait(error, on_retry)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()


class EventPump:
    """Reads ``resumable_events`` in a task; ``batch`` returns what has arrived.

    Use as ``async with EventPump(...) as pump``; leaving stops the reader.
    """

    def __init__(
        self,
        handle: MixerHandle,
        from_offset: int = 0,
        *,
        on_retry: OnRetry | None = None,
        give_up_s: float = GIVE_UP_AFTER_S,
    ) -> None:
        self._events = resumable_events(handle, from_offset, on_retry=on_retry, give_up_s=give_up_s)
        self._queue: asyncio.Queue[MixerEvent | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.ended = False
        #: The offset of the last event handed out; resume from ``last_offset + 1``.
        self.last_offset = from_offset - 1

    async def __aenter__(self) -> EventPump:
        self._task = asyncio.create_task(self._read(), name="llmmixer-event-pump")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        await self._events.aclose()

    async def _read(self) -> None:
        try:
            async for event in self._events:
                self._queue.put_nowait(event)
        finally:
            self._queue.put_nowait(None)

    async def batch(self, timeout_s: float | None) -> list[MixerEvent]:
        """Every event that has arrived, waiting up to ``timeout_s`` for the first.

        An empty list after the timeout; ``ended`` is set once the stream is
        over (the reader's error, if it failed, is raised here).
        """
        events: list[MixerEvent] = []
        if self.ended:
            if self._task is not None:
                await self._task  # raises the reader's error, once its events were read
            return events
        try:
            first = await asyncio.wait_for(self._queue.get(), timeout_s)
        except TimeoutError:
            return events
        pending: list[MixerEvent | None] = [first]
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for item in pending:
            if item is None:
                self.ended = True
                break
            events.append(item)
            self.last_offset = item.offset
        if self.ended and not events and self._task is not None:
            await self._task
        return events
