"""Rate limits a worker keeps on its own, so calls wait instead of drawing 429s.

Two sources slow a call down, both per (provider, model) and per worker:

* The operator's budgets (``LLMMIXER_RATE_LIMITS``): a token bucket of
  requests per minute and one of tokens per minute. A bucket starts full
  and refills continuously (Anthropic counts this way too), so a worker
  sends at most a minute's budget at once and then its steady rate. The
  tokens bucket is charged before the call with the call's estimated input
  (four characters a token) plus its ``max_tokens``, which is what the
  providers count the call against, and settled with the reply's real
  usage afterwards: an estimate too high is given back, one too low is
  owed by the next calls.
* The provider's own rate-limit headers (``x-ratelimit-remaining-*`` and
  ``x-ratelimit-reset-*`` from OpenAI, ``anthropic-ratelimit-*-remaining``
  and ``-reset`` from Anthropic), read from every response by an httpx event
  hook on the SDK clients (:func:`http_event_hooks`). When what remains
  falls under ``headroom`` of the limit, the next calls of that model are
  spread over the time until the reset; at zero the next call waits for the
  reset itself. Gemini's API sends no such headers.

Calls to a step's own endpoint (``keyless``) are not the worker's account and
are not limited.

A limit holds for one worker process. Across many workers, give a provider
its own Temporal task queue with a server-side rate limit (see the README).

Waiting is done by :class:`RateLimiter.acquire`, which never waits past the
``max_wait_s`` it is given: the LLM activity gives it half of what is left of
the attempt's start-to-close timeout, and a longer wait fails the attempt as
retryable with the wait as the next retry's delay (:class:`RateLimitWait`),
so a wait never eats the timeout and the history says why the step is slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from llmmixer.core.contracts import LlmCall
from llmmixer.runtime.settings import RateLimitRule

__all__ = [
    "DEFAULT_HEADROOM",
    "DEFAULT_OUTPUT_RESERVE",
    "RateKey",
    "RateLimitWait",
    "RateLimiter",
    "Reservation",
    "estimate_input_tokens",
    "http_event_hooks",
]

#: Under this share of the provider's limit left, calls are spread until the reset.
DEFAULT_HEADROOM = 0.1
#: Output tokens reserved for a call without ``max_tokens`` (Anthropic's default there).
DEFAULT_OUTPUT_RESERVE = 4096
_CHARS_PER_TOKEN = 4

Clock = Callable[[], float]


@dataclass(frozen=True)
class RateKey:
    provider: str
    model: str

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}"


class RateLimitWait(Exception):
    """The limit would hold the call longer than it may wait; retry after ``wait_s``."""

    def __init__(self, key: RateKey, wait_s: float, max_wait_s: float, source: str) -> None:
        self.key = key
        self.wait_s = wait_s
        self.max_wait_s = max_wait_s
        self.source = source
        super().__init__(
            f"{source} for {key} would hold this call {wait_s:.1f}s, longer than the "
            f"{max_wait_s:.1f}s it may wait (half of what is left of the attempt's "
            f"start-to-close timeout); the attempt is retried in {wait_s:.1f}s instead"
        )


def estimate_input_tokens(call: LlmCall) -> int:
    """The call's prompt in tokens, roughly (four characters a token), as providers estimate."""
    chars = len(call.system or "")
    for message in call.messages:
        chars += len(str(message.content))
        chars += sum(len(str(c.arguments)) + len(c.name) for c in message.tool_calls)
    for tool in call.tools:
        chars += len(tool.name) + len(tool.description or "") + len(str(tool.parameters))
    return math.ceil(chars / _CHARS_PER_TOKEN)


