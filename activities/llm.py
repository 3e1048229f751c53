"""The LLM activity: one provider call per execution, streamed and heartbeated.

A reply cut off by its token limit never passes as complete: the call's
``on_truncation`` decides, here in the activity, so a workflow's history
holds one activity per step whichever way it goes. ``continue`` asks the
model to go on (the parts so far as its own turn, then a request to carry
on) and joins the parts, up to ``max_continuations`` times; ``fail`` fails
the attempt as ``ProviderTruncated`` (retryable); ``accept`` keeps it and
the reply says ``truncated``.

Held by a ``LlmActivities`` instance that the worker builds once, so SDK
clients, circuit breakers, price table and concurrency limits are per worker
process and shared by every call on it (never module globals). Credentials
are read by the worker only; the workflow sends provider and model names.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from temporalio import activity
from temporalio.exceptions import ApplicationError

from llmmixer.activities.attachments import AttachmentError, load_attachments
from llmmixer.activities.deltas import DeltaForwarder
from llmmixer.activities.dry_run import dry_run_reply
from llmmixer.activities.hedging import FirstTokenLatencies, FirstTokenWatch
from llmmixer.activities.pricing import PriceTable
from llmmixer.activities.providers.base import ProviderError, ProviderResult
from llmmixer.activities.providers.breaker import BreakerBoard
from llmmixer.activities.providers.options import OptionsCheck
from llmmixer.activities.providers.pool import ProviderPool
from llmmixer.activities.providers.ratelimit import (
    DEFAULT_OUTPUT_RESERVE,
    RateKey,
    RateLimiter,
    RateLimitWait,
    estimate_input_tokens,
)
from llmmixer.activities.providers.settings import ProviderSettings
from llmmixer.activities.providers.structured import enforce_response_format, stable_prefix
from llmmixer.activities.telemetry import capture_content, observe_llm_call
from llmmixer.core.contracts import (
    LLM_ACTIVITY,
    ChatMessage,
    ErrorType,
    FailureDetails,
    LlmCall,
    LlmReply,
)
from llmmixer.core.redaction import redact

_HEARTBEAT_EVERY_S = 1.0
_TAIL_CHARS = 400
# The turn that asks a cut-off model to go on; the parts are joined as they are.
CONTINUE_PROMPT = (
    "Your reply was cut off by the output token limit. Continue exactly where it "
    "stopped: do not repeat anything, do not add a preface."
)
# How far a retry after a cut-off JSON reply may raise the step's max_tokens.
_MAX_TOKENS_GROWTH = 4
# How long a call waits for a sibling that is writing the same prompt prefix
# to the provider's cache before it gives up waiting and sends anyway.
_CACHE_WARM_WAIT_S = 30.0


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
        rate_limiter: RateLimiter | None = None,
        latencies: FirstTokenLatencies | None = None,
    ) -> None:
        self._providers = providers
        # First-token latencies per model, which hedges learn their delay from.
        self._latencies = latencies
        # `is None`, not `or`: an empty pool is falsy (it has a length).
        self._pool = ProviderPool(secrets=providers.secrets()) if pool is None else pool
        self._breakers = BreakerBoard() if breakers is None else breakers
        self._prices = PriceTable.load() if prices is None else prices
        self._settings = LlmSettings() if settings is None else settings
        self._limits: dict[str, asyncio.Semaphore] = {
            name: asyncio.Semaphore(limit) for name, limit in self._settings.max_concurrent.items()
        }
        self._cache_gate = _CacheGate()
        self._options = OptionsCheck()
        # Read once per worker, like every other setting (the worker checks the
        # environment when it starts).
        self._capture_content = capture_content()
        self._rate_limiter = (
            RateLimiter(providers.rate_limits) if rate_limiter is None else rate_limiter
        )

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
                unsent_text, unsent_from = _unsent(text, forwarder.take_unsent())
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
                    unsent_text=unsent_text,
                    unsent_from=unsent_from,
                )
            watch = FirstTokenWatch(call, self._latencies)
            watch.start()
            try:
                call = await _with_attachments(call)
                result = await observe_llm_call(
                    call,
                    lambda: self._complete(call, watch.wrap(forward)),
                    cost=lambda usage: self._prices.cost(call.provider, call.model, usage),
                    secrets=self._providers.secrets(),
                    attempt=attempt,
                    with_content=self._capture_content,
                )
            except ProviderError as error:
                raise self._application_error(call, error, attempt) from None
            finally:
                await watch.aclose()
            unsent_text, unsent_from = _unsent(result.text, forwarder.take_unsent())
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
            truncated=result.truncated,
            continuations=result.continuations,
            tool_calls=result.tool_calls,
            unsent_text=unsent_text,
            unsent_from=unsent_from,
        )

    async def _complete(self, call: LlmCall, forward: Callable[[str], None]) -> ProviderResult:
        """The whole reply: one provider call, and more while it is cut off and may go on."""
        policy = call.truncation_policy()
        call = _raised_after_truncation(call)
        result = await self._call_provider(call, forward)
        parts, usage, continuations = [result.text], result.usage, 0
        while result.truncated and policy == "continue" and continuations < call.max_continuations:
            continuations += 1
            so_far = "".join(parts)
            follow_up = call.model_copy(
                update={
                    "messages": [
                        *call.messages,
                        ChatMessage(role="assistant", content=so_far),
                        ChatMessage(role="user", content=CONTINUE_PROMPT),
                    ]
                }
            )
            result = await self._call_provider(follow_up, forward)
            parts.append(result.text)
            usage = usage + result.usage
        # An adapter's result is the whole reply unless the model was asked to go on.
        joined = (
            dataclasses.replace(
                result, text="".join(parts), usage=usage, continuations=continuations
            )
            if continuations
            else result
        )
        if joined.truncated and policy != "accept":
            if policy == "fail" and call.max_tokens:
                # The last heartbeat of a failed attempt is what the next attempt
                # starts with (activity.info().heartbeat_details): it asks for more.
                activity.heartbeat({"truncated_at_max_tokens": call.max_tokens})
            raise _truncated_error(call, joined, continuations)
        if not joined.truncated or call.response_format != "json":
            joined = enforce_response_format(call, joined)
        return joined

    async def _call_provider(self, call: LlmCall, forward: Callable[[str], None]) -> ProviderResult:
        # The trust boundary for calls from any spec or plan, however started:
        # options that could move the request and step endpoints the operator
        # did not list fail here, before a client is built or a breaker counts.
        self._options.check(call.provider, call.provider_options, call.model)
        config = self._providers.config_for(call.provider, call.base_url, call.timeout_s)
        progress = _Progress()

        def on_text(delta: str) -> None:
            if not progress.chars:
                # The provider has written the prompt to its cache by now.
                warming.warmed()
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

        keep_alive = _KeepAlive.start(progress)
        warming = self._cache_gate.enter(_cache_prefix_key(call))
        try:
            await warming.wait_turn()
            if config.keyless:
                # A step's own server is not the worker's account with the provider.
                return await self._breakers.call(call.provider, call.model, attempt)
            return await self._limited(call, progress, attempt)
        finally:
            warming.leave()
            keep_alive.cancel()

    async def _limited(
        self,
        call: LlmCall,
        progress: _Progress,
        attempt: Callable[[], Awaitable[ProviderResult]],
    ) -> ProviderResult:
        """The call once this worker's rate limits let it go (waiting is heartbeated)."""
        key = RateKey(call.provider, call.model)

        def waiting(wait_s: float, source: str) -> None:
            progress.waiting_for = f"rate limit ({source}), {wait_s:.1f}s"

        reservation = self._rate_limiter.acquire_now(key)
        if reservation is None:
            try:
                reservation = await self._rate_limiter.acquire(
                    key,
                    input_tokens=estimate_input_tokens(call),
                    output_tokens=call.max_tokens or DEFAULT_OUTPUT_RESERVE,
                    max_wait_s=_rate_limit_wait_budget_s(),
                    on_wait=waiting,
                )
            except RateLimitWait as wait:
                raise ProviderError(
                    ErrorType.RETRYABLE, str(wait), retry_after_s=math.ceil(wait.wait_s)
                ) from None
        progress.waiting_for = "first token"
        used: int | None = None
        try:
            with self._rate_limiter.reporting(key):
                result = await self._breakers.call(call.provider, call.model, attempt)
            used = result.usage.input_tokens + result.usage.output_tokens
            return result
        finally:
            self._rate_limiter.settle(reservation, used)

    def _application_error(
        self, call: LlmCall, error: ProviderError, attempt: int
    ) -> ApplicationError:
        message = redact(
            f"{call.provider}/{call.model}: {error.message}", self._providers.secrets()
        )
        non_retryable = not error.retryable
        if error.error_type == ErrorType.TRUNCATED and call.truncation_policy() == "continue":
            # Continued max_continuations times and still cut off: the same
            # call again would end the same way.
            non_retryable = True
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
                reason=error.reason,
            ).model_dump(),
            type=error.error_type,
            non_retryable=non_retryable,
            next_retry_delay=(
                timedelta(seconds=error.retry_after_s) if error.retry_after_s else None
            ),
        )


