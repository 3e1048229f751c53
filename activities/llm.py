"""The LLM activity: one provider call per execution, streamed and heartbeated.

Held by a ``LlmActivities`` instance that the worker builds once, so SDK
clients, circuit breakers, price table and concurrency limits are per worker
process and shared by every call on it (never module globals). Credentials
are read by the worker only; the workflow sends provider and model names.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from temporalio import activity
from temporalio.exceptions import ApplicationError

from llmmixer.activities.deltas import DeltaForwarder
from llmmixer.activities.dry_run import dry_run_reply
from llmmixer.activities.pricing import PriceTable
from llmmixer.activities.providers.base import ProviderError, ProviderResult
from llmmixer.activities.providers.breaker import BreakerBoard
from llmmixer.activities.providers.options import check_provider_options
from llmmixer.activities.providers.pool import ProviderPool
from llmmixer.activities.providers.settings import ProviderSettings
from llmmixer.activities.telemetry import observe_llm_call
from llmmixer.core.contracts import (
    LLM_ACTIVITY,
    ErrorType,
    FailureDetails,
    LlmCall,
    LlmReply,
)
from llmmixer.core.redaction import redact

_HEARTBEAT_EVERY_S = 1.0
_TAIL_CHARS = 400


@dataclass
class LlmSettings:
    """Worker-side knobs for LLM calls."""

    #: Most concurrent calls per provider on this worker; beyond it calls wait.
    max_concurrent: Mapping[str, int] = field(default_factory=dict)
    #: Forward streamed text to watchers as ``step_delta`` events.
    stream_deltas: bool = True
    #: How often streamed text is sent to the workflow (one signal per batch).
    delta_interval_s: float = 1.0


class LlmActivities:
    def __init__(
        self,
        providers: ProviderSettings,
        *,
        pool: ProviderPool | None = None,
        breakers: BreakerBoard | None = None,
        prices: PriceTable | None = None,
        settings: LlmSettings | None = None,
    ) -> None:
        self._providers = providers
        # `is None`, not `or`: an empty pool is falsy (it has a length).
        self._pool = ProviderPool(secrets=providers.secrets()) if pool is None else pool
        self._breakers = BreakerBoard() if breakers is None else breakers
        self._prices = PriceTable.load() if prices is None else prices
        self._settings = LlmSettings() if settings is None else settings
        self._limits: dict[str, asyncio.Semaphore] = {
            name: asyncio.Semaphore(limit) for name, limit in self._settings.max_concurrent.items()
        }

    def warm_up(self) -> None:
        """Build each provider's default client now, before the worker polls.

        The first use of a provider imports its SDK and builds a TLS context:
        a second or more of work that holds the event loop, so every call on
        the worker then misses its heartbeats together and a short heartbeat
        timeout declares them all lost. A provider without a key is skipped;
        its calls say which variable to set.
        """
        for provider in self._pool.providers():
            try:
                self._pool.get(self._providers.config_for(provider))
            except ProviderError:
                continue

    async def aclose(self) -> None:
        await self._pool.aclose()

    @activity.defn(name=LLM_ACTIVITY)
    async def call_llm(self, call: LlmCall) -> LlmReply:
        attempt = activity.info().attempt
        # No heartbeat up front: every heartbeat is a server write, and a quick
        # call needs none. Until the first token a keep-alive heartbeats (see
        # _call_provider); from then on only streamed tokens do (see _Progress).
        started = time.monotonic()
        # The text still pending when the call ends goes back in the reply
        # (take_unsent) instead of in one more signal: that would put an extra
        # workflow task on the critical path of every step (measured in
        # bench/: ~5 ms per chained step).
        forwarder = DeltaForwarder.open(
            call.step_id,
            attempt,
            enabled=self._settings.stream_deltas,
            interval_s=self._settings.delta_interval_s,
        )
        async with forwarder as forward:
            if call.dry_run:
                text, usage = dry_run_reply(call)
                forward(text)
                return LlmReply(
                    text=text,
                    provider=call.provider,
                    model=call.model,
                    response_model=call.model,
                    usage=usage,
                    cost_usd=0.0,
                    latency_ms=(time.monotonic() - started) * 1000,
                    attempt=attempt,
                    dry_run=True,
                    finish_reason="stop",
                    unsent_text=forwarder.take_unsent(),
                )
            try:
                result = await observe_llm_call(
                    call,
                    lambda: self._call_provider(call, forward),
                    cost=lambda usage: self._prices.cost(call.provider, call.model, usage),
                    secrets=self._providers.secrets(),
                    attempt=attempt,
                )
            except ProviderError as error:
                raise self._application_error(call, error, attempt) from None
            unsent = forwarder.take_unsent()
        usage = result.usage
        return LlmReply(
            text=result.text,
            provider=call.provider,
            model=call.model,
            response_model=result.response_model,
            usage=usage,
            cost_usd=self._prices.cost(call.provider, call.model, usage),
            latency_ms=(time.monotonic() - started) * 1000,
            attempt=attempt,
            finish_reason=result.finish_reason,
            unsent_text=unsent,
        )

    async def _call_provider(self, call: LlmCall, forward: Callable[[str], None]) -> ProviderResult:
        # The trust boundary for calls from any spec or plan, however started:
        # options that could move the request and step endpoints the operator
        # did not list fail here, before a client is built or a breaker counts.
        check_provider_options(call.provider, call.provider_options, call.model)
        config = self._providers.config_for(call.provider, call.base_url, call.timeout_s)
        progress = _Progress()

        def on_text(delta: str) -> None:
            progress.add(delta)
            forward(delta)
            if progress.due():
                activity.heartbeat({"chars": progress.chars, "tail": progress.tail()})

        async def attempt() -> ProviderResult:
            adapter = self._pool.get(config)
            limit = self._limits.get(call.provider)
            if limit is None:
                return await adapter.complete(call, on_text)
            # Beyond the worker's per-provider cap a call waits here, it does not fail.
            async with limit:
                return await adapter.complete(call, on_text)

        keep_alive = asyncio.create_task(_keep_alive_until_first_token(progress))
        try:
            return await self._breakers.call(call.provider, call.model, attempt)
        finally:
            keep_alive.cancel()
            await asyncio.gather(keep_alive, return_exceptions=True)

    def _application_error(
        self, call: LlmCall, error: ProviderError, attempt: int
    ) -> ApplicationError:
        message = redact(
            f"{call.provider}/{call.model}: {error.message}", self._providers.secrets()
        )
        non_retryable = not error.retryable
        if error.error_type == ErrorType.CIRCUIT_OPEN and call.has_fallback:
            # The workflow moves on to the next provider at once instead of
            # waiting out the cool-down on this one.
            non_retryable = True
        return ApplicationError(
            message,
            FailureDetails(
                attempt=attempt,
                provider=call.provider,
                model=call.model,
                status_code=error.status_code,
            ).model_dump(),
            type=error.error_type,
            non_retryable=non_retryable,
            next_retry_delay=(
                timedelta(seconds=error.retry_after_s) if error.retry_after_s else None
            ),
        )


async def _keep_alive_until_first_token(progress: _Progress) -> None:
    """Heartbeat while a call has not streamed anything yet.

    Silence before the first token is normal: a reasoning model thinks for a
    minute, a client is built on first use, a call waits for a concurrency
    slot. Without this, any of them longer than the heartbeat timeout would
    have Temporal declare a healthy call lost and run it again. Once text
    flows, only text heartbeats, so a stream that stalls mid-way is noticed by
    the heartbeat timeout; a stall before the first token ends at the call's
    ``timeout_s``, which the SDK enforces.
    """
    timeout = activity.info().heartbeat_timeout
    if not timeout:
        return
    # A quarter of the timeout: a call answered sooner costs no heartbeat at
    # all, and a beat delayed by a busy event loop still lands in time.
    every_s = timeout.total_seconds() / 4
    while True:
        await asyncio.sleep(every_s)
        if progress.chars:
            return
        activity.heartbeat({"chars": 0, "waiting_for": "first token"})


class _Progress:
    def __init__(self) -> None:
        self.chars = 0
        self._tail = ""
        # The first heartbeat is due a second into the stream, not at once.
        self._last = time.monotonic()

    def add(self, delta: str) -> None:
        self.chars += len(delta)
        self._tail = (self._tail + delta)[-_TAIL_CHARS:]

    def tail(self) -> str:
        return self._tail

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last >= _HEARTBEAT_EVERY_S:
            self._last = now
            return True
        return False