class _Bucket:
    """``capacity`` units, refilled at ``capacity`` per ``window_s``; the level may go negative."""

    def __init__(self, capacity: int, window_s: float, now: float) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / window_s
        self.level = float(capacity)
        self._updated = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self._updated) * self.rate)
        self._updated = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` (at most a full bucket) is there."""
        self._refill(now)
        missing = min(amount, self.capacity) - self.level
        return max(0.0, missing / self.rate)

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def give(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)


@dataclass
class _Budget:
    requests: _Bucket | None
    tokens: _Bucket | None
    #: Monotonic time before which no call starts (from the provider's headers).
    not_before: float = 0.0
    # Calls of one model are let through in the order they asked.
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Set when a settled call gives tokens back: the waiting call looks again.
    refunded: asyncio.Event = field(default_factory=asyncio.Event)
    #: Calls inside ``acquire`` (waiting for their turn or for the budget).
    queued: int = 0


@dataclass(frozen=True)
class Reservation:
    """What one call took from its budget; hand it back to :meth:`RateLimiter.settle`."""

    key: RateKey
    input_tokens: int = 0
    output_tokens: int = 0
    #: Seconds the call waited for its turn.
    waited_s: float = 0.0


class RateLimiter:
    """Every (provider, model)'s budget on this worker; one instance per worker process."""

    def __init__(
        self,
        rules: Sequence[RateLimitRule] = (),
        *,
        window_s: float = 60.0,
        headroom: float = DEFAULT_HEADROOM,
        clock: Clock = time.monotonic,
    ) -> None:
        self._rules = {(rule.provider, rule.model): rule for rule in rules}
        self._window_s = window_s
        self._headroom = headroom
        self._clock = clock
        self._budgets: dict[RateKey, _Budget] = {}

    def rule(self, key: RateKey) -> RateLimitRule | None:
        """The operator's budget for ``key``: its own entry, else its provider's ``*``."""
        return self._rules.get((key.provider, key.model)) or self._rules.get((key.provider, "*"))

    def _budget(self, key: RateKey) -> _Budget:
        budget = self._budgets.get(key)
        if budget is None:
            rule, now = self.rule(key), self._clock()
            rpm = rule.requests_per_minute if rule else None
            tpm = rule.tokens_per_minute if rule else None
            budget = _Budget(
                requests=_Bucket(rpm, self._window_s, now) if rpm else None,
                tokens=_Bucket(tpm, self._window_s, now) if tpm else None,
            )
            self._budgets[key] = budget
        return budget

    def _wait(self, budget: _Budget, tokens: int) -> tuple[float, str]:
        now = self._clock()
        waits = [(budget.not_before - now, "the provider's rate-limit headers")]
        if budget.requests is not None:
            waits.append((budget.requests.wait_for(1, now), "LLMMIXER_RATE_LIMITS (requests)"))
        if budget.tokens is not None:
            waits.append((budget.tokens.wait_for(tokens, now), "LLMMIXER_RATE_LIMITS (tokens)"))
        return max(waits)

    def acquire_now(self, key: RateKey) -> Reservation | None:
        """The reservation for ``key`` when nothing can hold it back, else None (use ``acquire``).

        Nothing can when the operator set no budget for ``key``, its provider's
        headers ask for no pause and no call is queued ahead: then ``acquire``
        would take nothing and not wait, yet its timeout, lock and estimate
        cost every call on a worker without rate limits.
        """
        budget = self._budget(key)
        if (
            budget.requests is None
            and budget.tokens is None
            and budget.queued == 0
            and budget.not_before <= self._clock()
        ):
            return Reservation(key)
        return None

    async def acquire(
        self,
        key: RateKey,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        max_wait_s: float = math.inf,
        on_wait: Callable[[float, str], None] | None = None,
    ) -> Reservation:
        """Wait until ``key`` may be called, then take one request and the tokens.

        Raises :class:`RateLimitWait` (taking nothing) when that would take
        longer than ``max_wait_s``. Cancelling the waiting task takes nothing.
        """
        budget = self._budget(key)
        budget.queued += 1
        try:
            return await self._acquire(
                key, budget, input_tokens, output_tokens, max_wait_s, on_wait
            )
        finally:
            budget.queued -= 1

    async def _acquire(
        self,
        key: RateKey,
        budget: _Budget,
        input_tokens: int,
        output_tokens: int,
        max_wait_s: float,
        on_wait: Callable[[float, str], None] | None,
    ) -> Reservation:
        started = self._clock()
        deadline = started + max_wait_s
        tokens = input_tokens + output_tokens
        try:
            async with asyncio.timeout(max(0.0, max_wait_s) if max_wait_s < math.inf else None):
                await budget.turn.acquire()
        except TimeoutError:
            wait, source = self._wait(budget, tokens)
            raise RateLimitWait(key, max(wait, max_wait_s), max_wait_s, source) from None
        try:
            while True:
                wait, source = self._wait(budget, tokens)
                if wait <= 0:
                    break
                if self._clock() + wait > deadline:
                    raise RateLimitWait(key, wait, max_wait_s, source)
                if on_wait is not None:
                    on_wait(wait, source)
                budget.refunded.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(budget.refunded.wait(), wait)
            now = self._clock()
            if budget.requests is not None:
                budget.requests.take(1, now)
            if budget.tokens is not None:
                budget.tokens.take(tokens, now)
        finally:
            budget.turn.release()
        return Reservation(key, input_tokens, output_tokens, waited_s=self._clock() - started)

    def settle(self, reservation: Reservation, used_tokens: int | None) -> None:
        """Replace the estimate with what the call used (None: it failed, no output counted)."""
        budget = self._budgets.get(reservation.key)
        if budget is None or budget.tokens is None:
            return
        reserved = reservation.input_tokens + reservation.output_tokens
        used = reservation.input_tokens if used_tokens is None else used_tokens
        budget.tokens.give(reserved - used, self._clock())
        if reserved > used:
            budget.refunded.set()

    def observe(self, key: RateKey, headers: Mapping[str, str]) -> None:
        """Read a response's rate-limit headers; slow the next calls when little is left."""
        pause = _pause_from_headers(headers, self._headroom)
        if pause is None:
            return
        budget = self._budget(key)
        budget.not_before = max(budget.not_before, self._clock() + pause)

    @contextlib.contextmanager
    def reporting(self, key: RateKey) -> Iterator[None]:
        """Route the headers of the responses within this block to ``key``'s budget."""
        token = _REPORT.set(lambda headers: self.observe(key, headers))
        try:
            yield
        finally:
            _REPORT.reset(token)


# Which budget the responses of the running call report to. A ContextVar holds
# a value per asyncio task, so concurrent calls on one shared SDK client each
# report to their own model; it holds no state shared between calls.
_REPORT: ContextVar[Callable[[Mapping[str, str]], None] | None] = ContextVar(
    "llmmixer_rate_limit_report", default=None
)


async def _report_response(response: Any) -> None:
    report = _REPORT.get()
    if report is not None:
        report(response.headers)


def http_event_hooks() -> dict[str, list[Callable[[Any], Awaitable[None]]]]:
    """``event_hooks`` for an SDK's httpx client: every response's headers reach the limiter."""
    return {"response": [_report_response]}


# (remaining, limit, reset) header names per dimension, OpenAI's then Anthropic's.
_DIMENSIONS = (
    ("x-ratelimit-remaining-requests", "x-ratelimit-limit-requests", "x-ratelimit-reset-requests"),
    ("x-ratelimit-remaining-tokens", "x-ratelimit-limit-tokens", "x-ratelimit-reset-tokens"),
    *(
        (
            f"anthropic-ratelimit-{what}-remaining",
            f"anthropic-ratelimit-{what}-limit",
            f"anthropic-ratelimit-{what}-reset",
        )
        for what in ("requests", "tokens", "input-tokens", "output-tokens")
    ),
)
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# A reset further off than this is a provider's daily quota, not a rate to pace.
_MAX_PAUSE_S = 600.0


def _pause_from_headers(headers: Mapping[str, str], headroom: float) -> float | None:
    """How long to hold the next call: the reset spread over the calls still allowed."""
    pauses: list[float] = []
    for remaining_name, limit_name, reset_name in _DIMENSIONS:
        # Most responses (any Gemini one, any of a compatible server) carry
        # none of these: one look-up each, not three.
        remaining = _number(headers.get(remaining_name))
        if remaining is None:
            continue
        reset = _reset_s(headers.get(reset_name))
        if reset is None:
            continue
        limit = _number(headers.get(limit_name))
        if remaining > 0 and (limit is None or remaining >= headroom * limit):
            continue
        pauses.append(min(reset / (max(remaining, 0.0) + 1), _MAX_PAUSE_S))
    return max(pauses) if pauses else None


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _reset_s(text: str | None) -> float | None:
    """Seconds until a reset: OpenAI's ``1m30.5s``/``20ms``, or Anthropic's RFC 3339 time."""
    if not text:
        return None
    text = text.strip()
    if "T" in text:
        try:
            at = datetime.fromisoformat(text)
        except ValueError:
            return None
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        return max(0.0, (at - datetime.now(UTC)).total_seconds())
    number = _number(text)
    if number is not None:
        return max(0.0, number)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)
