"""Hedged calls, the worker's side: first-token latencies, and reporting a first token.

A hedge with a learned delay (``hedge: {after: p95}``) needs to know how
long a model usually takes to start answering. Every LLM call on this
worker tells ``FirstTokenLatencies`` when its first token came; the
``HEDGE_DELAY_ACTIVITY`` reads the percentile from there, and since its
result is in the run's history, a replay uses the same delay whatever the
worker has seen since. The latencies are this worker process's, kept in
memory for its lifetime (a new worker starts from the hedge's ``default_s``).

``FirstTokenWatch`` is what the LLM activity wraps its streamed text with:
it records the latency, and for a hedged call sends the call's
``first_token_signal`` to the workflow, so a reply that is already
streaming is never hedged.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable

from temporalio import activity

from llmmixer.activities.pricing import PriceTable
from llmmixer.core.contracts import (
    HEDGE_COST_ACTIVITY,
    HEDGE_DELAY_ACTIVITY,
    HedgeCost,
    HedgeCostRequest,
    HedgeDelay,
    HedgeDelayRequest,
    LlmCall,
)

__all__ = ["FirstTokenLatencies", "FirstTokenWatch", "HedgingActivities"]

# How many recent first tokens of one model a worker remembers: enough for a
# p99 to mean something, few enough that a provider's bad hour ages out.
WINDOW = 500
_PERCENTILES = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99}


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

    def delay(self, request: HedgeDelayRequest) -> HedgeDelay:
        """What ``hedge: {after: pNN}`` means for the model now."""
        samples = self.count(request.provider, request.model)
        if samples < request.min_samples:
            return HedgeDelay(delay_s=request.default_s, samples=samples, learned=False)
        value = self.percentile(request.provider, request.model, _PERCENTILES[request.percentile])
        assert value is not None
        return HedgeDelay(delay_s=max(request.min_s, value), samples=samples, learned=True)


class FirstTokenWatch:
    """Wraps an LLM activity's text callback: notes when the first token arrives.

    Use ``watch.wrap(forward)`` as the callback and ``await watch.aclose()``
    when the call ends. The signal is best effort: if it is lost, the
    workflow merely starts a hedge it did not need.
    """

    def __init__(self, call: LlmCall, latencies: FirstTokenLatencies | None) -> None:
        self._call = call
        self._latencies = latencies
        self._started = time.monotonic()
        self._seen = False
        self._signal: asyncio.Task[None] | None = None

    def wrap(self, forward: Callable[[str], None]) -> Callable[[str], None]:
        def on_text(text: str) -> None:
            if text and not self._seen:
                self._first_token()
            forward(text)

        return on_text

    def _first_token(self) -> None:
        self._seen = True
        if self._latencies is not None:
            self._latencies.observe(
                self._call.provider, self._call.model, time.monotonic() - self._started
            )
        name = self._call.first_token_signal
        if name is not None:
            self._signal = asyncio.create_task(_send_signal(name))

    async def aclose(self) -> None:
        """Let the signal go out; it is not worth holding up the reply for."""
        if self._signal is not None and not self._signal.done():
            try:
                async with asyncio.timeout(2.0):
                    await asyncio.shield(self._signal)
            except (TimeoutError, asyncio.CancelledError):
                self._signal.cancel()


async def _send_signal(name: str) -> None:
    info = activity.info()
    try:
        handle = activity.client().get_workflow_handle(
            info.workflow_id, run_id=info.workflow_run_id
        )
        await handle.signal(name)
    except Exception:  # the workflow may have moved on (the hedge won); nothing to do
        activity.logger.info("first-token signal %s not delivered", name)


class HedgingActivities:
    """The hedge activities, sharing the worker's latencies and price table."""

    def __init__(self, latencies: FirstTokenLatencies, prices: PriceTable) -> None:
        self.latencies = latencies
        self._prices = prices

    @activity.defn(name=HEDGE_DELAY_ACTIVITY)
    async def hedge_delay(self, request: HedgeDelayRequest) -> HedgeDelay:
        return self.latencies.delay(request)

    @activity.defn(name=HEDGE_COST_ACTIVITY)
    async def hedge_cost(self, request: HedgeCostRequest) -> HedgeCost:
        return HedgeCost(cost_usd=self._prices.cost(request.provider, request.model, request.usage))