def _unsent(text: str, unsent: str) -> tuple[str, int | None]:
    """How a reply carries the streamed text its watchers were not sent yet.

    ``(unsent_text, unsent_from)`` of :class:`LlmReply`.

    Mostly that text is the end of the reply's own text (all of it, for a call
    shorter than one delta interval), which the reply then points into
    instead of holding it a second time in history. Text that is not (a
    JSON reply taken out of its code fence) is carried as it is.
    """
    if unsent and text.endswith(unsent):
        return "", len(text) - len(unsent)
    return unsent, None


def _raised_after_truncation(call: LlmCall) -> LlmCall:
    """The call with a doubled ``max_tokens`` when the last attempt was cut off at its limit.

    Only for ``on_truncation: fail`` (JSON's default), where another attempt
    at the same limit would most likely be cut again. At most
    ``_MAX_TOKENS_GROWTH`` times the step's own ``max_tokens``, so a run's
    cost stays within sight of what its spec says. The model's own output
    maximum is not known here: a limit above it is the provider's 400.
    """
    if call.truncation_policy() != "fail" or not call.max_tokens:
        return call
    details = activity.info().heartbeat_details
    last = details[0] if details else None
    cut_at = last.get("truncated_at_max_tokens") if isinstance(last, dict) else None
    if not isinstance(cut_at, int) or cut_at < call.max_tokens:
        return call
    raised = min(cut_at * 2, call.max_tokens * _MAX_TOKENS_GROWTH)
    return call.model_copy(update={"max_tokens": raised})


