"""`llmmixer audit` covers every part of a run: agent steps, checks, budget raises, and
every run of a long run that continued as new, as one record.

Each test compares the audit with the run's own result, so a step, an
attempt or an intervention the audit lost shows up as a difference.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import temporal_binary
from fakes.progress import runs_of, until, waiting
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowHistory

from llmmixer.client.audit import (
    AuditError,
    audit_from_client,
    audit_histories,
    audit_history,
    load_history,
    render_markdown,
)
from llmmixer.client.mixer import MixerClient
from llmmixer.runtime.connection import data_converter
from llmmixer.workflows.records import RunProgress, RunStatus, StepStatus

FAKE_CLAUDE = f"""#!{sys.executable}
import sys
input("Do you trust the files in this folder? (y/n) ")
print("DONE:", sys.argv[-1])
"""


@pytest.fixture
def workflow_cache() -> int:
    return 100  # updates on a cache miss: see conftest.workflow_cache


@pytest.fixture
def worker_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    claude = bin_dir / "claude"
    claude.write_text(FAKE_CLAUDE)
    claude.chmod(claude.stat().st_mode | stat.S_IEXEC)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "LLMMIXER_PTY_ALLOW": "*",
        "LLMMIXER_AGENT_TRUST_FOLDERS": "1",
    }


def _agrees_with_the_result(audit: dict[str, Any], result: RunProgress) -> None:
    assert set(audit["steps"]) == set(result.steps)
    for step_id, record in result.steps.items():
        step = audit["steps"][step_id]
        assert step["status"] == record.status.value, step_id
        assert step["output"] == record.output, step_id
        if record.kind != "approval":  # waiting for a person runs no activity
            assert len(step["attempts"]) == record.attempts, step_id
        assert step["usage"] == record.usage.model_dump(), step_id
        assert [i["type"] for i in step["interventions"]] == [
            i.type for i in record.interventions
        ], step_id


async def test_agent_steps_checks_and_budget_raises_are_in_the_audit(
    mixer: MixerClient, tmp_path: Path
) -> None:
    spec = {
        "name": "agent-audit",
        "budget": {"max_tokens": 1},
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
        "steps": [
            {"id": "plan", "prompt": "plan the change"},
            {"id": "split", "kind": "decompose", "prompt": "split the work"},
            {
                "id": "code",
                "kind": "agent",
                "agent": "claude-code",
                "needs": ["plan"],
                "prompt": "do it after {{steps.plan.output}}",
                "cwd": str(tmp_path),
            },
        ],
    }
    handle = await mixer.start(spec, dry_run=True)  # LLM steps offline, the agent for real
    await until(handle, waiting("code"), "the agent step held by the budget")
    await handle.raise_budget(max_tokens=100_000)
    result = await handle.result()
    assert result.status == RunStatus.COMPLETED

    audit = await audit_from_client(mixer.temporal, handle.id)
    assert audit["status"] == "completed" and audit["runs"] == [audit["run_id"]]
    assert audit["unhandled"] == [] and audit["warnings"] == []
    _agrees_with_the_result(audit, result)

    code = audit["steps"]["code"]
    assert code["kind"] == "agent" and code["agent"] == "claude-code"
    plan_output = result.steps["plan"].output
    assert code["prompt"] == f"do it after {plan_output}"  # rendered, as sent
    assert "DONE: do it after" in code["output"]
    assert code["parameters"]["cwd"] == str(tmp_path)
    [attempt] = code["attempts"]
    assert attempt["outcome"] == "completed" and attempt["started"] and attempt["ended"]

    [raised] = audit["interventions"]
    assert (raised["type"], raised["via"], raised["accepted"]) == ("raise_budget", "update", True)
    assert raised["argument"] == {"step": "", "max_tokens": 100_000}
    assert raised["result"]["max_tokens"] == 100_000 and raised["time"]

    planned = sorted(s for s, record in result.steps.items() if record.parent == "split")
    assert planned, "the plan created no step"
    spec_check, plan_check = audit["checks"]
    assert (spec_check["activity"], spec_check["outcome"]) == ("llmmixer.check_spec", "completed")
    assert spec_check["issues"] == []
    assert (plan_check["activity"], plan_check["step"]) == ("llmmixer.check_plan", "split")
    assert sorted(plan_check["planned_steps"]) == planned
    assert audit["steps"]["split"]["checks"] == [plan_check]
    for step_id in planned:
        assert audit["steps"][step_id]["prompt"], step_id

    markdown = render_markdown(audit)
    assert "raise_budget via update" in markdown
    assert "check of the plan of split: passed" in markdown
    assert "| code | agent | completed |" in markdown


SPEC_CONTINUED: dict[str, Any] = {
    "name": "long-audit",
    "dry_run": True,
    # Low enough that the run hands over after `first`, high enough that it
    # waits for the retry of `first` in its first run (16 events then).
    "continue_as_new_after_events": 30,
    "defaults": {"provider": "openai", "model": "gpt-4.1-mini", "retry": {"max_attempts": 1}},
}


async def _continued_run(mixer: MixerClient, marker: Path) -> tuple[str, RunProgress]:
    spec = {
        **SPEC_CONTINUED,
        "steps": [
            {
                "id": "first",
                "kind": "pty",
                "command": [
                    sys.executable,
                    "-c",
                    f"import os,sys; sys.exit(0 if os.path.exists({str(marker)!r}) else 1)",
                ],
            },
            *[
                {"id": f"c{i}", "needs": [f"c{i - 1}" if i else "first"], "prompt": f"step {i}"}
                for i in range(6)
            ],
            {"id": "gate", "kind": "approval", "needs": ["c5"]},
        ],
    }
    handle = await mixer.start(spec)
    await until(handle, waiting("first"), "first failed and waits")
    assert await runs_of(mixer, handle.id) == 1
    # A signal no handler knows: the audit must list it, not drop it.
    await handle.temporal.signal("poke", {"step": "first"})
    await handle.temporal.signal("skip", {"step": "ghost"})  # no such step
    await asyncio.to_thread(marker.write_text, "go")
    await handle.retry("first")
    await until(handle, waiting("gate"), "the gate waits", within_s=60)
    assert await runs_of(mixer, handle.id) >= 2, "the run did not continue as new"
    await handle.temporal.signal("approve", {"step": "gate", "comment": "after the hand-over"})
    result = await handle.result()
    assert all(r.status == StepStatus.COMPLETED for r in result.steps.values())
    return handle.id, result


async def test_the_audit_of_a_run_that_continued_as_new_covers_every_run(
    mixer: MixerClient, client: Client, tmp_path: Path
) -> None:
    workflow_id, result = await _continued_run(mixer, tmp_path / "go")
    audit = await audit_from_client(mixer.temporal, workflow_id)

    runs = audit["runs"]
    assert len(runs) == await runs_of(mixer, workflow_id) >= 2
    latest = await mixer.temporal.get_workflow_handle(workflow_id).fetch_history()
    first_run = latest.events[0].workflow_execution_started_event_attributes.first_execution_run_id
    assert runs[0] == first_run and runs[-1] == latest.run_id == audit["run_id"]
    assert [run["status"] for run in audit["chain"]] == ["continued_as_new"] * (len(runs) - 1) + [
        "completed"
    ]
    assert audit["status"] == "completed"
    _agrees_with_the_result(audit, result)

    # What happened before the hand-over is only in the first run's history.
    first = audit["steps"]["first"]
    assert [a["outcome"] for a in first["attempts"]] == ["failed", "completed"]
    assert {a["run_id"] for a in first["attempts"]} == {runs[0]}
    [retry] = first["interventions"]
    assert (retry["type"], retry["accepted"], retry["run_id"]) == ("retry", True, runs[0])
    assert audit["steps"]["c5"]["prompt"] == "step 5"
    assert audit["steps"]["c5"]["attempts"][0]["run_id"] != runs[0]
    [approval] = audit["steps"]["gate"]["interventions"]
    assert (approval["via"], approval["accepted"], approval["run_id"]) == (
        "signal",
        True,
        runs[-1],
    )
    assert audit["steps"]["gate"]["output"] == "after the hand-over"
    [poke] = audit["unhandled"]
    assert (poke["event_type"], poke["name"], poke["run_id"]) == (
        "EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED",
        "poke",
        runs[0],
    )
    assert any("unhandled" in warning for warning in audit["warnings"])
    [ghost] = audit["interventions"]  # the run's, not a step of its own
    assert (ghost["type"], ghost["argument"], ghost["accepted"]) == (
        "skip",
        {"step": "ghost"},
        False,
    )
    assert "ghost" in ghost["reason"]
    assert [c["run_id"] for c in audit["checks"]] == [runs[0]]  # a continuation is not rechecked

    # Any run of the chain leads to the same record.
    assert await audit_from_client(mixer.temporal, workflow_id, runs[0]) == audit
    markdown = render_markdown(audit)
    assert f"`{runs[0]}`" in markdown and "not understood" in markdown and "poke" in markdown

    # Exported histories, one file per run, in any order: the same record.
    address = client.service_client.config.target_host
    files: list[Path] = []
    for run_id in reversed(runs):
        show = [temporal_binary(), "workflow", "show", "--workflow-id", workflow_id]
        exported = await asyncio.to_thread(
            _run, [*show, "--run-id", run_id, "--address", address, "-o", "json"]
        )
        assert exported.returncode == 0, exported.stderr
        files.append(tmp_path / f"{run_id}.json")
        await asyncio.to_thread(files[-1].write_text, exported.stdout)
    histories = [load_history(path, workflow_id) for path in files]
    assert await audit_histories(histories, data_converter()) == audit

    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "LLMMIXER_HOME": str(tmp_path),
    }
    cli = [sys.executable, "-m", "llmmixer.client.cli", "audit", workflow_id]
    for path in files:
        cli += ["--history", str(path)]
    done = await asyncio.to_thread(_run, cli, env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == audit

    # Only the last run's file: the record says what is missing and how to get it.
    alone = await audit_history(histories[0], data_converter())
    assert alone["runs"] == [runs[-1]]
    assert any(runs[-2] in w and "--run-id" in w for w in alone["warnings"])


async def test_an_event_the_audit_does_not_know_is_listed(mixer: MixerClient) -> None:
    handle = await mixer.start(
        {
            "name": "small",
            "dry_run": True,
            "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
            "steps": [{"id": "a", "prompt": "hi"}],
        },
    )
    await handle.result()
    history = await handle.temporal.fetch_history()
    # An event type from a newer server that this audit has no handler for.
    strange = HistoryEvent(
        event_id=len(history.events) + 1,
        event_type=EventType.EVENT_TYPE_NEXUS_OPERATION_SCHEDULED,
    )
    events = [*history.events[:-1], strange, history.events[-1]]
    audit = await audit_history(WorkflowHistory(history.workflow_id, events), data_converter())
    [listed] = audit["unhandled"]
    assert listed["event_type"] == "EVENT_TYPE_NEXUS_OPERATION_SCHEDULED"
    assert listed["event_id"] == strange.event_id
    assert audit["steps"]["a"]["status"] == "completed"  # the rest is still read
    assert "not understood**: EVENT_TYPE_NEXUS_OPERATION_SCHEDULED" in render_markdown(audit)

    with pytest.raises(AuditError, match=r"not on the server.*llmmixer list"):
        await audit_from_client(mixer.temporal, f"{handle.id}-no-such-run")


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=False)
