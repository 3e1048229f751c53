"""Text a running step produces, sent to the run's watchers as ``step_delta`` events.

Both streaming activities use one ``DeltaForwarder``: the LLM activity for
a model's tokens, the command activity for a command's output. Each hands
it text that is already redacted (the providers' and the runner's business);
the forwarder coalesces it into one batch per ``interval_s`` and publishes
the batch on the run's event topic through the workflow stream client, whose
sequence numbers make a resent batch count once. The workflow's history grows
with these batches, not with tokens or reads.

The stream client is built when there is a first batch to send, so a step
that ends within one interval (most model calls) costs no client at all, and
the pump task is started only once an interval has passed. The stream client
is driven by our own pump through ``flush()``; its context manager is not
entered. Its background flusher waits with
``asyncio.wait_for``, and on Python 3.11 cancelling that flusher just as a
flush is requested loses the cancellation, so the activity would hang on
exit until Temporal's heartbeat timeout ended the attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

from temporalio import activity
from temporalio.contrib.workflow_streams import WorkflowStreamClient

from llmmixer.core.contracts import EVENTS_TOPIC, EventType, MixerEvent

__all__ = ["DeltaForwarder"]

# The last batch must not hold up the step's result for long.
_LAST_FLUSH_S = 10.0
# How far past the batch size a cut may move to start at a line.
_LINE_SEARCH_CHARS = 200


class DeltaForwarder:
    """Coalesces a step's streamed text into one ``step_delta`` event per interval.

    Use as ``async with DeltaForwarder.open(...) as forward:`` and call
    ``forward(text)`` for every piece; it never blocks and never raises.
    ``streams`` builds the stream client when a first batch is due; without
    it (streaming off, or no workflow) nothing is published.

    ``max_batch_chars``: most text one batch carries. A batch over it keeps
    its latest lines after a marker saying how much was left out (a chatty
    command would otherwise write its whole output into history; the step's
    result keeps all of it). None: every piece is sent.

    ``silent_if_quick``: a step that ends before the first interval publishes
    nothing (its text is in its result, and a signal would put one more
    workflow task in front of the next step). Otherwise what is pending at
    the end is published then, so a watcher who saw the step start also sees
    how it ended, after a failure too; a caller that returns the rest with
    its result takes it first with ``take_unsent()``.
    """

    def __init__(
        self,
        streams: Callable[[], WorkflowStreamClient] | None,
        step_id: str,
        attempt: int,
        interval_s: float,
        *,
        max_batch_chars: int | None = None,
        silent_if_quick: bool = False,
    ) -> None:
        self._streams = streams
        self._client: WorkflowStreamClient | None = None
        self._step_id = step_id
        self._attempt = attempt
        self._interval_s = interval_s
        self._max_batch_chars = max_batch_chars
        self._silent_if_quick = silent_if_quick
        self._pending: list[str] = []
        self._pending_chars = 0
        self._left_out = 0
        self._ran_an_interval = False
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def open(
        cls,
        step_id: str,
        attempt: int,
        *,
        enabled: bool,
        interval_s: float,
        max_batch_chars: int | None = None,
        silent_if_quick: bool = False,
    ) -> DeltaForwarder:
        """A forwarder for the current activity; inert unless ``enabled`` in a workflow."""
        streams: Callable[[], WorkflowStreamClient] | None = None
        workflow_id = activity.info().workflow_id if enabled else None
        if workflow_id:
            # The Temporal client is taken now: its absence fails the step at
            # once, as building the stream client here used to.
            temporal, parent = activity.client(), workflow_id

            def build() -> WorkflowStreamClient:
                return WorkflowStreamClient.create(temporal, parent)

            streams = build

        return cls(
            streams,
            step_id,
            attempt,
            interval_s,
            max_batch_chars=max_batch_chars,
            silent_if_quick=silent_if_quick,
        )

    def __call__(self, text: str) -> None:
        # Kept without a client too: ``take_unsent()`` then returns the text.
        if not text:
            return
        self._pending.append(text)
        self._pending_chars += len(text)
        # Trim in batches so a flood of small chunks stays linear.
        if self._max_batch_chars is not None and self._pending_chars > 2 * self._max_batch_chars:
            self._trim()

    def take_unsent(self) -> str:
        """Text not yet published; the caller sends it on with its result."""
        text = "".join(self._pending)
        self._pending, self._pending_chars = [], 0
        return text

    def _trim(self) -> None:
        text = "".join(self._pending)
        limit = self._max_batch_chars
        if limit is not None and len(text) > limit:
            cut = len(text) - limit
            # Start at a line when one begins close by: a watcher shows lines.
            newline = text.find("\n", cut - 1, cut + _LINE_SEARCH_CHARS)
            if newline >= 0:
                cut = newline + 1
            self._left_out += cut
            text = text[cut:]
        self._pending = [text] if text else []
        self._pending_chars = len(text)

    async def __aenter__(self) -> DeltaForwarder:
        if self._streams is not None:
            # A timer, not a task sleeping out the first interval: most calls
            # end before it and then cost one cancelled timer.
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._interval_s, self._start_pump)
        return self

    def _start_pump(self) -> None:
        self._timer = None
        self._ran_an_interval = True
        self._task = asyncio.create_task(self._pump(), name=f"deltas-{self._step_id}")

    async def __aexit__(self, *exc: object) -> None:
        if self._streams is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._silent_if_quick and not self._ran_an_interval:
            return
        # A batch whose signal the cancelled pump left unconfirmed is resent
        # with its sequence number, so the workflow keeps it once.
        self._publish_pending()
        if self._client is None:
            return  # nothing was ever published
        try:
            async with asyncio.timeout(_LAST_FLUSH_S):
                await self._client.flush()
        except Exception:  # watchers are best effort; the step's result is not
            activity.logger.warning("could not deliver a step's last streamed text to watchers")

    async def _pump(self) -> None:
        while True:
            self._publish_pending()
            if self._client is not None:
                try:
                    await self._client.flush()
                except Exception:  # kept by the client and sent again on the next flush
                    activity.logger.warning(
                        "streamed text not yet delivered to watchers; will resend"
                    )
            await asyncio.sleep(self._interval_s)

    def _publish_pending(self) -> None:
        if self._streams is None or not self._pending:
            return
        if self._client is None:
            # One client for the whole attempt: its publisher id and sequence
            # numbers are what make a resent batch count once.
            self._client = self._streams()
        if self._max_batch_chars is not None:
            self._trim()
        text = "".join(self._pending)
        if self._left_out:
            text = f"[... {self._left_out} characters not streamed ...]\n{text}"
        self._pending, self._pending_chars, self._left_out = [], 0, 0
        self._client.topic(EVENTS_TOPIC, type=MixerEvent).publish(
            MixerEvent(
                type=EventType.STEP_DELTA,
                step=self._step_id,
                attempt=self._attempt,
                # Deltas come from the activity, so this is the worker's clock.
                time=datetime.now(UTC),
                data={"text": text},
            )
        )
