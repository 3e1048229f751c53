"""`llmmixer audit`: a run's record rebuilt from its Temporal history matches what happened.

One run exercises everything the audit must reconstruct: Temporal retries
(two 503s, then an answer), a fallback after a refused request, a command
that fails and is overridden by a person, a signal the workflow rejected and
an update it refused. The audit is compared with the fake provider's record
of what was sent and with the run's own result.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import temporal_binary
from fakes.progress import until
from fakes.provider_server import FakeProviderServer, Reply
from temporalio.client import Client

from llmmixer.client.audit import audit_from_client, audit_history, load_history, render_markdown
from llmmixer.client.mixer import InterventionRefused, MixerClient, MixerHandle
from llmmixer.core.contracts import Usage
from llmmixer.runtime.connection import data_converter
from llmmixer.workflows.records import RunProgress, RunStatus, StepStatus


@pytest.fixture
def worker_env(provider_server: FakeProviderServer) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), **provider_server.env()}


@pytest.fixture
def workflow_cache() -> int:
    # Updates in this test need a workflow cache (see tests/conftest.py).
    return 100


SPEC: dict[str, Any] = {
    "name": "audited",
    "inputs": {"topic": "audits"},
    "defaults": {
        "retry": {"max_attempts": 3, "initial_interval_s": 0.1, "backoff": 1.0},
        "max_tokens": 256,
    },
    "steps": [
        {
            "id": "plan",
            "provider": "openai",
            "model": "gpt-4.1-mini",
            "system": "be terse",
            "prompt": "Plan {{inputs.topic}}",
            "temperature": 0.5,
        },
        {
            "id": "review",
            "provider": "anthropic",
            "model": "claude-haiku-4-5",
            "needs": ["plan"],
            "prompt": "Review: {{steps.plan.output}}",
            "fallback": [{"provider": "gemini", "model": "gemini-2.5-flash"}],
        },
        {
            "id": "check",
            "kind": "pty",
            "command": ["false"],
            "retry": {"max_attempts": 1},
        },
    ],
}


@pytest.fixture
async def audited_run(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> tuple[MixerHandle, RunProgress]:
    provider_server.fail("openai", 503, message="overloaded", times=2)
    provider_server.script("openai", Reply(text="the plan", usage=(12, 4)))
    provider_server.fail("anthropic", 400, message="bad request: prompt rejected")
    provider_server.script("gemini", Reply(text="looks good", usage=(5, 3)))
    handle = await mixer.start(SPEC, workflow_id=f"audited-{os.urandom(4).hex()}")
    await until(
        handle,
        lambda p: (
            p.steps["check"].status == StepStatus.WAITING
            and p.steps["review"].status == StepStatus.COMPLETED
        ),
    )
    # Refused: plan is completed. A signal is recorded as rejected; an update fails.
    await handle.temporal.signal("skip", {"step": "plan", "reason": "too slow"})
    with pytest.raises(InterventionRefused):
        await handle.override("plan", output="not allowed")
    await handle.override("check", output="checked by hand")
    result = await handle.result()
    assert result.status == RunStatus.COMPLETED
    return handle, result


async def test_audit_matches_what_happened(
    audited_run: tuple[MixerHandle, RunProgress],
    mixer: MixerClient,
    provider_server: FakeProviderServer,
) -> None:
    handle, result = audited_run
    audit = await audit_from_client(mixer.temporal, handle.id)
    assert audit["workflow_id"] == handle.id
    assert audit["status"] == "completed"
    assert audit["name"] == "audited"
    assert set(audit["steps"]) == {"plan", "review", "check"}
    # One run, every event understood, its spec check recorded.
    assert audit["runs"] == [audit["run_id"]]
    assert audit["unhandled"] == [] and audit["warnings"] == []
    assert [(c["activity"], c["issues"]) for c in audit["checks"]] == [("llmmixer.check_spec", [])]
    assert audit["interventions"] == []  # nothing aimed at the run as a whole

    plan = audit["steps"]["plan"]
    assert (plan["provider"], plan["model"]) == ("openai", "gpt-4.1-mini")
    assert plan["prompt"] == "Plan audits"  # rendered, as sent
    assert plan["system"] == "be terse"
    assert plan["parameters"]["max_tokens"] == 256
    assert plan["parameters"]["temperature"] == 0.5
    assert plan["output"] == "the plan"
    assert plan["usage"] == Usage(input_tokens=12, output_tokens=4).model_dump()
    assert plan["cost_usd"] == pytest.approx(result.steps["plan"].cost_usd)
    attempts = plan["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["outcome"] for a in attempts] == ["failed", "failed", "completed"]
    assert attempts[0]["recorded"] is False and attempts[0]["started"] is None
    assert "overloaded" in attempts[1]["error"]  # the failure before the last attempt
    assert attempts[2]["started"] and attempts[2]["ended"] and attempts[2]["error"] is None
    assert attempts[2]["started"] <= attempts[2]["ended"]
    skip, override = plan["interventions"]
    assert (skip["type"], skip["via"], skip["accepted"]) == ("skip", "signal", False)
    assert skip["argument"] == {"step": "plan", "reason": "too slow"}
    assert skip["reason"]  # why the workflow rejected it
    assert (override["type"], override["via"], override["accepted"]) == (
        "override",
        "update",
        False,
    )
    assert "plan" in override["reason"]

    review = audit["steps"]["review"]
    assert (review["provider"], review["model"]) == ("gemini", "gemini-2.5-flash")
    assert review["prompt"] == "Review: the plan"
    assert review["output"] == "looks good"
    assert [(a["provider"], a["outcome"]) for a in review["attempts"]] == [
        ("anthropic", "failed"),
        ("gemini", "completed"),
    ]
    assert review["attempts"][0]["error_type"] == "ProviderRejected"
    assert "prompt rejected" in review["attempts"][0]["error"]

    check = audit["steps"]["check"]
    assert check["kind"] == "pty"
    assert check["prompt"] == "false"
    assert check["status"] == "completed" and check["overridden"] is True
    assert check["output"] == "checked by hand"
    assert [(a["outcome"], a["error_type"]) for a in check["attempts"]] == [
        ("failed", "CommandFailed")
    ]
    [by_hand] = check["interventions"]
    assert by_hand["argument"] == {"step": "check", "output": "checked by hand"}
    assert by_hand["accepted"] is True and by_hand["time"]

    # The audit agrees with the run's own record on everything both hold.
    for step_id, record in result.steps.items():
        step = audit["steps"][step_id]
        assert step["status"] == record.status.value, step_id
        assert step["output"] == record.output, step_id
        assert len(step["attempts"]) == record.attempts, step_id
        assert step["usage"] == record.usage.model_dump(), step_id
        assert step["cost_usd"] == pytest.approx(record.cost_usd), step_id
    assert audit["usage"]["input_tokens"] == result.usage.input_tokens
    assert audit["usage"]["output_tokens"] == result.usage.output_tokens
    # ...and with what the providers received.
    assert provider_server.count("openai") == 3
    assert provider_server.calls[-1].provider == "gemini"

    markdown = render_markdown(audit)
    assert "# Audit of " + handle.id in markdown
    assert "checked by hand" in markdown
    assert "| review | llm | completed | gemini/gemini-2.5-flash | 2 |" in markdown


async def test_audit_of_an_exported_history_through_the_cli(
    audited_run: tuple[MixerHandle, RunProgress],
    mixer: MixerClient,
    client: Client,
    tmp_path: Path,
) -> None:
    handle, _ = audited_run
    address = client.service_client.config.target_host
    show = [temporal_binary(), "workflow", "show", "--workflow-id", handle.id]
    exported = await asyncio.to_thread(_run, [*show, "--address", address, "-o", "json"])
    assert exported.returncode == 0, exported.stderr
    history_file = tmp_path / "run.json"
    await asyncio.to_thread(history_file.write_text, exported.stdout)
    from_server = await audit_from_client(mixer.temporal, handle.id)
    history = await asyncio.to_thread(load_history, history_file, handle.id)
    from_file = await audit_history(history, data_converter())
    assert from_file == from_server

    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LLMMIXER_HOME": str(tmp_path)}
    cli = [sys.executable, "-m", "llmmixer.client.cli", "audit", handle.id]
    done = await asyncio.to_thread(_run, [*cli, "--history", str(history_file)], env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == from_server
    markdown = await asyncio.to_thread(
        _run, [*cli, "--history", str(history_file), "--format", "md"], env
    )
    assert markdown.returncode == 0, markdown.stderr
    assert markdown.stdout.startswith(f"# Audit of {handle.id}")

    broken = tmp_path / "broken.json"
    await asyncio.to_thread(broken.write_text, "{not json")
    refused = await asyncio.to_thread(_run, [*cli, "--history", str(broken)], env)
    assert refused.returncode == 1
    assert "temporal workflow show -o json" in refused.stderr


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=False)
