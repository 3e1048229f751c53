"""A bug while running a step fails that step; it is never left `running` for ever.

The workflow code is made to raise where no step expects it: its template
renderer (a pure helper every step calls) raises for one prompt, as a
hostile plan or a bug might make it. Workers run without a cache, so every
workflow task replays the history written so far, patch markers included.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fakes.progress import until, waiting
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, RetryState
from temporalio.worker.workflow_sandbox import RestrictedWorkflowAccessError
from temporalio.workflow import NondeterminismError

from llmmixer.client.mixer import MixerClient, RunFailed
from llmmixer.workflows.records import RunStatus, StepStatus
from llmmixer.workflows.steps import base as steps_base
from llmmixer.workflows.steps.runner import belongs_to_temporal

TRIGGER = "BOOM"


@pytest.fixture(autouse=True)
def broken_renderer(monkeypatch: pytest.MonkeyPatch) -> None:
    real = steps_base.render

    def render(text: str, *args: Any) -> str:
        if TRIGGER in text:
            raise KeyError("no-such-output")
        if "DEEP" in text:
            raise RecursionError("maximum recursion depth exceeded")
        if text.startswith("Part 2 of 3"):  # the dry-run planner's second sub-step
            raise TypeError("unsupported operand")
        return real(text, *args)

    # Every step renders through it; the worker runs this very module (the
    # workflow runs outside the sandbox), so the runs use the broken renderer.
    monkeypatch.setattr(steps_base, "render", render)


def spec(boom: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": "step-errors",
        "dry_run": True,
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
        "steps": [
            {"id": "boom", "prompt": f"{TRIGGER} {{{{inputs.x}}}}", **boom},
            {"id": "after", "needs": ["boom"], "prompt": "after [{{steps.boom.output}}]"},
        ],
        "inputs": {"x": "y"},
        **extra,
    }


async def test_an_unexpected_error_fails_the_step_and_on_failure_skip_goes_on(
    mixer: MixerClient,
) -> None:
    handle = await mixer.start(spec({"on_failure": "skip"}))
    # Before, the step stayed `running` and the run never ended.
    result = await asyncio.wait_for(handle.result(), timeout=60)
    assert result.status == RunStatus.COMPLETED
    boom = result.steps["boom"]
    assert boom.status == StepStatus.SKIPPED
    assert boom.skipped_reason is not None
    assert "llmmixer could not run this step (KeyError: 'no-such-output')" in boom.skipped_reason
    assert result.steps["after"].status == StepStatus.COMPLETED


async def test_on_failure_fail_fails_the_run_naming_the_error(mixer: MixerClient) -> None:
    handle = await mixer.start(spec({"on_failure": "fail", "prompt": "DEEP"}))
    with pytest.raises(RunFailed) as caught:
        await asyncio.wait_for(handle.result(), timeout=60)
    assert "step boom failed: llmmixer could not run this step (RecursionError" in str(caught.value)
    progress = await handle.progress()
    assert progress.steps["boom"].status == StepStatus.FAILED
    assert progress.steps["after"].status == StepStatus.PENDING


async def test_paused_by_default_then_a_retry_with_a_new_prompt_completes(
    mixer: MixerClient,
) -> None:
    handle = await mixer.start(spec({}))
    progress = await until(handle, waiting("boom"), "boom waits for a person")
    reason = progress.steps["boom"].waiting_reason or ""
    assert reason.startswith("failed: llmmixer could not run this step (KeyError")
    await handle.retry("boom", prompt="fine now")
    result = await asyncio.wait_for(handle.result(), timeout=60)
    assert result.status == RunStatus.COMPLETED
    assert result.steps["boom"].status == StepStatus.COMPLETED
    assert "fine now" in (result.steps["boom"].output or "")


async def test_a_planned_step_that_breaks_the_workflow_fails_alone(mixer: MixerClient) -> None:
    raw = {
        "name": "plan-errors",
        "dry_run": True,
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini", "on_failure": "skip"},
        "steps": [
            {"id": "split", "kind": "decompose", "prompt": "Split the work"},
            {"id": "end", "needs": ["split"], "prompt": "{{steps.split.children}}"},
        ],
    }
    result = await asyncio.wait_for((await mixer.start(raw)).result(), timeout=60)
    assert result.status == RunStatus.COMPLETED
    broken = result.steps["split-2"]
    assert broken.status == StepStatus.SKIPPED
    assert "(TypeError: unsupported operand)" in (broken.skipped_reason or "")
    assert result.steps["split-1"].status == result.steps["split-3"].status
    assert result.steps["split-1"].status == StepStatus.COMPLETED
    assert result.steps["end"].status == StepStatus.COMPLETED


def test_temporal_and_cancellation_errors_are_never_taken_for_a_step_failure() -> None:
    escapes = belongs_to_temporal
    assert escapes(NondeterminismError("replay diverged"))
    assert escapes(RestrictedWorkflowAccessError("os.environ"))
    assert escapes(asyncio.CancelledError())
    assert escapes(CancelledError("cancelled"))
    cancelled_activity = ActivityError(
        "x",
        scheduled_event_id=1,
        started_event_id=2,
        identity="w",
        activity_type="t",
        activity_id="1",
        retry_state=RetryState.CANCEL_REQUESTED,
    )
    cancelled_activity.__cause__ = CancelledError("cancelled")
    assert escapes(cancelled_activity)
    assert not escapes(KeyError("x"))
    assert not escapes(RecursionError())
    assert not escapes(ApplicationError("a failure of the step's own"))
