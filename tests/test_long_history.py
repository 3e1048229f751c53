"""A long run continues as new with its state, transparently to people and readers."""

from __future__ import annotations

import itertools
import sys
from typing import Any

import pytest
from fakes.progress import runs_of, until

from llmmixer.client.mixer import MixerClient
from llmmixer.workflows.records import StepStatus


@pytest.fixture
def workflow_cache() -> int:
    return 100  # updates on a cache miss: see conftest.workflow_cache


async def test_long_history_continues_as_new_and_keeps_everything(
    mixer: MixerClient, tmp_path: Any
) -> None:
    marker = tmp_path / "go"
    chain = [
        {
            "id": f"c{i}",
            "needs": [f"c{i - 1}"] if i else [],
            "prompt": f"step {i} " + ("{{steps.c" + str(i - 1) + ".output}}" if i else ""),
        }
        for i in range(8)
    ]
    spec = {
        "name": "long",
        "dry_run": True,
        "continue_as_new_after_events": 40,
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini", "retry": {"max_attempts": 1}},
        "steps": [
            *chain,
            {"id": "gate", "kind": "approval", "needs": ["c7"]},
            {
                "id": "flaky",
                "kind": "pty",
                "needs": ["c7"],
                "command": [
                    sys.executable,
                    "-c",
                    f"import os,sys; sys.exit(0 if os.path.exists({str(marker)!r}) else 1)",
                ],
            },
            {"id": "end", "needs": ["gate", "flaky"], "prompt": "{{steps.gate.output}}"},
        ],
    }
    handle = await mixer.start(spec)
    await until(
        handle,
        lambda p: (
            p.steps["gate"].status == StepStatus.WAITING
            and p.steps["flaky"].status == StepStatus.WAITING
        ),
    )
    assert await runs_of(mixer, handle.id) >= 2, "the run did not continue as new"
    marker.write_text("go")
    await handle.retry("flaky")
    await until(handle, lambda p: p.steps["flaky"].status == StepStatus.COMPLETED)
    await handle.approve("gate", comment="carried over")
    result = await handle.result()
    assert result.steps["end"].prompt == "carried over"
    assert all(r.status == StepStatus.COMPLETED for r in result.steps.values())
    assert result.steps["c7"].prompt is not None and "step 7" in result.steps["c7"].prompt
    assert result.steps["gate"].attempts == 1 and result.steps["flaky"].attempts == 2
    assert [i.type for i in result.steps["flaky"].interventions] == ["retry"]
    # one stream across every run: each step started once, offsets without gaps
    events = [e async for e in handle.events()]
    offsets = [e.offset for e in events]
    assert offsets == list(range(len(events)))
    started = [e.step for e in events if e.type.value == "step_started"]
    expected = {step: 1 for step in result.steps} | {"flaky": 2}
    assert {step: started.count(step) for step in result.steps} == expected
    assert [e.type.value for e in events].count("workflow_started") == 1
    assert [e.type.value for e in events][-1] == "workflow_ended"
    assert all(b > a for a, b in itertools.pairwise(offsets))


def _chain_then_gate(steps: int, **gate: Any) -> dict[str, Any]:
    chain = [
        {"id": f"c{i}", "needs": [f"c{i - 1}"] if i else [], "prompt": f"step {i}"}
        for i in range(steps)
    ]
    return {
        "name": "wait-after-chain",
        "dry_run": True,
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini", "retry": {"max_attempts": 1}},
        "steps": [
            *chain,
            {"id": "gate", "kind": "approval", "needs": [f"c{steps - 1}"], **gate},
            {"id": "end", "needs": ["gate"], "prompt": "after {{steps.gate.output}}"},
        ],
    }


async def test_a_run_waiting_for_a_person_on_a_long_history_wakes_from_a_short_one(
    mixer: MixerClient,
) -> None:
    # 20 finished steps are over 100 history events: waking the run would
    # replay them all, so it continues as new before it waits.
    handle = await mixer.start(_chain_then_gate(20))
    await until(handle, lambda p: p.steps["gate"].status == StepStatus.WAITING)
    assert await runs_of(mixer, handle.id) == 2, "the waiting run did not continue as new"
    waiting = await handle.temporal.fetch_history()
    assert len(waiting.events) < 30, f"the waiting run's history has {len(waiting.events)} events"
    progress = await handle.progress()
    assert all(progress.steps[f"c{i}"].status == StepStatus.COMPLETED for i in range(20))
    await handle.approve("gate", comment="go")
    result = await handle.result()
    assert result.steps["end"].prompt == "after go"
    assert all(r.status == StepStatus.COMPLETED for r in result.steps.values())
    started = [e.step async for e in handle.events() if e.type.value == "step_started"]
    assert sorted(started) == sorted(result.steps), "a step ran twice or was lost"


async def test_a_short_run_waits_in_its_own_history(mixer: MixerClient) -> None:
    handle = await mixer.start(_chain_then_gate(2))
    await until(handle, lambda p: p.steps["gate"].status == StepStatus.WAITING)
    assert await runs_of(mixer, handle.id) == 1
    await handle.approve("gate")
    assert (await handle.result()).status.value == "completed"


async def test_a_wait_with_a_deadline_stays_in_its_run(mixer: MixerClient) -> None:
    # Continuing as new would start the approval's clock again (the deadline
    # would move by however long it had waited): the run keeps its history.
    handle = await mixer.start(_chain_then_gate(20, timeout_s=3600, default="approve"))
    await until(handle, lambda p: p.steps["gate"].status == StepStatus.WAITING)
    assert await runs_of(mixer, handle.id) == 1
    await handle.approve("gate")
    assert (await handle.result()).status.value == "completed"
