"""Circuit breaker per (provider, model), with an injected clock."""

from __future__ import annotations

import asyncio
import logging

import pytest

from llmmixer.activities.providers.base import ProviderError
from llmmixer.activities.providers.breaker import BreakerBoard, BreakerPolicy, BreakerState
from llmmixer.core.contracts import ErrorType

P, M = "openai", "gpt-4.1"
DOWN = ProviderError(ErrorType.RETRYABLE, "server error", status_code=503)
BAD_REQUEST = ProviderError(ErrorType.REJECTED, "bad request", status_code=400)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Change = tuple[str, str, BreakerState, BreakerState]


def board(clock: Clock, changes: list[Change] | None = None) -> BreakerBoard:
    policy = BreakerPolicy(failure_threshold=0.5, min_calls=4, window_s=60, cooldown_s=30)
    hook = (
        (lambda p, m, old, new: changes.append((p, m, old, new))) if changes is not None else None
    )
    return BreakerBoard(policy, clock=clock, on_change=hook)


def fail(b: BreakerBoard, n: int, error: BaseException = DOWN) -> None:
    for _ in range(n):
        b.before_call(P, M)
        b.record_failure(P, M, error)


def test_opens_after_threshold_share_over_min_calls_and_fails_fast() -> None:
    clock = Clock()
    changes: list[Change] = []
    b = board(clock, changes)
    fail(b, 3)
    assert b.state(P, M) is BreakerState.CLOSED  # 3 < min_calls
    fail(b, 1)
    assert b.state(P, M) is BreakerState.OPEN
    assert changes == [(P, M, BreakerState.CLOSED, BreakerState.OPEN)]
    clock.now += 10
    with pytest.raises(ProviderError) as info:
        b.before_call(P, M)
    assert info.value.error_type == ErrorType.CIRCUIT_OPEN
    assert info.value.message.startswith(
        "circuit open for openai/gpt-4.1 after 4 failures in the last 60 s; retrying after 20.0 s"
    )
    assert info.value.retry_after_s == pytest.approx(20)


def test_share_below_threshold_stays_closed() -> None:
    clock = Clock()
    b = board(clock)
    for _ in range(6):
        b.before_call(P, M)
        b.record_success(P, M)
    fail(b, 5)  # 5 of 11 < 0.5
    assert b.state(P, M) is BreakerState.CLOSED
    fail(b, 1)  # 6 of 12 = 0.5
    assert b.state(P, M) is BreakerState.OPEN


def test_old_outcomes_leave_the_window() -> None:
    clock = Clock()
    b = board(clock)
    fail(b, 3)
    clock.now += 61
    fail(b, 3)  # only 3 in the window
    assert b.state(P, M) is BreakerState.CLOSED


def test_non_retryable_failures_do_not_count() -> None:
    b = board(Clock())
    fail(b, 10, BAD_REQUEST)
    fail(b, 10, ProviderError(ErrorType.AUTH, "no key"))
    assert b.state(P, M) is BreakerState.CLOSED
    fail(b, 3)  # 3 of 23
    assert b.state(P, M) is BreakerState.CLOSED


def test_half_open_lets_one_probe_and_success_closes() -> None:
    clock = Clock()
    changes: list[Change] = []
    b = board(clock, changes)
    fail(b, 4)
    clock.now += 30
    assert b.state(P, M) is BreakerState.HALF_OPEN
    b.before_call(P, M)  # the probe
    with pytest.raises(ProviderError) as info:
        b.before_call(P, M)  # a second caller while the probe runs
    assert info.value.error_type == ErrorType.CIRCUIT_OPEN
    b.record_success(P, M)
    assert b.state(P, M) is BreakerState.CLOSED
    b.before_call(P, M)  # flows again
    assert [c[2:] for c in changes] == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


def test_failed_probe_reopens_for_a_full_cooldown() -> None:
    clock = Clock()
    b = board(clock)
    fail(b, 4)
    clock.now += 31
    b.before_call(P, M)
    b.record_failure(P, M, DOWN)
    assert b.state(P, M) is BreakerState.OPEN
    clock.now += 29
    with pytest.raises(ProviderError):
        b.before_call(P, M)
    clock.now += 1
    b.before_call(P, M)  # next probe


def test_lost_probe_stops_blocking_after_a_cooldown() -> None:
    clock = Clock()
    b = board(clock)
    fail(b, 4)
    clock.now += 30
    b.before_call(P, M)  # probe never reports back
    clock.now += 30
    b.before_call(P, M)  # a new probe is allowed


def test_breakers_are_per_provider_and_model_and_per_board() -> None:
    clock = Clock()
    b = board(clock)
    fail(b, 4)
    b.before_call(P, "gpt-4o")
    b.before_call("anthropic", M)
    board(clock).before_call(P, M)  # another worker's board knows nothing of it


async def test_call_wrapper_records_outcomes_and_releases_on_cancel() -> None:
    clock = Clock()
    b = board(clock)

    async def down() -> str:
        raise DOWN

    for _ in range(4):
        with pytest.raises(ProviderError):
            await b.call(P, M, down)
    assert b.state(P, M) is BreakerState.OPEN
    clock.now += 30

    async def slow() -> str:
        await asyncio.sleep(10)
        return "never"

    task = asyncio.ensure_future(b.call(P, M, slow))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def ok() -> str:
        return "fine"

    assert await b.call(P, M, ok) == "fine"  # the cancelled probe freed its slot
    assert b.state(P, M) is BreakerState.CLOSED


def test_state_changes_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    b = board(Clock())
    with caplog.at_level(logging.INFO, logger="llmmixer.activities.providers.breaker"):
        fail(b, 4)
    assert any("openai/gpt-4.1: closed -> open" in r.getMessage() for r in caplog.records)


def test_a_failing_hook_does_not_break_the_board() -> None:
    def hook(*_: object) -> None:
        raise RuntimeError("metrics down")

    b = BreakerBoard(BreakerPolicy(min_calls=1), clock=Clock(), on_change=hook)
    fail(b, 1)
    assert b.state(P, M) is BreakerState.OPEN


@pytest.mark.parametrize(
    "kwargs",
    [{"failure_threshold": 0}, {"failure_threshold": 1.5}, {"min_calls": 0}, {"cooldown_s": 0}],
)
def test_policy_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BreakerPolicy(**kwargs)  # type: ignore[arg-type]
