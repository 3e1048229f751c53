"""Worker-local circuit breakers, one per (provider, model).

When a provider is down, every step that uses it would otherwise spend its
whole timeout (and its retries) finding out. A breaker watches the outcomes of
recent calls; once at least ``min_calls`` calls in the last ``window_s``
seconds have a failure share of ``failure_threshold`` or more, it opens for
``cooldown_s`` and calls fail at once with ``ErrorType.CIRCUIT_OPEN`` (which
the workflow may answer with a fallback). After the cool-down one probe call is
let through (half-open): success closes the breaker, failure re-opens it.

Only retryable failures count: a 400 or a missing key says nothing about the
provider being down, so such outcomes count as calls that reached a working
provider. Breakers are held by a :class:`BreakerBoard` instance that the
worker owns; nothing here is global, and each worker decides for itself.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from llmmixer.activities.providers.base import ProviderError
from llmmixer.core.contracts import ErrorType

__all__ = ["BreakerBoard", "BreakerPolicy", "BreakerState", "StateChange"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# on_change(provider, model, old, new): the hook for metrics.
StateChange = Callable[[str, str, BreakerState, BreakerState], None]


@dataclass(frozen=True, kw_only=True)
class BreakerPolicy:
    """When a breaker opens and for how long."""

    failure_threshold: float = 0.5
    """Share of failed calls (0..1] in the window that opens the breaker."""
    min_calls: int = 5
    """Fewest calls in the window before the share is judged at all."""
    window_s: float = 60.0
    """How far back outcomes are remembered."""
    cooldown_s: float = 30.0
    """How long an open breaker refuses calls before letting one probe through."""

    def __post_init__(self) -> None:
        if not 0.0 < self.failure_threshold <= 1.0:
            raise ValueError("failure_threshold must be in (0, 1], e.g. 0.5 for half the calls")
        if self.min_calls < 1:
            raise ValueError("min_calls must be at least 1")
        if self.window_s <= 0 or self.cooldown_s <= 0:
            raise ValueError("window_s and cooldown_s must be positive seconds")


@dataclass
class _Breaker:
    state: BreakerState = BreakerState.CLOSED
    # (time, failed) per finished call, oldest first.
    outcomes: deque[tuple[float, bool]] = field(default_factory=deque)
    # How many of ``outcomes`` failed, kept as they come and go: counting the
    # window on every call cost each success a scan of a minute's calls.
    failures: int = 0
    opened_at: float = 0.0
    failures_when_opened: int = 0
    probe_started_at: float | None = None

    def forget(self) -> None:
        self.outcomes.clear()
        self.failures = 0


class BreakerBoard:
    """All breakers of one worker.

    Use :meth:`call` around a provider call, or the three steps it is made of:
    :meth:`before_call` (raises when open), then :meth:`record_success` or
    :meth:`record_failure`. Methods are synchronous and cheap; a lock makes
    them safe from activity threads too.
    """

    def __init__(
        self,
        policy: BreakerPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: StateChange | None = None,
    ) -> None:
        self.policy = policy or BreakerPolicy()
        self._clock = clock
        self._on_change = on_change
        self._breakers: dict[tuple[str, str], _Breaker] = {}
        self._lock = threading.Lock()

    def state(self, provider: str, model: str) -> BreakerState:
        """The current state (an open breaker whose cool-down ended reads half-open)."""
        with self._lock:
            breaker = self._breakers.get((provider, model))
            if breaker is None:
                return BreakerState.CLOSED
            if breaker.state is BreakerState.OPEN and self._cooled(breaker):
                return BreakerState.HALF_OPEN
            return breaker.state

    def before_call(self, provider: str, model: str) -> None:
        """Let the call through, or raise ``ProviderError(CIRCUIT_OPEN)``."""
        changes: list[tuple[BreakerState, BreakerState]] = []
        with self._lock:
            now = self._clock()
            breaker = self._breakers.setdefault((provider, model), _Breaker())
            if breaker.state is BreakerState.OPEN:
                if not self._cooled(breaker):
                    raise self._open_error(provider, model, breaker, now)
                changes.append(self._move(breaker, BreakerState.HALF_OPEN))
            if breaker.state is BreakerState.HALF_OPEN:
                # One probe at a time; a probe that never reported back (its
                # activity was cancelled) stops blocking after one cool-down.
                probe = breaker.probe_started_at
                if probe is not None and now - probe < self.policy.cooldown_s:
                    raise self._open_error(provider, model, breaker, now, probing=True)
                breaker.probe_started_at = now
        self._notify(provider, model, changes)

    def record_success(self, provider: str, model: str) -> None:
        """The provider answered (any outcome that is not a retryable failure)."""
        self._record(provider, model, failed=False)

    def record_failure(self, provider: str, model: str, error: BaseException) -> None:
        """A call failed; only retryable provider failures count against the provider."""
        failed = isinstance(error, ProviderError) and error.error_type == ErrorType.RETRYABLE
        self._record(provider, model, failed=failed)

    def release(self, provider: str, model: str) -> None:
        """A call ended with no verdict (cancelled): free the half-open probe slot."""
        with self._lock:
            breaker = self._breakers.get((provider, model))
            if breaker is not None:
                breaker.probe_started_at = None

    async def call(self, provider: str, model: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` under the breaker for (provider, model)."""
        self.before_call(provider, model)
        try:
            result = await fn()
        except ProviderError as exc:
            self.record_failure(provider, model, exc)
            raise
        except BaseException:
            # Cancellation or a bug on our side: no verdict on the provider.
            self.release(provider, model)
            raise
        self.record_success(provider, model)
        return result

    # --- internals ---------------------------------------------------------------------

    def _record(self, provider: str, model: str, *, failed: bool) -> None:
        changes: list[tuple[BreakerState, BreakerState]] = []
        with self._lock:
            now = self._clock()
            breaker = self._breakers.setdefault((provider, model), _Breaker())
            if breaker.state is BreakerState.OPEN and self._cooled(breaker):
                changes.append(self._move(breaker, BreakerState.HALF_OPEN))
            if breaker.state is BreakerState.HALF_OPEN:
                breaker.probe_started_at = None
                if failed:
                    changes.append(self._open(breaker, now, failures=1))
                else:
                    breaker.forget()
                    changes.append(self._move(breaker, BreakerState.CLOSED))
            elif breaker.state is BreakerState.CLOSED:
                breaker.outcomes.append((now, failed))
                breaker.failures += failed
                self._prune(breaker, now)
                total = len(breaker.outcomes)
                failures = breaker.failures
                if (
                    failed
                    and total >= self.policy.min_calls
                    and failures / total >= self.policy.failure_threshold
                ):
                    changes.append(self._open(breaker, now, failures=failures))
            # An outcome arriving while OPEN (a call started before it opened)
            # changes nothing: the cool-down runs its course.
        self._notify(provider, model, changes)

    def _open(
        self, breaker: _Breaker, now: float, *, failures: int
    ) -> tuple[BreakerState, BreakerState]:
        breaker.opened_at = now
        breaker.failures_when_opened = failures
        breaker.forget()
        return self._move(breaker, BreakerState.OPEN)

    @staticmethod
    def _move(breaker: _Breaker, new: BreakerState) -> tuple[BreakerState, BreakerState]:
        old, breaker.state = breaker.state, new
        return (old, new)

    def _cooled(self, breaker: _Breaker) -> bool:
        return self._clock() - breaker.opened_at >= self.policy.cooldown_s

    def _prune(self, breaker: _Breaker, now: float) -> None:
        horizon = now - self.policy.window_s
        while breaker.outcomes and breaker.outcomes[0][0] < horizon:
            _, failed = breaker.outcomes.popleft()
            breaker.failures -= failed

    def _open_error(
        self, provider: str, model: str, breaker: _Breaker, now: float, *, probing: bool = False
    ) -> ProviderError:
        if probing:
            wait = max(0.0, (breaker.probe_started_at or now) + self.policy.cooldown_s - now)
            detail = "a probe call is in flight"
        else:
            wait = max(0.0, breaker.opened_at + self.policy.cooldown_s - now)
            detail = "provider calls are refused on this worker"
        return ProviderError(
            ErrorType.CIRCUIT_OPEN,
            f"circuit open for {provider}/{model} after {breaker.failures_when_opened} failures "
            f"in the last {self.policy.window_s:g} s; retrying after {wait:.1f} s "
            f"({detail}; a fallback provider avoids the wait)",
            retry_after_s=wait,
        )

    def _notify(
        self, provider: str, model: str, changes: list[tuple[BreakerState, BreakerState]]
    ) -> None:
        # Outside the lock: a hook may be slow or call back into the board.
        for old, new in changes:
            if old is new:
                continue
            level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
            log.log(level, "circuit for %s/%s: %s -> %s", provider, model, old, new)
            if self._on_change is not None:
                try:
                    self._on_change(provider, model, old, new)
                except Exception:
                    log.warning("breaker on_change hook failed", exc_info=True)
