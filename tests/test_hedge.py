"""Hedged calls: a slow provider call no longer holds its step.

Real Temporal dev server, real SDKs against the fake provider server; the
worker replays every workflow task from history (``workflow_cache`` 0), so a
hedge that issued different commands on replay would fail these tests.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from fakes.provider_server import FakeProviderServer, Reply
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.testing import ActivityEnvironment

from llmmixer.activities.hedging import FirstTokenLatencies, FirstTokenWatch, HedgingActivities
from llmmixer.activities.pricing import PriceTable
from llmmixer.client.mixer import MixerClient
from llmmixer.core.contracts import (
    LLM_ACTIVITY,
    ChatMessage,
    HedgeCostRequest,
    HedgeStart,
    HedgeTrigger,
    LlmCall,
    LlmReply,
    Usage,
)
from llmmixer.core.spec import FallbackTarget, Hedge
from llmmixer.core.validation import SpecError, validate_spec
from llmmixer.workflows.calls import hedge_target
from llmmixer.workflows.dag import RunState
from llmmixer.workflows.records import BudgetLimits, HedgeNote, RunStatus, StepNode


@pytest.fixture
def worker_env(provider_server: FakeProviderServer) -> dict[str, str]:
    return provider_server.env()


FAST_RETRY = {"max_attempts": 2, "initial_interval_s": 0.1, "backoff": 1.0, "max_interval_s": 1}


def spec(*steps: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    return {
        "name": "hedge",
        # A short heartbeat timeout: the cancelled loser learns of its
        # cancellation at its next keep-alive heartbeat (a quarter of it).
        "defaults": {"retry": FAST_RETRY, "heartbeat_timeout_s": 2, **defaults},
        "steps": list(steps),
    }


def llm_activities(history: WorkflowHistory) -> list[str]:
    """The provider/model of every LLM activity the run scheduled, in order."""
    found = []
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attributes = event.activity_task_scheduled_event_attributes
            if attributes.activity_type.name == LLM_ACTIVITY:
                found.append(json.loads(event.user_metadata.summary.data))
    return found


def hedge_signals(history: WorkflowHistory) -> list[str]:
    return [
        event.workflow_execution_signaled_event_attributes.signal_name
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
        and event.workflow_execution_signaled_event_attributes.signal_name.startswith(
            "llmmixer.hedge."
        )
    ]


def count(history: WorkflowHistory, event_type: EventType.ValueType) -> int:
    return sum(1 for event in history.events if event.event_type == event_type)


async def test_a_call_with_no_first_token_is_hedged_and_the_hedge_answers(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script(
        "openai", Reply(text="slow answer", think_s=10, usage=(30, 5)), model="gpt-4.1-mini"
    )
    provider_server.script("openai", Reply(text="fast answer", usage=(30, 4)), model="gpt-4.1")
    started = time.monotonic()
    handle = await mixer.start(
        spec(
            {
                "id": "ask",
                "provider": "openai",
                "model": "gpt-4.1-mini",
                "prompt": "hello",
                "fallback": [{"provider": "openai", "model": "gpt-4.1"}],
                "hedge": {"after_s": 0.5},
            }
        )
    )
    result = await handle.result()
    took = time.monotonic() - started
    assert result.status == RunStatus.COMPLETED
    assert result.output == "fast answer"
    assert took < 6, f"the run waited for the slow call: {took:.1f} s"
    record = result.steps["ask"]
    assert (record.provider, record.model) == ("openai", "gpt-4.1")
    [note] = record.hedges
    assert note.winner == "hedge"
    assert (note.provider, note.model) == ("openai", "gpt-4.1-mini")
    assert (note.hedge_provider, note.hedge_model) == ("openai", "gpt-4.1")
    assert note.after_s == 0.5
    assert note.reason == "no first token from openai/gpt-4.1-mini after 0.5 s (after_s)"
    # Both calls count: the winner's whole reply, the loser's prompt.
    assert note.loser_estimated
    assert note.loser_usage == Usage(input_tokens=30)
    assert (record.usage.input_tokens, record.usage.output_tokens) == (60, 4)
    prices = PriceTable.load()
    winner_cost = prices.cost("openai", "gpt-4.1", Usage(input_tokens=30, output_tokens=4))
    loser_cost = prices.cost("openai", "gpt-4.1-mini", Usage(input_tokens=30))
    assert winner_cost and loser_cost
    assert record.cost_usd == pytest.approx(winner_cost + loser_cost)
    assert result.usage.input_tokens == 60
    # The history shows both calls, and the loser's cancellation.
    history = await handle.temporal.fetch_history()
    assert llm_activities(history) == [
        "ask: openai/gpt-4.1-mini",
        "ask: openai/gpt-4.1-mini hedge: openai/gpt-4.1",
    ]
    assert count(history, EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED) == 1
    assert len(hedge_signals(history)) == 1
    # The cancellation reached the provider: the slow call's connection closed.
    for _ in range(100):
        if provider_server.hung_up:
            break
        await asyncio.sleep(0.1)
    assert [call.model for call in provider_server.hung_up] == ["gpt-4.1-mini"]


async def test_when_the_hedge_fails_the_slow_first_call_still_answers(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script(
        "openai", Reply(text="late but fine", think_s=2, usage=(9, 3)), model="gpt-4.1-mini"
    )
    provider_server.script("openai", Reply(status=401), model="gpt-4.1")
    handle = await mixer.start(
        spec(
            {
                "id": "ask",
                "provider": "openai",
                "model": "gpt-4.1-mini",
                "prompt": "hello",
                "fallback": [{"provider": "openai", "model": "gpt-4.1"}],
                "hedge": {"after_s": 0.3},
            }
        )
    )
    result = await handle.result()
    record = result.steps["ask"]
    assert result.output == "late but fine"
    [note] = record.hedges
    assert note.winner == "primary"
    # The failed hedge is charged nothing, and nothing is estimated.
    assert (note.loser_usage, note.loser_estimated) == (Usage(), False)
    assert record.usage == Usage(input_tokens=9, output_tokens=3)
    assert record.fallbacks == []
    history = await handle.temporal.fetch_history()
    assert count(history, EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED) == 0


async def test_a_fast_call_never_starts_a_hedge(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script("openai", Reply(text="quick", usage=(10, 2)), model="gpt-4.1-mini")
    handle = await mixer.start(
        spec(
            {"id": "ask", "provider": "openai", "model": "gpt-4.1-mini", "prompt": "hi"},
            hedge={"after_s": 3},
        )
    )
    result = await handle.result()
    assert result.output == "quick"
    assert result.steps["ask"].hedges == []
    assert result.steps["ask"].usage == Usage(input_tokens=10, output_tokens=2)
    history = await handle.temporal.fetch_history()
    assert llm_activities(history) == ["ask: openai/gpt-4.1-mini"]
    # A quick call costs the run no extra history: no signal, no timer.
    assert count(history, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED) == 0
    assert count(history, EventType.EVENT_TYPE_TIMER_STARTED) == 0
    assert provider_server.count() == 1


async def test_a_reply_that_is_already_streaming_is_not_hedged(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    # First token after 0.3 s, the whole reply after ~3 s: slow, but started.
    provider_server.script(
        "openai",
        Reply(chunks=[f"part{i} " for i in range(10)], chunk_delay_s=0.3),
        model="gpt-4.1-mini",
    )
    handle = await mixer.start(
        spec(
            {
                "id": "ask",
                "provider": "openai",
                "model": "gpt-4.1-mini",
                "prompt": "hi",
                "hedge": {"after_s": 1.5, "target": "same"},
            }
        )
    )
    result = await handle.result()
    assert result.output == "".join(f"part{i} " for i in range(10))
    assert result.steps["ask"].hedges == []
    history = await handle.temporal.fetch_history()
    assert llm_activities(history) == ["ask: openai/gpt-4.1-mini"]
    # Its first token came in time: it never asked for a hedge.
    assert hedge_signals(history) == []
    assert provider_server.count() == 1


async def test_a_learned_delay_comes_from_the_workers_first_tokens(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    for _ in range(3):
        provider_server.script("openai", Reply(text="warm"), model="gpt-4.1-mini")
    provider_server.script("openai", Reply(text="slow", think_s=10), model="gpt-4.1-mini")
    provider_server.script("openai", Reply(text="same model, again"), model="gpt-4.1-mini")
    hedge = {"after": "p95", "min_samples": 3, "default_s": 4, "min_s": 0.3}
    handle = await mixer.start(
        spec(
            {"id": "a", "provider": "openai", "model": "gpt-4.1-mini", "prompt": "1"},
            {"id": "b", "needs": ["a"], "prompt": "2"},
            {"id": "c", "needs": ["b"], "prompt": "3"},
            {"id": "d", "needs": ["c"], "prompt": "4"},
            provider="openai",
            model="gpt-4.1-mini",
            hedge=hedge,
        )
    )
    result = await handle.result()
    assert result.output == "same model, again"
    d = result.steps["d"]
    assert d.started_at and d.ended_at and (d.ended_at - d.started_at).total_seconds() < 8
    assert [result.steps[s].hedges for s in "abc"] == [[], [], []]
    [note] = result.steps["d"].hedges
    assert note.winner == "hedge"
    # Three quick first tokens (the first builds the SDK's client): their p95.
    assert 0.3 <= note.after_s < 4
    assert "p95 of the last 3 first tokens of that model on the worker" in note.reason
    assert (note.hedge_provider, note.hedge_model) == ("openai", "gpt-4.1-mini")


async def test_a_failed_first_call_still_falls_back(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script("openai", Reply(status=401), model="gpt-4.1-mini")
    provider_server.script("openai", Reply(text="from the fallback"), model="gpt-4.1")
    result = await (
        await mixer.start(
            spec(
                {
                    "id": "ask",
                    "provider": "openai",
                    "model": "gpt-4.1-mini",
                    "prompt": "hi",
                    "fallback": [{"provider": "openai", "model": "gpt-4.1"}],
                    "hedge": {"after_s": 5},
                }
            )
        )
    ).result()
    record = result.steps["ask"]
    assert result.output == "from the fallback"
    assert [(f.model, f.error_type) for f in record.fallbacks] == [("gpt-4.1-mini", "ProviderAuth")]
    assert record.hedges == []


async def test_when_the_hedge_is_slow_too_a_second_hedge_answers(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    # The first call and its hedge both stream nothing for 10 s; with max 2
    # the hedge asks for a third call, which walks the chain past its end
    # back to the step's own target.
    provider_server.script(
        "openai",
        Reply(text="slow first", think_s=10, usage=(30, 5)),
        Reply(text="third answer", usage=(30, 4)),
        model="gpt-4.1-mini",
    )
    provider_server.script(
        "openai", Reply(text="slow hedge", think_s=10, usage=(30, 5)), model="gpt-4.1"
    )
    started = time.monotonic()
    handle = await mixer.start(
        spec(
            {
                "id": "ask",
                "provider": "openai",
                "model": "gpt-4.1-mini",
                "prompt": "hello",
                "fallback": [{"provider": "openai", "model": "gpt-4.1"}],
                "hedge": {"after_s": 0.5, "max": 2},
            }
        )
    )
    result = await handle.result()
    took = time.monotonic() - started
    assert result.status == RunStatus.COMPLETED
    assert result.output == "third answer"
    assert took < 6, f"the run waited for a slow call: {took:.1f} s"
    record = result.steps["ask"]
    assert (record.provider, record.model) == ("openai", "gpt-4.1-mini")
    first, second = record.hedges
    # Each start and why: the first call was slow, then its hedge.
    assert (first.number, first.provider, first.model) == (1, "openai", "gpt-4.1-mini")
    assert (first.hedge_provider, first.hedge_model) == ("openai", "gpt-4.1")
    assert first.reason == "no first token from openai/gpt-4.1-mini after 0.5 s (after_s)"
    assert (second.number, second.provider, second.model) == (2, "openai", "gpt-4.1")
    assert (second.hedge_provider, second.hedge_model) == ("openai", "gpt-4.1-mini")
    assert second.reason == "no first token from openai/gpt-4.1 after 0.5 s (after_s)"
    assert (first.winner, second.winner) == ("other_hedge", "hedge")
    # Every call counts: the winner's reply, and the prompt of each cancelled
    # call (the first hedge on its own note, the first call on the winner's).
    assert first.loser_estimated and second.loser_estimated
    assert first.loser_usage == second.loser_usage == Usage(input_tokens=30)
    assert (record.usage.input_tokens, record.usage.output_tokens) == (90, 4)
    prices = PriceTable.load()
    mini = prices.cost("openai", "gpt-4.1-mini", Usage(input_tokens=30, output_tokens=4))
    mini_prompt = prices.cost("openai", "gpt-4.1-mini", Usage(input_tokens=30))
    full_prompt = prices.cost("openai", "gpt-4.1", Usage(input_tokens=30))
    assert mini and mini_prompt and full_prompt
    assert first.loser_cost_usd == pytest.approx(full_prompt)
    assert second.loser_cost_usd == pytest.approx(mini_prompt)
    assert record.cost_usd == pytest.approx(mini + mini_prompt + full_prompt)
    assert result.usage.input_tokens == 90
    history = await handle.temporal.fetch_history()
    assert llm_activities(history) == [
        "ask: openai/gpt-4.1-mini",
        "ask: openai/gpt-4.1-mini hedge: openai/gpt-4.1",
        "ask: openai/gpt-4.1-mini hedge 2: openai/gpt-4.1-mini",
    ]
    # Both slow calls asked (each its own signal) and both were cancelled.
    signals = hedge_signals(history)
    assert len(signals) == 2 and signals[1] == f"{signals[0]}.1"
    assert count(history, EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED) == 2
    for _ in range(100):
        if len(provider_server.hung_up) == 2:
            break
        await asyncio.sleep(0.1)
    assert sorted(call.model for call in provider_server.hung_up) == ["gpt-4.1", "gpt-4.1-mini"]


async def test_with_one_hedge_a_slow_hedge_is_waited_for(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    # The default, max 1, as before `max` existed: the hedge asks for
    # nothing, so the step waits for the first of its two slow calls.
    provider_server.script(
        "openai",
        Reply(text="slow first", think_s=3, usage=(30, 5)),
        Reply(text="never asked", usage=(30, 4)),
        model="gpt-4.1-mini",
    )
    provider_server.script(
        "openai", Reply(text="slow hedge", think_s=3, usage=(30, 5)), model="gpt-4.1"
    )
    started = time.monotonic()
    handle = await mixer.start(
        spec(
            {
                "id": "ask",
                "provider": "openai",
                "model": "gpt-4.1-mini",
                "prompt": "hello",
                "fallback": [{"provider": "openai", "model": "gpt-4.1"}],
                "hedge": {"after_s": 0.5},
            }
        )
    )
    result = await handle.result()
    assert time.monotonic() - started >= 3
    assert result.output == "slow first"
    [note] = result.steps["ask"].hedges
    assert (note.number, note.winner, note.hedge_model) == (1, "primary", "gpt-4.1")
    history = await handle.temporal.fetch_history()
    assert llm_activities(history) == [
        "ask: openai/gpt-4.1-mini",
        "ask: openai/gpt-4.1-mini hedge: openai/gpt-4.1",
    ]
    # The hedge carried no trigger: only the first call asked.
    assert len(hedge_signals(history)) == 1
    assert provider_server.count() == 2


async def test_no_further_hedge_starts_while_a_late_call_streams(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    # The first call is late (hedged at 0.6 s) but streams from 0.7 s; its
    # hedge is silent too. With max 2 a third call would answer at once
    # ("never asked"): the first call's word that it streams holds it back.
    provider_server.script(
        "openai",
        Reply(chunks=[f"part{i} " for i in range(8)], chunk_delay_s=0.3, think_s=0.7),
        Reply(text="never asked"),
        model="gpt-4.1-mini",
    )
    provider_server.script("openai", Reply(text="slow hedge", think_s=10), model="gpt-4.1")
    handle = await mixer.start(
        spec(
            {
                "id": "ask",
                "provider": "openai",
                "model": "gpt-4.1-mini",
                "prompt": "hello",
                "fallback": [{"provider": "openai", "model": "gpt-4.1"}],
                "hedge": {"after_s": 0.6, "max": 2},
            }
        )
    )
    result = await handle.result()
    assert result.output == "".join(f"part{i} " for i in range(8))
    [note] = result.steps["ask"].hedges
    assert (note.number, note.winner, note.hedge_model) == (1, "primary", "gpt-4.1")
    history = await handle.temporal.fetch_history()
    assert llm_activities(history) == [
        "ask: openai/gpt-4.1-mini",
        "ask: openai/gpt-4.1-mini hedge: openai/gpt-4.1",
    ]
    # The first call asked, then said it streams; the hedge asked in vain.
    first, *rest = hedge_signals(history)
    assert sorted(rest) == sorted([first, f"{first}.1"])
    assert provider_server.count() == 2


def test_extra_hedges_walk_the_chain_and_wrap_to_the_steps_own_target() -> None:
    chain = [FallbackTarget(provider="openai", model=m) for m in ("a", "b", "c")]
    walk = Hedge(after_s=1, max=4)
    assert [hedge_target(chain, 0, walk, n).model for n in (1, 2, 3, 4)] == ["b", "c", "a", "a"]
    assert [hedge_target(chain, 1, walk, n).model for n in (1, 2, 3)] == ["c", "b", "b"]
    same = Hedge(after_s=1, max=3, target="same")
    assert [hedge_target(chain, 1, same, n).model for n in (1, 2, 3)] == ["b", "b", "b"]


@pytest.mark.parametrize(
    ("hedge", "message"),
    [
        ({}, "step ask: hedge: give exactly one of after_s"),
        ({"after_s": 1, "after": "p95"}, "step ask: hedge: give exactly one of after_s"),
        ({"after": "p97"}, "step ask: hedge.after: use 'p50', 'p90', 'p95' or 'p99'"),
        ({"after_s": 0}, "step ask: hedge.after_s: input should be greater than 0"),
        ({"after_s": 1, "target": "other"}, "step ask: hedge.target:"),
        (
            {"after_s": 1, "max": 0},
            "step ask: hedge.max: input should be greater than or equal to 1",
        ),
        ({"after_s": 1, "max": 5}, "step ask: hedge.max: input should be less than or equal to 4"),
    ],
)
def test_a_wrong_hedge_is_refused_naming_the_field(hedge: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as refused:
        validate_spec(
            spec({"id": "ask", "provider": "openai", "model": "m", "prompt": "x", "hedge": hedge})
        )
    assert message in str(refused.value)


def test_the_defaults_hedge_is_refused_naming_its_field() -> None:
    with pytest.raises(SpecError) as refused:
        validate_spec(
            spec({"id": "ask", "provider": "openai", "model": "m", "prompt": "x"}, hedge={})
        )
    assert "spec: defaults.hedge: give exactly one of after_s" in str(refused.value)


# --- the worker's side -----------------------------------------------------------


def trigger(**overrides: Any) -> HedgeTrigger:
    fields: dict[str, Any] = {"signal": "s", "after": "p95", "min_s": 0.2, "default_s": 5.0}
    return HedgeTrigger(**(fields | overrides))


def test_the_window_keeps_the_latest_latencies_per_model() -> None:
    window = FirstTokenLatencies(size=100)
    for i in range(150):  # the first 50 (the slowest) age out
        window.observe("openai", "m", 10.0 if i < 50 else (1.0 if i % 20 else 3.0))
    window.observe("openai", "other", 9.0)
    assert window.count("openai", "m") == 100
    assert window.percentile("openai", "m", 0.5) == 1.0
    assert window.percentile("openai", "m", 0.95) == 1.0
    assert window.percentile("openai", "m", 0.99) == 3.0
    assert window.percentile("openai", "missing", 0.95) is None
    start = window.delay("openai", "m", trigger())
    assert (start.delay_s, start.samples, start.learned) == (1.0, 100, True)
    assert start.reason("openai", "m") == (
        "no first token from openai/m after 1 s (p95 of the last 100 first tokens of that "
        "model on the worker)"
    )


def test_too_few_latencies_give_the_default_and_a_quick_model_the_floor() -> None:
    window = FirstTokenLatencies()
    for _ in range(5):
        window.observe("openai", "m", 0.01)
    start = window.delay("openai", "m", trigger())
    assert (start.delay_s, start.samples, start.learned) == (5.0, 5, False)
    assert "default_s: the worker had seen 5 first tokens of that model" in start.reason("o", "m")
    assert window.delay("openai", "m", trigger(min_samples=5)).delay_s == 0.2
    fixed = window.delay("openai", "m", trigger(after=None, after_s=1.5))
    assert fixed.reason("openai", "m") == "no first token from openai/m after 1.5 s (after_s)"


async def test_the_cost_activity_prices_a_cancelled_prompt_for_its_model() -> None:
    activities = HedgingActivities(PriceTable.load())
    environment = ActivityEnvironment()
    cost = await environment.run(
        activities.hedge_cost,
        HedgeCostRequest(provider="openai", model="gpt-4.1", usage=Usage(input_tokens=1000)),
    )
    expected = PriceTable.load().cost("openai", "gpt-4.1", Usage(input_tokens=1000))
    assert cost.cost_usd == expected and expected
    unknown = await environment.run(
        activities.hedge_cost, HedgeCostRequest(provider="openai", model="no-such-model")
    )
    assert unknown.cost_usd is None


def hedged_call(hedge: HedgeTrigger | None) -> LlmCall:
    return LlmCall(
        workflow_id="w",
        step_id="s",
        provider="openai",
        model="m",
        messages=[ChatMessage(role="user", content="x")],
        hedge=hedge,
    )


async def test_a_call_without_a_first_token_asks_for_its_hedge_once_its_delay_is_up() -> None:
    window = FirstTokenLatencies()
    sent: list[tuple[str, HedgeStart, float]] = []
    began = time.monotonic()

    async def send(name: str, start: HedgeStart) -> None:
        sent.append((name, start, time.monotonic() - began))

    watch = FirstTokenWatch(
        hedged_call(trigger(signal="hedge-1", after=None, after_s=0.2)), window, send
    )
    watch.start()
    await asyncio.sleep(0.5)
    [(name, start, at)] = sent
    assert (name, start.delay_s) == ("hedge-1", 0.2)
    assert 0.2 <= at < 0.45
    await watch.aclose()
    # Cancelled without a token: counted as at least as slow as it waited.
    assert window.count("openai", "m") == 1
    assert (window.percentile("openai", "m", 0.5) or 0) >= 0.5


async def test_a_late_call_says_when_its_first_token_comes_if_more_hedges_may_follow() -> None:
    sent: list[tuple[str, HedgeStart]] = []

    async def send(name: str, start: HedgeStart) -> None:
        sent.append((name, start))

    for report in (True, False):
        sent.clear()
        call = hedged_call(trigger(signal="h", after=None, after_s=0.1, report_first_token=report))
        watch = FirstTokenWatch(call, FirstTokenLatencies(), send)
        watch.start()
        await asyncio.sleep(0.3)
        forward = watch.wrap(lambda text: None)
        forward("late")
        forward("more")
        await asyncio.sleep(0.05)
        await watch.aclose()
        said = [(name, start.streaming, start.delay_s) for name, start in sent]
        expected = [("h", False, 0.1)] + ([("h", True, 0.1)] if report else [])
        assert said == expected


async def test_a_call_whose_first_token_comes_in_time_sends_nothing() -> None:
    window = FirstTokenLatencies()
    sent: list[HedgeStart] = []

    async def send(name: str, start: HedgeStart) -> None:
        sent.append(start)

    watch = FirstTokenWatch(hedged_call(trigger(after=None, after_s=0.3)), window, send)
    watch.start()
    seen: list[str] = []
    forward = watch.wrap(seen.append)
    forward("")
    await asyncio.sleep(0.1)
    for text in ("a", "b", "c"):
        forward(text)
    await asyncio.sleep(0.4)
    await watch.aclose()
    assert sent == []
    assert seen == ["", "a", "b", "c"]
    assert window.count("openai", "m") == 1
    assert 0.1 <= (window.percentile("openai", "m", 0.5) or 0) < 0.3


def test_the_losers_cost_counts_toward_the_budget() -> None:
    state = RunState("run", [StepNode(id="ask", kind="llm", needs=())], dry_run=False)
    state.set_budget("", BudgetLimits(max_tokens=80))
    state.account_reply(
        "ask",
        LlmReply(
            text="x", provider="openai", model="a", usage=Usage(input_tokens=40, output_tokens=10)
        ),
    )
    assert state.over_budget("ask") is None
    note = HedgeNote(
        provider="openai",
        model="b",
        hedge_provider="openai",
        hedge_model="a",
        after_s=1.0,
        reason="slow",
        winner="hedge",
        loser_usage=Usage(input_tokens=40),
        loser_cost_usd=None,
        loser_estimated=True,
    )
    state.account_hedge("ask", note)
    record = state.records["ask"]
    assert record.hedges == [note]
    assert record.usage == Usage(input_tokens=80, output_tokens=10)
    # An unknown price for the loser makes the step's cost unknown, not smaller.
    assert record.cost_usd is None
    hold = state.over_budget("ask")
    assert hold is not None and hold.spent == 90
