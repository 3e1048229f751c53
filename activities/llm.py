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
from datetime import UTC, datetime, timedelta

from temporalio import activity
from temporalio.contrib.workflow_streams import WorkflowStreamClient
from temporalio.exceptions import ApplicationError

from llmmixer.activities.contracts import (
    EVENTS_TOPIC,
    LLM_ACTIVITY,
    ErrorType,
    EventType,
    FailureDetails,
    LlmCall,
    LlmReply,
    MixerEvent,
)
from llmmixer.activities.dry_run import dry_run_reply
from llmmixer.activities.pricing import PriceTable
from llmmixer.activities.providers.base import ProviderError, ProviderResult
from llmmixer.activities.providers.breaker import BreakerBoard
from llmmixer.activities.providers.pool import ProviderPool
from llmmixer.activities.providers.settings import ProviderSettings
from llmmixer.activities.redaction import redact
from llmmixer.activities.telemetry import observe_llm_call

_HEARTBEAT_EVERY_S = 1.0
_SLOW_SETUP_S = 0.5
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
        self._pool = pool or ProviderPool(secrets=providers.secrets())
        self._breakers = breakers or BreakerBoard()
        self._prices = prices or PriceTable.load()
        self._settings = settings or LlmSettings()
        self._limits: dict[str, asyncio.Semaphore] = {
            name: asyncio.Semaphore(limit) for name, limit in self._settings.max_concurrent.items()
        }

    async def aclose(self) -> None:
        await self._pool.aclose()

    @activity.defn(name=LLM_ACTIVITY)
    async def call_llm(self, call: LlmCall) -> LlmReply:
        attempt = activity.info().attempt
        # No heartbeat up front: every heartbeat is a server write, and a quick
        # call needs none. Streamed tokens heartbeat (see _Progress), and a
        # slow client build heartbeats once it is done.
        started = time.monotonic()
        forwarder = _DeltaForwarder.open(call, attempt, self._settings)
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
        config = self._providers.config_for(call.provider, call.base_url, call.timeout_s)
        progress = _Progress()

        def on_text(delta: str) -> None:
            progress.add(delta)
            forward(delta)
            if progress.due():
                activity.heartbeat({"chars": progress.chars, "tail": progress.tail()})

        async def attempt() -> ProviderResult:
            built_from = time.monotonic()
            adapter = self._pool.get(config)
            if time.monotonic() - built_from > _SLOW_SETUP_S:
                # Building a client (first use on this worker) took a while;
                # from here on only streamed tokens prove the call is alive.
                activity.heartbeat({"chars": 0})
            limit = self._limits.get(call.provider)
            if limit is None:
                return await adapter.complete(call, on_text)
            # Beyond the worker's per-provider cap a call waits here, it does not fail.
            async with limit:
                return await adapter.complete(call, on_text)

        return await self._breakers.call(call.provider, call.model, attempt)

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


class _DeltaForwarder:
    """Coalesces streamed text into one ``step_delta`` event per interval.

    The workflow's history grows with these batches, not with tokens. The text
    still pending when the call ends goes back in the reply instead of in one
    more signal: a signal there would put an extra workflow task on the
    critical path of every step (measured in bench/: ~5 ms per chained step).
    """

    def __init__(self, call: LlmCall, attempt: int, interval_s: float) -> None:
        self._call = call
        self._attempt = attempt
        self._interval_s = interval_s
        self._pending: list[str] = []
        self._client: WorkflowStreamClient | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def open(cls, call: LlmCall, attempt: int, settings: LlmSettings) -> _DeltaForwarder:
        forwarder = cls(call, attempt, settings.delta_interval_s)
        if settings.stream_deltas and activity.info().workflow_id:
            forwarder._client = WorkflowStreamClient.from_within_activity(
                batch_interval=timedelta(seconds=settings.delta_interval_s)
            )
        return forwarder

    def __call__(self, delta: str) -> None:
        if delta:
            self._pending.append(delta)

    def take_unsent(self) -> str:
        """Text not yet published; the workflow publishes it with the result."""
        text = "".join(self._pending)
        self._pending.clear()
        return text

    async def __aenter__(self) -> Callable[[str], None]:
        if self._client is not None:
            await self._client.__aenter__()
            self._task = asyncio.create_task(self._pump())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is None:
            return
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._flush_pending()
        try:
            await self._client.__aexit__(*exc)
        except Exception:  # watchers are best effort; the step's result is not
            activity.logger.warning("could not deliver the last streamed text to watchers")

    async def _pump(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self._flush_pending()

    def _flush_pending(self) -> None:
        if not self._pending or self._client is None:
            return
        text = "".join(self._pending)
        self._pending.clear()
        self._client.topic(EVENTS_TOPIC, type=MixerEvent).publish(
            MixerEvent(
                type=EventType.STEP_DELTA,
                step=self._call.step_id,
                attempt=self._attempt,
                # Deltas come from the activity, so this is the worker's clock.
                time=datetime.now(UTC),
                data={"text": text},
            ),
            # Sent now, so nothing is left in the client's buffer to flush
            # (as one more signal) when the call ends.
            force_flush=True,
        )
