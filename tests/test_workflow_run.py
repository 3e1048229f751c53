"""MixerWorkflow on a real Temporal dev server: the DAG, templates, results."""

from __future__ import annotations

import itertools
import sys
import uuid
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError

from llmmixer.client.mixer import MixerClient, RunFailed
from llmmixer.workflows.records import RunStatus, StepStatus


def dry_spec(**extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "fan",
        "inputs": {"topic": "durability"},
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
        "dry_run": True,
        "steps": [
            {"id": "a", "prompt": "start {{inputs.topic}}"},
            {"id": "b", "needs": ["a"], "prompt": "B sees {{steps.a.output}}"},
            {
                "id": "c",
                "needs": ["a"],
                "provider": "anthropic",
                "model": "claude-haiku-4-5",
                "prompt": "C",
            },
            {
                "id": "d",
                "needs": ["b", "c"],
                "prompt": "join {{steps.b.output}} | {{steps.c.output}}",
            },
        ],
        "output": "final: {{steps.d.output}}",
    }
    spec.update(extra)
    return spec


async def test_dry_run_dag_completes_with_the_contract_result(mixer: MixerClient) -> None:
    handle = await mixer.start(dry_spec())
    result = await handle.result()
    assert result.status == RunStatus.COMPLETED
    assert set(result.steps) == {"a", "b", "c", "d"}
    for record in result.steps.values():
        assert record.status == StepStatus.COMPLETED
        assert record.attempts == 1
        assert record.dry_run is True
        assert record.output and record.output.startswith("[dry-run]")
    # templates carried each output into the next prompt, rendered exactly once
    assert "prompt was: start durability" in (result.steps["a"].output or "")
    assert result.steps["b"].prompt is not None
    assert result.steps["b"].prompt.startswith("B sees [dry-run] openai/gpt-4.1-mini")
    assert result.steps["c"].provider == "anthropic"
    assert result.output is not None and result.output.startswith("final: [dry-run]")
    assert result.usage.input_tokens == sum(r.usage.input_tokens for r in result.steps.values())
    assert result.usage.output_tokens > 0
    # the result's public shape (docs/interventions.md), as plain JSON
    body = result.model_dump(mode="json")
    assert {"status", "output", "steps", "usage"} <= set(body)
    assert {
        "status",
        "attempts",
        "output",
        "error",
        "overridden",
        "provider",
        "model",
        "usage",
        "cost_usd",
    } <= set(body["steps"]["a"])
    assert set(body["usage"]) >= {"input_tokens", "output_tokens", "cost_usd"}


async def test_without_output_template_the_result_is_the_last_steps_output(
    mixer: MixerClient,
) -> None:
    spec = dry_spec()
    del spec["output"]
    result = await (await mixer.start(spec)).result()
    assert result.output == result.steps["d"].output


async def test_progress_query_while_running_and_after(mixer: MixerClient) -> None:
    handle = await mixer.start(dry_spec())
    early = await handle.progress()
    assert early.name == "fan" and set(early.steps) == {"a", "b", "c", "d"}
    await handle.result()
    late = await handle.progress()
    assert late.status == RunStatus.COMPLETED


def _slow_step(step_id: str, seconds: float, needs: list[str] | None = None) -> dict[str, Any]:
    return {
        "id": step_id,
        "kind": "pty",
        "needs": needs or [],
        "command": [
            sys.executable,
            "-c",
            f"import time; time.sleep({seconds}); print('{step_id}')",
        ],
    }


async def test_parallel_steps_really_overlap(mixer: MixerClient) -> None:
    spec = {
        "name": "overlap",
        "steps": [
            _slow_step("root", 0.1),
            *[_slow_step(f"w{i}", 1.5, ["root"]) for i in range(3)],
            _slow_step("join", 0.1, ["w0", "w1", "w2"]),
        ],
    }
    result = await (await mixer.start(spec)).result()
    workers = [result.steps[f"w{i}"] for i in range(3)]
    latest_start = max(r.started_at for r in workers if r.started_at)
    earliest_end = min(r.ended_at for r in workers if r.ended_at)
    assert latest_start < earliest_end, "the three middle steps did not run at the same time"
    join = result.steps["join"]
    assert join.started_at is not None and join.started_at >= max(
        r.ended_at for r in workers if r.ended_at
    )
    assert result.steps["w0"].output is not None and result.steps["w0"].output.strip() == "w0"


async def test_max_parallel_one_serialises_the_middle(mixer: MixerClient) -> None:
    spec = {
        "name": "serial",
        "max_parallel": 1,
        "steps": [_slow_step(f"w{i}", 0.3) for i in range(3)],
    }
    result = await (await mixer.start(spec)).result()
    spans = sorted(
        (r.started_at, r.ended_at) for r in result.steps.values() if r.started_at and r.ended_at
    )
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end


async def test_on_failure_skip_goes_on_and_fail_fails_the_run(mixer: MixerClient) -> None:
    failing = {
        "id": "bad",
        "kind": "pty",
        "command": [sys.executable, "-c", "raise SystemExit(3)"],
        "retry": {"max_attempts": 1},
    }
    skip_spec = {
        "name": "skipper",
        "steps": [
            {**failing, "on_failure": "skip"},
            {
                "id": "after",
                "kind": "pty",
                "needs": ["bad"],
                "command": [
                    sys.executable,
                    "-c",
                    "import sys; print(repr(sys.argv[1]))",
                    "{{steps.bad.output}}",
                ],
            },
        ],
    }
    result = await (await mixer.start(skip_spec)).result()
    assert result.steps["bad"].status == StepStatus.SKIPPED
    assert result.steps["bad"].skipped_reason and "exit" in result.steps["bad"].skipped_reason
    assert result.steps["after"].output is not None
    assert result.steps["after"].output.strip() == "''"

    fail_spec = {
        "name": "failer",
        "steps": [
            {**failing, "on_failure": "fail"},
            {**_slow_step("other", 0.1), "needs": ["bad"]},
        ],
    }
    handle = await mixer.start(fail_spec)
    with pytest.raises(RunFailed) as caught:
        await handle.result()
    assert "step bad failed" in str(caught.value)
    progress = await handle.progress()
    assert progress.status == RunStatus.FAILED
    assert progress.steps["bad"].status == StepStatus.FAILED
    assert progress.steps["other"].status == StepStatus.PENDING


async def test_invalid_spec_fails_the_run_at_once_with_the_validation_message(
    mixer: MixerClient, client: Client
) -> None:
    bad = {
        "name": "bad",
        "steps": [
            {
                "id": "a",
                "kind": "llm",
                "provider": "mistral",
                "model": "m",
                "prompt": "{{steps.zz.output}}",
            }
        ],
    }
    handle = await client.start_workflow(
        "MixerWorkflow", bad, id=f"bad-{uuid.uuid4().hex[:6]}", task_queue=mixer.task_queue
    )
    with pytest.raises(WorkflowFailureError) as caught:
        await handle.result()
    message = str(caught.value.cause)
    assert "invalid spec" in message
    assert "step a: provider: unknown provider 'mistral'" in message
    history = await handle.fetch_history()
    task_failures = [
        e for e in history.events if e.HasField("workflow_task_failed_event_attributes")
    ]
    assert task_failures == [], "a bad spec must fail the run, not retry the workflow task"
