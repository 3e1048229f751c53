"""``GET /workflows/{id}/events``: a run's events as Server-Sent Events.

``id:`` is the event's offset, ``event:`` its type and ``data:`` the event as
JSON. ``Last-Event-ID: N`` resumes *after* N; ``?from=N`` starts *at* N (as
``MixerHandle.events(from_offset=N)``); the header wins when both are given,
because it is what a reconnecting client sends. The stream ends once the run
has closed and every event was sent. The page reads it with ``fetch`` (which
can send the bearer token) rather than ``EventSource`` (which cannot), and
resumes it with ``Last-Event-ID`` itself.

The answer is FastAPI's ``EventSourceResponse`` (Starlette's streaming
response: it stops the stream as soon as the client disconnects) over bytes in
FastAPI's SSE wire format (``fastapi.sse.format_sse_event``). The route returns
it rather than being one of FastAPI's generator endpoints: measured, that mode
ends the stream *cleanly* when the subscription fails half-way, which a client
takes for the end of the run; returned like this, the failure cuts the
connection and the client resumes with ``Last-Event-ID``. What stays here:

* keepalive comments at ``ServeSettings.keepalive_s``, sent while the *same*
  poll stays pending, so a keepalive never skips an event;
* the subscription is a request-scoped dependency (``routes.open_subscription``),
  so it is closed, and its pending poll cancelled, as soon as the response
  ends or the client leaves, even while no event is due.

Backpressure: the subscription is asked for the next event only after the
previous one was handed to uvicorn, whose ``send`` waits while the socket's
write buffer is full. So a slow reader holds at most one poll page of the
workflow stream (about 1 MB of payload, the library's own cap) plus one
transport buffer (64 KiB), never a queue that grows with the run
(``tests/test_serve.py::test_slow_reader_keeps_server_memory_bounded``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Final

from fastapi import Header, HTTPException, Query
from fastapi.sse import EventSourceResponse, format_sse_event

from llmmixer.core.contracts import MixerEvent

__all__ = [
    "OpenStreams",
    "Subscription",
    "event_response",
    "event_stream",
    "resume_offset",
    "sse_frame",
]

# The browser's EventSource waits this long before reconnecting.
RETRY_MS: Final = 2000


class OpenStreams:
    """How many event streams are open: lets tests see that a disconnect frees one."""

    def __init__(self) -> None:
        self.count = 0


def resume_offset(
    from_offset: Annotated[
        int | None,
        Query(alias="from", ge=0, description="first offset to send (inclusive)"),
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(description="resume after this offset (what a reconnecting client sends)"),
    ] = None,
) -> int:
    """The first offset to send; 400 for a ``Last-Event-ID`` that is not an offset."""
    start = from_offset or 0
    if last_event_id is not None and last_event_id.strip():
        try:
            start = int(last_event_id) + 1
        except ValueError:
            raise HTTPException(
                status_code=400,
                detail=(
                    f"Last-Event-ID {last_event_id!r} is not an event offset: "
                    "send the `id:` of the last event received, or omit it"
                ),
            ) from None
        if start < 0:
            raise HTTPException(status_code=400, detail="Last-Event-ID must be 0 or more")
    return start


class Subscription:
    """One ``MixerHandle.events`` subscription with at most one poll pending."""

    def __init__(self, events: AsyncIterator[MixerEvent]) -> None:
        self._events = events
        self._pending: asyncio.Future[MixerEvent] | None = None

    async def next(self, timeout_s: float) -> MixerEvent | None:
        """The next event, or ``None`` after ``timeout_s``; ``StopAsyncIteration`` at the end."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(anext(self._events))
        done, _ = await asyncio.wait({self._pending}, timeout=timeout_s)
        if not done:
            return None  # the poll stays pending for the next call
        pending, self._pending = self._pending, None
        return pending.result()

    async def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            await asyncio.gather(self._pending, return_exceptions=True)
            self._pending = None
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


def sse_frame(event: MixerEvent) -> bytes:
    # model_dump_json writes no raw newline (they are escaped inside strings),
    # so the JSON is always a single `data:` line.
    return format_sse_event(
        id=str(event.offset), event=event.type.value, data_str=event.model_dump_json()
    )


_KEEPALIVE: Final = format_sse_event(comment="keepalive")


async def event_stream(subscription: Subscription, *, keepalive_s: float) -> AsyncIterator[bytes]:
    """The stream's bytes; it ends when the run's events do, and raises if they fail."""
    yield format_sse_event(retry=RETRY_MS)
    while True:
        try:
            event = await subscription.next(keepalive_s)
        except StopAsyncIteration:
            return
        yield _KEEPALIVE if event is None else sse_frame(event)


def event_response(stream: AsyncIterator[bytes]) -> EventSourceResponse:
    return EventSourceResponse(
        stream,
        # nginx and similar proxies would otherwise hold events back in a buffer
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
