"""People in the loop: pause, retry, skip, override, approve, reject (docs/interventions.md)."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from fakes.progress import until, waiting
from temporalio.client import WorkflowHandle

from llmmixer.client.mixer import InterventionRefused, MixerClient
from llmmixer.workflows.records import InterventionRequest, RunStatus, StepStatus


def flaky_then_dependant(marker: str) -> dict[str, Any]:
    """`flaky` fails until the file `marker` exists; `after` echoes its output."""
    script = (
        "import os, sys\n"
        f"if not os.path.exists({marker!r}): print('not yet'); sys.exit(1)\n"
        "print('flaky ok')\n"
    )
    return {
        "name": "pause",
        "defaults": {"retry": {"max_attempts": 1}},
        "steps": [
            {"id": "flaky", "kind": "pty", "command": [sys.executable, "-c", script]},
            {"id": "free", "kind": "pty", "command": [sys.executable, "-c", "print('free')"]},
            {
                "id": "after",
                "kind": "pty",
                "needs": ["flaky"],
                "command": [
                    sys.executable,
                    "-c",
                    "import sys; print('got', sys.argv[1])",
                    "{{steps.flaky.output}}",
                ],
            },
        ],
    }


@pytest.fixture
def workflow_cache() -> int:
    return 100  # see conftest.workflow_cache


async def test_pause_then_retry_from_the_failed_step(mixer: MixerClient, tmp_path: Any) -> None:
    marker = tmp_path / "ready"
    handle = await mixer.start(flaky_then_dependant(str(marker)))
    progress = await until(
        handle, lambda p: waiting("flaky")(p) and p.steps["free"].status == StepStatus.COMPLETED
    )
    # independent steps kept running; the dependant waits; the run says waiting
    assert progress.status == RunStatus.WAITING and progress.needs_person
    assert progress.steps["after"].status == StepStatus.PENDING
    assert "exit" in (progress.steps["flaky"].error or "")
    description = await handle.temporal.describe()
    assert description.raw_description.workflow_extended_info is not None

    marker.write_text("go")
    outcome = await handle.retry("flaky")
    assert outcome.action == "retry"
    result = await handle.result()
    assert result.steps["flaky"].attempts == 2
    assert [i.type for i in result.steps["flaky"].interventions] == ["retry"]
    assert (result.steps["after"].output or "").strip() == "got flaky ok"


async def test_retry_with_a_new_prompt_is_recorded(mixer: MixerClient) -> None:
    spec = {
        "name": "newprompt",
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini", "retry": {"max_attempts": 1}},
        # no OPENAI_API_KEY on the test worker: the call fails at once (non-retryable)
        "steps": [{"id": "ask", "prompt": "first prompt"}],
    }
    handle = await mixer.start(spec)
    progress = await until(handle, waiting("ask"))
    assert "OPENAI_API_KEY" in (progress.steps["ask"].error or "")
    assert progress.steps["ask"].attempts == 1
    await handle.retry("ask", prompt="second prompt")
    progress = await until(handle, lambda p: p.steps["ask"].attempts == 2 and waiting("ask")(p))
    assert progress.steps["ask"].prompt == "second prompt"
    assert progress.steps["ask"].interventions[0].argument == {
        "step": "ask",
        "prompt": "second prompt",
    }
    await handle.override("ask", "typed by a person")
    result = await handle.result()
    assert result.steps["ask"].overridden is True
    assert result.output == "typed by a person"


async def test_skip_lets_dependants_run_with_an_empty_output(
    mixer: MixerClient, tmp_path: Any
) -> None:
    handle = await mixer.start(flaky_then_dependant(str(tmp_path / "never")))
    await until(handle, waiting("flaky"))
    outcome = await handle.skip("flaky", reason="not needed today")
    assert outcome.status == StepStatus.SKIPPED
    result = await handle.result()
    assert result.steps["flaky"].status == StepStatus.SKIPPED
    assert result.steps["flaky"].skipped_reason == "not needed today"
    assert (result.steps["after"].output or "").strip() == "got"


async def test_override_a_pending_step_before_it_runs(mixer: MixerClient, tmp_path: Any) -> None:
    handle = await mixer.start(flaky_then_dependant(str(tmp_path / "never")))
    await until(handle, waiting("flaky"))
    await handle.override("after", "set by hand")
    await handle.override("flaky", "also by hand")
    result = await handle.result()
    assert result.steps["after"].output == "set by hand" and result.steps["after"].overridden
    assert result.steps["after"].attempts == 0  # it never ran


async def test_updates_refuse_unknown_steps_and_wrong_states(
    mixer: MixerClient, tmp_path: Any
) -> None:
    handle = await mixer.start(flaky_then_dependant(str(tmp_path / "never")))
    await until(
        handle, lambda p: waiting("flaky")(p) and p.steps["free"].status == StepStatus.COMPLETED
    )
    with pytest.raises(InterventionRefused, match="no step 'nope'"):
        await handle.retry("nope")
    with pytest.raises(InterventionRefused, match="it is completed"):
        await handle.skip("free")
    with pytest.raises(InterventionRefused, match="not an approval"):
        await handle.approve("flaky")
    with pytest.raises(InterventionRefused, match="it is pending"):
        await handle.retry("after")
    # refused updates changed nothing and left no trace in the step records
    progress = await handle.progress()
    assert progress.steps["flaky"].status == StepStatus.WAITING
    assert all(not r.interventions for r in progress.steps.values())
    await handle.skip("flaky")
    await handle.result()


async def test_signals_that_cannot_apply_are_recorded_as_rejected(
    mixer: MixerClient, tmp_path: Any
) -> None:
    handle = await mixer.start(flaky_then_dependant(str(tmp_path / "never")))
    await until(
        handle, lambda p: waiting("flaky")(p) and p.steps["free"].status == StepStatus.COMPLETED
    )
    raw: WorkflowHandle[Any, Any] = handle.temporal
    await raw.signal("skip", InterventionRequest(step="free", reason="too late"))
    await raw.signal("retry", InterventionRequest(step="ghost"))
    await raw.signal("skip", InterventionRequest(step="flaky", reason="via signal"))
    result = await handle.result()
    assert result.status == RunStatus.COMPLETED
    rejected = result.steps["free"].interventions
    assert len(rejected) == 1 and rejected[0].accepted is False
    assert "it is completed" in (rejected[0].reason or "")
    assert result.steps["flaky"].skipped_reason == "via signal"
    events = [event async for event in handle.events()]
    kinds = [(e.type.value, e.step) for e in events]
    assert ("intervention_rejected", "free") in kinds
    assert ("intervention_rejected", "ghost") in kinds
    assert ("intervention_accepted", "flaky") in kinds


async def test_approval_gate_approve_and_reject(mixer: MixerClient) -> None:
    spec = {
        "name": "gate",
        "steps": [
            {"id": "gate", "kind": "approval", "prompt": "Ship it?"},
            {
                "id": "ship",
                "kind": "pty",
                "needs": ["gate"],
                "command": [
                    sys.executable,
                    "-c",
                    "import sys; print(sys.argv[1])",
                    "{{steps.gate.output}}",
                ],
            },
        ],
    }
    handle = await mixer.start(spec)
    progress = await until(handle, waiting("gate"))
    assert progress.steps["gate"].waiting_reason == "approval: Ship it?"
    await handle.reject("gate", reason="tests are red")
    progress = await until(
        handle, lambda p: "rejected: tests are red" in (p.steps["gate"].error or "")
    )
    assert progress.steps["gate"].status == StepStatus.WAITING  # on_failure pause
    await handle.approve("gate", comment="fixed, go")
    result = await handle.result()
    assert (result.steps["ship"].output or "").strip() == "fixed, go"
    assert [i.type for i in result.steps["gate"].interventions] == ["reject", "approve"]


async def test_approval_timeout_applies_the_default(mixer: MixerClient) -> None:
    spec = {
        "name": "gate-timeout",
        "steps": [
            {"id": "yes", "kind": "approval", "timeout_s": 1, "default": "approve"},
            {
                "id": "no",
                "kind": "approval",
                "timeout_s": 1,
                "default": "reject",
                "on_failure": "skip",
            },
        ],
    }
    result = await (await mixer.start(spec)).result()
    assert result.steps["yes"].status == StepStatus.COMPLETED
    assert "approved by default" in (result.steps["yes"].output or "")
    assert result.steps["no"].status == StepStatus.SKIPPED
    assert "rejected by default" in (result.steps["no"].skipped_reason or "")


async def test_pause_timeout_turns_a_forgotten_pause_into_a_failure(mixer: MixerClient) -> None:
    spec = {
        "name": "forgotten",
        "defaults": {"pause_timeout_s": 1, "retry": {"max_attempts": 1}},
        "steps": [
            {"id": "bad", "kind": "pty", "command": [sys.executable, "-c", "raise SystemExit(1)"]}
        ],
    }
    handle = await mixer.start(spec)
    from llmmixer.client.mixer import RunFailed

    with pytest.raises(RunFailed, match="pause_timeout_s"):
        await handle.result()
