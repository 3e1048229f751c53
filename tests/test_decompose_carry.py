"""Steps created by a plan, and a budget hold, survive continue-as-new."""

from __future__ import annotations

import pytest
from fakes.progress import runs_of, until

from llmmixer.client.mixer import MixerClient
from llmmixer.workflows.records import RunProgress, RunStatus, StepStatus


@pytest.fixture
def workflow_cache() -> int:
    return 100  # updates on a cache miss: see conftest.workflow_cache


async def test_planned_steps_held_by_a_budget_are_carried_to_the_next_run(
    mixer: MixerClient,
) -> None:
    spec = {
        "name": "carry-plan",
        "dry_run": True,
        "continue_as_new_after_events": 20,
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
        "routes": {
            "a": [{"provider": "anthropic", "model": "claude-haiku-4-5"}],
            "b": [{"provider": "gemini", "model": "gemini-2.5-flash"}],
        },
        # the planner's own call spends more than this: every sub-step is held
        "budget": {"max_tokens": 100},
        "steps": [
            {"id": "split", "kind": "decompose", "prompt": "Split the work"},
            {"id": "end", "needs": ["split"], "prompt": "{{steps.split.children}}"},
        ],
    }
    handle = await mixer.start(spec)
    subs = ["split-1", "split-2", "split-3"]

    def all_held(progress: RunProgress) -> bool:
        return all(
            i in progress.steps
            and progress.steps[i].status == StepStatus.WAITING
            and (progress.steps[i].waiting_reason or "").startswith("budget:")
            for i in subs
        )

    await until(handle, all_held, "the sub-steps wait for the budget")
    # A retry while the budget is spent leaves a step held, but each one adds
    # to the history until the run hands over to a continuation.
    for _ in range(30):
        if await runs_of(mixer, handle.id) >= 2:
            break
        await handle.retry("split-1")
    assert await runs_of(mixer, handle.id) >= 2, "the run did not continue as new"
    progress = await until(handle, all_held, "held again in the continuation")
    assert all(progress.steps[i].parent == "split" for i in subs)
    await handle.raise_budget(max_tokens=1_000_000)
    result = await handle.result()
    assert result.status == RunStatus.COMPLETED
    assert list(result.steps) == ["split", *subs, "end"]
    assert {result.steps[i].provider for i in subs} == {"anthropic", "gemini"}
    end = result.steps["end"]
    assert end.prompt is not None and all(f"## {i}\n" in end.prompt for i in subs)