def _rate_limit_wait_budget_s() -> float:
    """How long a call may wait for its rate limit: half of its attempt's time left.

    A longer wait would leave the call itself too little of its start-to-close
    timeout; the attempt fails retryable instead, to be retried after the wait.
    """
    info = activity.info()
    if info.start_to_close_timeout is None:
        return math.inf
    deadline = info.started_time + info.start_to_close_timeout
    left = (deadline - datetime.now(UTC)).total_seconds()
    return max(0.0, left / 2)


async def _with_attachments(call: LlmCall) -> LlmCall:
    """``call`` with its files' bytes, read through the worker's converter (its store)."""
    if not any(m.attachments for m in call.messages):
        return call
    try:
        return await load_attachments(call, activity.client().data_converter)
    except AttachmentError as error:
        # Another attempt reads the same store: the run must be started again.
        raise ProviderError(ErrorType.REJECTED, str(error)) from None


def _truncated_error(call: LlmCall, result: ProviderResult, continuations: int) -> ProviderError:
    limit = f"max_tokens {call.max_tokens}" if call.max_tokens else "the default output limit"
    if call.truncation_policy() == "continue":
        what = (
            f"the reply was still cut off after {continuations} continuation(s) "
            f"(finish reason {result.finish_reason}, {limit}): raise max_tokens or "
            "max_continuations, or set on_truncation: accept to keep a cut-off reply"
        )
    else:
        what = (
            f"the reply was cut off at {limit} (finish reason {result.finish_reason}) and "
            "on_truncation is fail (the default for JSON, where a cut reply is no JSON): "
            f"the call will be retried with max_tokens up to {_MAX_TOKENS_GROWTH} times the "
            "step's; raise max_tokens if it keeps happening"
        )
    return ProviderError(ErrorType.TRUNCATED, what, reason=result.finish_reason)


