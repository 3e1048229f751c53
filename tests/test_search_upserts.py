"""Search attributes are written when a run's state changes, not after every step.

Each upsert is a history event and a visibility write; ops teams filter on the
run's state and waiting steps, and cost, tokens and providers ride along.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.converter import decode_typed_search_attributes

from llmmixer.client.mixer import MixerClient, MixerHandle
from llmmixer.client.setup import list_query, register_search_attributes
from llmmixer.workflows.records import RunProgress, StepStatus
from llmmixer.workflows.search import SEARCH_REFRESH, RunAttributes, upsert_due

LLM = {"provider": "openai", "model": "gpt-4.1-mini"}


@pytest.fixture
async def registered(client: Client) -> Client:
    """The session server's namespace with llmmixer's attributes, as `llmmixer setup` leaves it."""
    await register_search_attributes(client, client.namespace)
    return client


def _chain(name: str, size: int) -> dict[str, Any]:
    steps = [
        {"id": f"s{i}", **LLM, "prompt": f"step {i}", **({"needs": [f"s{i - 1}"]} if i else {})}
        for i in range(size)
    ]
    return {"name": name, "dry_run": True, "steps": steps}


async def _upserts(handle: WorkflowHandle[Any, Any]) -> list[dict[str, Any]]:
    """The values each upsert event of the run's history set, in order.

    The SDK adds one per ``workflow.patched()`` id at the run's start
    (``TemporalChangeVersion``), a fixed number whatever the run does.
    """
    history = await handle.fetch_history()
    found = []
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
            attributes = event.upsert_workflow_search_attributes_event_attributes
            typed = decode_typed_search_attributes(attributes.search_attributes)
            found.append({pair.key.name: pair.value for pair in typed})
    return found


def _ours(upserts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [u for u in upserts if any(name.startswith("Llmmixer") for name in u)]


async def _attributes(handle: MixerHandle) -> dict[str, Any]:
    described = await handle.temporal.describe()
    return {pair.key.name: pair.value for pair in described.typed_search_attributes}


def _totals(progress: RunProgress) -> tuple[float, int, list[str]]:
    records = progress.steps.values()
    cost = round(sum(r.cost_usd or 0.0 for r in records), 6)
    tokens = sum(r.usage.input_tokens + r.usage.output_tokens for r in records)
    return cost, tokens, sorted({r.provider for r in records if r.provider})


async def _found(client: Client, query: str, want: str, timeout_s: float = 30) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if want in {execution.id async for execution in client.list_workflows(query)}:
            return True
        await asyncio.sleep(0.3)
    return False


async def test_a_chain_upserts_at_its_start_and_end_whatever_its_length(
    registered: Client, mixer: MixerClient
) -> None:
    counts = {}
    for size in (3, 6):
        name = f"chain{size}-{uuid.uuid4().hex[:8]}"
        handle = await mixer.start(_chain(name, size))
        result = await handle.result()
        upserts = await _upserts(handle.temporal)
        counts[size] = len(upserts)
        # Ops teams see the run running, then its end: no write per step.
        ours = _ours(upserts)
        assert [u.get("LlmmixerState") for u in ours] == ["running", "completed"], ours

        # The end carries the run's final cost, tokens and providers.
        cost, tokens, providers = _totals(result)
        assert tokens > 0
        attributes = await _attributes(handle)
        assert attributes["LlmmixerState"] == "completed"
        assert attributes["LlmmixerSpec"] == name
        assert attributes["LlmmixerTokens"] == tokens
        assert attributes["LlmmixerCostUsd"] == pytest.approx(cost)
        assert attributes["LlmmixerProviders"] == providers == ["openai"]
        query = (
            f'LlmmixerSpec="{name}" AND LlmmixerState="completed" AND LlmmixerTokens={tokens}'
            f" AND LlmmixerCostUsd>={cost - 1e-6}"
        )
        assert await _found(registered, query, handle.id), query
    # Every history event costs a run time; these no longer grow with its steps.
    assert counts[3] == counts[6], counts


async def test_a_run_at_an_approval_gate_shows_waiting_with_its_cost_so_far(
    registered: Client, mixer: MixerClient
) -> None:
    name = f"gate-{uuid.uuid4().hex[:8]}"
    spec = {
        "name": name,
        "dry_run": True,
        "steps": [
            {"id": "ask", **LLM, "prompt": "draft"},
            {"id": "gate", "kind": "approval", "needs": ["ask"], "prompt": "ship it?"},
            {"id": "after", **LLM, "needs": ["gate"], "prompt": "ship"},
        ],
    }
    handle = await mixer.start(spec)
    query = f'LlmmixerSpec="{name}" AND LlmmixerState="waiting"'
    assert await _found(registered, query, handle.id), query
    progress = await handle.progress()
    assert progress.steps["ask"].status == StepStatus.COMPLETED
    cost, tokens, providers = _totals(progress)
    assert tokens > 0
    waiting = await _attributes(handle)
    assert waiting["LlmmixerWaitingSteps"] == ["gate"]
    assert waiting["LlmmixerTokens"] == tokens
    assert waiting["LlmmixerCostUsd"] == pytest.approx(cost)
    assert waiting["LlmmixerProviders"] == providers

    await handle.approve("gate")
    result = await handle.result()
    states = [u.get("LlmmixerState") for u in _ours(await _upserts(handle.temporal))]
    # One write when it starts waiting, one when it resumes, one at its end.
    assert states == ["running", "waiting", "running", "completed"]
    ended = await _attributes(handle)
    assert ended["LlmmixerTokens"] == _totals(result)[1] > tokens
    assert "LlmmixerWaitingSteps" not in ended


async def test_a_continuation_starts_with_the_cost_its_parent_had_spent(
    registered: Client, mixer: MixerClient
) -> None:
    name = f"carry-{uuid.uuid4().hex[:8]}"
    spec = _chain(name, 8)
    spec["continue_as_new_after_events"] = 40
    spec["steps"].append({"id": "gate", "kind": "approval", "needs": ["s7"]})
    handle = await mixer.start(spec)
    first_run = (await handle.temporal.describe()).run_id
    query = f'LlmmixerSpec="{name}" AND LlmmixerState="waiting"'
    assert await _found(registered, query, handle.id), query
    latest = mixer.temporal.get_workflow_handle(handle.id)
    described = await latest.describe()
    assert described.run_id != first_run, "the run never continued as new"

    # Before continuing, the first run wrote what it had spent: its
    # continuation starts with that, not with the values of its first step.
    first = mixer.temporal.get_workflow_handle(handle.id, run_id=first_run)
    handed_over = _ours(await _upserts(first))[-1]
    assert handed_over["LlmmixerTokens"] > 0
    ended = (await first.fetch_history()).events[-1]
    second_run = ended.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
    second = await mixer.temporal.get_workflow_handle(handle.id, run_id=second_run).fetch_history()
    started = second.events[0].workflow_execution_started_event_attributes
    inherited = {
        pair.key.name: pair.value
        for pair in decode_typed_search_attributes(started.search_attributes)
    }
    assert inherited["LlmmixerTokens"] == handed_over["LlmmixerTokens"]

    progress: RunProgress = await latest.query("progress", result_type=RunProgress)
    cost, tokens, _ = _totals(progress)
    attributes = {pair.key.name: pair.value for pair in described.typed_search_attributes}
    assert attributes["LlmmixerWaitingSteps"] == ["gate"]
    assert attributes["LlmmixerTokens"] == tokens >= handed_over["LlmmixerTokens"]
    assert attributes["LlmmixerCostUsd"] == pytest.approx(cost)
    await MixerHandle(mixer, handle.id).approve("gate")
    await latest.result()
    final = {
        pair.key.name: pair.value for pair in (await latest.describe()).typed_search_attributes
    }
    assert final["LlmmixerState"] == "completed"
    assert final["LlmmixerTokens"] == tokens


T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
RUNNING = RunAttributes("review", "running", (), ("openai",), 0.5, 100)


def test_cost_alone_is_written_once_the_last_write_is_a_refresh_interval_old() -> None:
    dearer = RunAttributes("review", "running", (), ("anthropic", "openai"), 7.5, 9000)
    assert upsert_due(None, None, RUNNING, T0)  # the run's first write
    assert not upsert_due(RUNNING, T0, RUNNING, T0 + timedelta(hours=1))  # nothing changed
    for later in (timedelta(seconds=1), SEARCH_REFRESH - timedelta(milliseconds=1)):
        assert not upsert_due(RUNNING, T0, dearer, T0 + later)
    assert upsert_due(RUNNING, T0, dearer, T0 + SEARCH_REFRESH)
    assert upsert_due(RUNNING, T0, dearer, T0 + timedelta(minutes=10))
    # Before continuing as new, whatever changed is written.
    assert upsert_due(RUNNING, T0, dearer, T0 + timedelta(seconds=1), flush=True)
    assert not upsert_due(RUNNING, T0, RUNNING, T0 + timedelta(seconds=1), flush=True)


def test_what_ops_teams_filter_on_is_written_at_once() -> None:
    soon = T0 + timedelta(seconds=1)
    waiting = RunAttributes("review", "waiting", ("gate",), ("openai",), 0.5, 100)
    assert upsert_due(RUNNING, T0, waiting, soon)
    two_waiting = RunAttributes("review", "waiting", ("gate", "other"), ("openai",), 0.5, 100)
    assert upsert_due(waiting, T0, two_waiting, soon)
    for end in ("completed", "failed", "cancelled"):
        assert upsert_due(
            RUNNING, T0, RunAttributes("review", end, (), ("openai",), 0.5, 100), soon
        )


async def test_a_run_that_handed_over_before_waiting_is_listed_once_as_waiting(
    registered: Client, mixer: MixerClient
) -> None:
    # Twenty steps make a long history: the run continues as new before its
    # approval waits, and the closed first execution keeps `waiting` in its
    # attributes. `llmmixer list --state waiting` must show the run once.
    name = f"handover-{uuid.uuid4().hex[:8]}"
    spec = {**_chain(name, 20)}
    spec["steps"] = [*spec["steps"], {"id": "gate", "kind": "approval", "needs": ["s19"]}]
    handle = await mixer.start(spec)
    query = list_query("waiting", name)
    assert await _found(registered, query, handle.id), query
    executions = [e async for e in registered.list_workflows(f'LlmmixerSpec="{name}"')]
    assert len(executions) == 2, "the run did not continue as new before waiting"
    listed = [e.run_id async for e in registered.list_workflows(query)]
    assert listed == [(await handle.temporal.describe()).run_id]
    await handle.approve("gate")
    assert (await handle.result()).status.value == "completed"
