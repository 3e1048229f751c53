"""Hedged calls, the worker's side: first-token latencies, and asking for a hedge.

The LLM activity wraps its streamed text with a ``FirstTokenWatch``. Every
call tells the worker's ``FirstTokenLatencies`` when its first token came.
A hedged call (``LlmCall.hedge``) also keeps a timer: when its delay is up
and no token has come, it signals the workflow (``HedgeStart``, saying how
the delay was found), which then starts the second call. When further
hedges may follow, a call that asked signals again if its first token
comes after all (``HedgeStart.streaming``): no more hedges beside it. A call whose first
token comes in time sends nothing, so a fast call costs the run no extra
history at all; and since the signal (with the delay) is in the run's
history, a replay decides as the run did, whatever the worker saw since.

``hedge: {after: p95}`` is read here, from the latencies of the worker that
runs the call: this worker process's latest calls of the model, kept in
memory for its lifetime (a new worker starts from the hedge's ``default_s``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable

from temporalio import activity

from llmmixer.activities.pricing import PriceTable
from llmmixer.core.contracts import (
    HEDGE_COST_ACTIVITY,
    HedgeCost,
    HedgeCostRequest,
    HedgeStart,
    HedgeTrigger,
    LlmCall,
)

__all__ = ["FirstTokenLatencies", "FirstTokenWatch", "HedgingActivities"]

# How many recent first tokens of one model a worker remembers: enough for a
# p99 to mean something, few enough that a provider's bad hour ages out.
WINDOW = 500
_PERCENTILES = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99}

SendSignal = Callable[[str, HedgeStart], Awaitable[None]]


class FirstTokenLatencies:
    """The latest ``size`` first-token latencies (seconds) per provider and model."""

    def __init__(self, size: int = WINDOW) -> None:
        self._size = size
        self._seen: dict[tuple[str, str], deque[float]] = {}

    def observe(self, provider: str, model: str, seconds: float) -> None:
        window = self._seen.get((provider, model))
        if window is None:
            window = self._seen[(provider, model)] = deque(maxlen=self._size)
        window.append(seconds)

    def count(self, provider: str, model: str) -> int:
        return len(self._seen.get((provider, model), ()))

    def percentile(self, provider: str, model: str, q: float) -> float | None:
        """The ``q`` quantile (0..1, nearest rank) of the window; None when it is empty."""
        window = self._seen.get((provider, model))
        if not window:
            return None
        ordered = sorted(window)
        rank = max(1, math.ceil(q * len(ordered)))
        return ordered[rank - 1]

    def delay(self, provider: str, model: str, trigger: HedgeTrigger) -> HedgeStart:
        """How long a call to ``provider``/``model`` may go without a token before a hedge."""
        if trigger.after is None:
            assert trigger.after_s is not None
            return HedgeStart(delay_s=trigger.after_s)
        samples = self.count(provider, model)
        if samples < trigger.min_samples:
            return HedgeStart(delay_s=trigger.default_s, after=trigger.after, samples=samples)
        value = self.percentile(provider, model, _PERCENTILES[trigger.after])
        assert value is not None
        return HedgeStart(
            delay_s=max(trigger.min_s, value), after=trigger.after, samples=samples, learned=True
        )


class FirstTokenWatch:
    """Watches one LLM call's streamed text for its first token.

    Use ``watch.wrap(forward)`` as the text callback, ``watch.start()`` when
    the call starts and ``await watch.aclose()`` when it ends. The hedge
    signal is best effort: if it is lost, the call merely runs unhedged.
    """

    def __init__(
        self,
        call: LlmCall,
        latencies: FirstTokenLatencies | None,
        send: SendSignal | None = None,
    ) -> None:
        self._call = call
        self._latencies = latencies
        self._send = send or _send_signal
        self._started = time.monotonic()
        self._first = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._overdue: HedgeStart | None = None
        self._told: asyncio.Future[None] | None = None

    def start(self) -> None:
        """The call starts now: a hedged one arms its timer."""
        self._started = time.monotonic()
        trigger = self._call.hedge
        if trigger is None:
            return
        latencies = self._latencies or FirstTokenLatencies()
        start = latencies.delay(self._call.provider, self._call.model, trigger)
        self._timer = asyncio.create_task(self._hedge_after(trigger.signal, start))

    def wrap(self, forward: Callable[[str], None]) -> Callable[[str], None]:
        def on_text(text: str) -> None:
            if text and not self._first.is_set():
                self._first.set()
                if self._latencies is not None:
                    self._latencies.observe(
                        self._call.provider, self._call.model, time.monotonic() - self._started
                    )
                trigger = self._call.hedge
                if self._overdue is not None and trigger and trigger.report_first_token:
                    # Late, but streaming now: the workflow should not start a
                    # further hedge beside it. Best effort, like the ask.
                    told = self._overdue.model_copy(update={"streaming": True})
                    self._told = asyncio.ensure_future(self._send(trigger.signal, told))
            forward(text)

        return on_text

    async def _hedge_after(self, signal: str, start: HedgeStart) -> None:
        try:
            await asyncio.wait_for(self._first.wait(), start.delay_s)
        except TimeoutError:
            self._overdue = start
            await self._send(signal, start)

    async def aclose(self) -> None:
        """The call ended (answered, failed or cancelled): it needs no second call now."""
        if self._overdue is not None and not self._first.is_set() and self._latencies is not None:
            # A slow call that never streamed (cancelled when its hedge won)
            # counts with the time it waited: at least that slow. Without it
            # the tail would vanish from the window and the learned delay
            # shrink towards the fast calls.
            self._latencies.observe(
                self._call.provider, self._call.model, time.monotonic() - self._started
            )
        # The call has ended, which the workflow sees itself: a word still
        # on its way about its first token is moot.
        for task in (self._timer, self._told):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


async def _send_signal(name: str, start: HedgeStart) -> None:
    info = activity.info()
    if info.workflow_id is None:  # a standalone activity has no run to ask
        return
    try:
        handle = activity.client().get_workflow_handle(
            info.workflow_id, run_id=info.workflow_run_id
        )
        await handle.signal(name, start)
    except Exception:  # the run may have moved on; it then needs no second call
        activity.logger.info("hedge signal %s not delivered", name)


class HedgingActivities:
    """The hedge's activity, with the worker's price table."""

    def __init__(self, prices: PriceTable) -> None:
        self._prices = prices

    @activity.defn(name=HEDGE_COST_ACTIVITY)
    async def hedge_cost(self, request: HedgeCostRequest) -> HedgeCost:
        return HedgeCost(cost_usd=self._prices.cost(request.provider, request.model, request.usage))