def _cache_prefix_key(call: LlmCall) -> str | None:
    """What identifies the prompt prefix a call would write to the provider's cache.

    None when the call does not use caching or has no prefix long enough to
    be cached; two calls with the same key share their cacheable prefix.
    """
    if call.cache != "auto" or call.dry_run or not call.messages:
        return None
    shared = stable_prefix(call.messages[-1].content)
    # Files go before a turn's text, so they are part of the prefix too.
    history = [m.content for m in call.messages[:-1]] + [
        f.sha256 for m in call.messages for f in m.attachments
    ]
    if not shared and not history and len(call.system or "") < 4096:
        return None
    digest = hashlib.sha256()
    for part in (call.provider, call.model, call.base_url or "", call.system or "", *history):
        digest.update(part.encode())
        digest.update(b"\x00")
    digest.update(shared.encode())
    return digest.hexdigest()


class _CacheGate:
    """Lets the first of several calls sharing a prompt prefix warm the provider's cache.

    A provider caches a prefix only once a request with it has been
    processed; siblings sent at the same moment all miss and all pay the
    full (on Anthropic, a 1.25x write) price. So on this worker the first
    call with a given prefix goes at once and the others wait until it
    streams its first token (or ends), then read the prefix from the cache.
    The wait is bounded: a call never waits more than ``_CACHE_WARM_WAIT_S``.
    """

    def __init__(self) -> None:
        self._warming: dict[str, asyncio.Event] = {}

    def enter(self, key: str | None) -> _Warming:
        if key is None:
            return _Warming(None, None, owner=False, gate=self)
        event = self._warming.get(key)
        if event is None:
            event = asyncio.Event()
            self._warming[key] = event
            return _Warming(key, event, owner=True, gate=self)
        return _Warming(key, event, owner=False, gate=self)

    def release(self, key: str, event: asyncio.Event) -> None:
        event.set()
        if self._warming.get(key) is event:
            del self._warming[key]


@dataclasses.dataclass
class _Warming:
    key: str | None
    event: asyncio.Event | None
    owner: bool
    gate: _CacheGate

    async def wait_turn(self) -> None:
        if self.owner or self.event is None:
            return
        try:
            await asyncio.wait_for(self.event.wait(), _CACHE_WARM_WAIT_S)
        except TimeoutError:
            pass

    def warmed(self) -> None:
        if self.owner and self.key is not None and self.event is not None:
            self.gate.release(self.key, self.event)

    def leave(self) -> None:
        self.warmed()


class _KeepAlive:
    """Heartbeats while a call has not streamed anything yet.

    Silence before the first token is normal: a reasoning model thinks for a
    minute, a client is built on first use, a call waits for a concurrency
    slot. Without this, any of them longer than the heartbeat timeout would
    have Temporal declare a healthy call lost and run it again. Once text
    flows, only text heartbeats, so a stream that stalls mid-way is noticed by
    the heartbeat timeout; a stall before the first token ends at the call's
    ``timeout_s``, which the SDK enforces.

    A timer, not a task: a call answered before the first beat (most are)
    then costs one cancelled timer instead of a task and its cancellation.
    """

    def __init__(self, progress: _Progress, every_s: float | None) -> None:
        self._progress = progress
        self._every_s = every_s
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def start(cls, progress: _Progress) -> _KeepAlive:
        timeout = activity.info().heartbeat_timeout
        # A quarter of the timeout: a call answered sooner costs no heartbeat at
        # all, and a beat delayed by a busy event loop still lands in time.
        keep_alive = cls(progress, timeout.total_seconds() / 4 if timeout else None)
        keep_alive._arm()
        return keep_alive

    def _arm(self) -> None:
        if self._every_s is not None:
            self._timer = asyncio.get_running_loop().call_later(self._every_s, self._beat)

    def _beat(self) -> None:
        self._timer = None
        if self._progress.chars:
            return
        # The timer runs in the activity's context (a handle keeps the context
        # it was made in), so this is the activity's own heartbeat.
        activity.heartbeat({"chars": 0, "waiting_for": self._progress.waiting_for})
        self._arm()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Progress:
    def __init__(self) -> None:
        self.chars = 0
        #: What a heartbeat before the first token says the call waits for.
        self.waiting_for = "first token"
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
