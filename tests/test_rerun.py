"""``rerun``: a closed run started again, paying only for what changed.

Real workflows on the dev server; providers are the fake server, which counts
every request, so "reused" means the provider was never asked.
"""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes.progress import runs_of, until
from fakes.provider_server import FakeProviderServer

from llmmixer.client.audit import audit_from_client, render_markdown
from llmmixer.client.cli import build_parser, cmd_rerun, cmd_run
from llmmixer.client.http import ServeSettings, create_app
from llmmixer.client.mixer import MixerClient, RunFailed
from llmmixer.client.rerun import RerunError, SourceRun, reuse_table
from llmmixer.client.setup import register_search_attributes
from llmmixer.core.contracts import EventType
from llmmixer.core.validation import validate_spec
from llmmixer.workflows.records import (
    InterventionRequest,
    ReusedStep,
    RunStatus,
    StepStatus,
)


@pytest.fixture
def worker_env(provider_server: FakeProviderServer) -> dict[str, str]:
    return provider_server.env()


RETRY = {"max_attempts": 1, "initial_interval_s": 0.1, "backoff": 1.0, "max_interval_s": 1}


def pipeline(last_command: list[str]) -> dict[str, Any]:
    """Two LLM steps, a command on their output, and an LLM step after the command."""
    return {
        "name": "pipeline",
        "inputs": {"topic": "ducks"},
        "defaults": {
            "provider": "openai",
            "model": "gpt-4.1-mini",
            "retry": RETRY,
            "on_failure": "fail",
        },
        "steps": [
            {"id": "draft", "prompt": "write about {{inputs.topic}}"},
            {"id": "review", "needs": ["draft"], "prompt": "review: {{steps.draft.output}}"},
            {"id": "check", "kind": "pty", "needs": ["review"], "command": last_command},
            {"id": "summary", "needs": ["check"], "prompt": "sum up: {{steps.check.output}}"},
        ],
    }


async def _failed_source(mixer: MixerClient) -> str:
    handle = await mixer.start(pipeline(["false"]))
    with pytest.raises(RunFailed):
        await handle.result()
    return handle.id


async def test_failed_run_rerun_with_edited_step_reuses_upstream(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    source = await _failed_source(mixer)
    assert provider_server.count() == 2  # draft and review; summary never ran
    source_progress = await mixer.get_handle(source).temporal.query("progress")
    edited = pipeline(["echo", "checked {{steps.review.output}}"])

    rerun = await mixer.rerun(source, spec=edited)
    result = await rerun.result()

    assert result.status == RunStatus.COMPLETED
    # Only the step after the edited one asked the provider.
    assert provider_server.count() == 3
    assert "sum up: checked" in str(provider_server.calls[-1].body)
    steps = result.steps
    assert steps["draft"].reused_from == f"{source}/draft"
    assert steps["review"].reused_from == f"{source}/review"
    assert steps["draft"].output == source_progress["steps"]["draft"]["output"]
    assert steps["draft"].cost_usd == 0 and steps["draft"].usage.input_tokens == 0
    assert steps["draft"].call_hash == source_progress["steps"]["draft"]["call_hash"]
    assert steps["check"].reused_from is None and steps["check"].exit_code == 0
    assert steps["summary"].reused_from is None and steps["summary"].status == "completed"
    completed = {
        event.step: event.data
        async for event in rerun.events()
        if event.type == EventType.STEP_COMPLETED
    }
    assert completed["draft"]["reused_from"] == f"{source}/draft"
    assert "reused_from" not in completed["summary"]
    audit = await audit_from_client(mixer.temporal, rerun.id)
    assert audit["steps"]["review"]["reused_from"] == f"{source}/review"
    assert audit["steps"]["review"]["attempts"] == [] and audit["steps"]["review"]["cost_usd"] == 0
    assert f"Reused from `{source}/review`" in render_markdown(audit)
    assert "reused_from" not in audit["steps"]["summary"]


async def test_from_step_forces_it_and_everything_downstream(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    handle = await mixer.start(pipeline(["echo", "ok {{steps.review.output}}"]))
    await handle.result()
    assert provider_server.count() == 3

    result = await (await handle.rerun(from_steps=["review"])).result()

    assert result.status == RunStatus.COMPLETED
    # review and summary asked again, though their calls did not change.
    assert provider_server.count() == 5
    assert result.steps["draft"].reused_from == f"{handle.id}/draft"
    for step in ("review", "check", "summary"):
        assert result.steps[step].reused_from is None, step
    with pytest.raises(RerunError, match="from_steps: no step 'nope'"):
        await handle.rerun(from_steps=["nope"])


async def test_changed_input_runs_everything_that_reads_it(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    handle = await mixer.start(pipeline(["echo", "ok"]))
    await handle.result()
    assert provider_server.count() == 3

    result = await (await handle.rerun(inputs={"topic": "geese"})).result()

    # draft reads the input, review reads draft: both run; check's command
    # is unchanged, so it and summary (same rendered prompt) are reused.
    assert provider_server.count() == 5
    assert result.steps["draft"].reused_from is None
    assert result.steps["review"].reused_from is None
    assert result.steps["check"].reused_from == f"{handle.id}/check"
    assert result.steps["summary"].reused_from == f"{handle.id}/summary"


async def test_cancelled_run_can_be_rerun(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.hang("openai", model="gpt-4.1")
    spec = pipeline(["echo", "ok"])
    spec["steps"][1]["model"] = "gpt-4.1"
    handle = await mixer.start(spec)
    await until(
        handle,
        lambda p: p.steps["review"].status == StepStatus.RUNNING and provider_server.count() == 2,
        "review asked the provider",
    )
    await handle.cancel()
    with pytest.raises(RunFailed):
        await handle.result()

    result = await (await handle.rerun()).result()

    assert result.status == RunStatus.COMPLETED
    assert result.steps["draft"].reused_from == f"{handle.id}/draft"
    assert result.steps["review"].reused_from is None
    assert provider_server.count() == 4  # review again, and summary


async def test_open_run_is_refused(mixer: MixerClient, provider_server: FakeProviderServer) -> None:
    provider_server.hang("openai")
    handle = await mixer.start(copy.deepcopy(pipeline(["echo", "ok"])))
    await until(handle, lambda p: p.steps["draft"].status == StepStatus.RUNNING, "draft runs")
    with pytest.raises(RerunError, match="still open"):
        await handle.rerun()
    await handle.cancel()


async def test_cli_rerun_prints_the_new_run(
    mixer: MixerClient,
    provider_server: FakeProviderServer,
    task_queue: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    source = await _failed_source(mixer)
    edited = tmp_path / "edited.yaml"
    edited.write_text(json.dumps(pipeline(["echo", "fixed"])), encoding="utf-8")
    monkeypatch.setenv("TEMPORAL_ADDRESS", mixer.temporal.service_client.config.target_host)
    monkeypatch.setenv("LLMMIXER_TASK_QUEUE", task_queue)
    args = build_parser().parse_args(
        ["rerun", source, "--spec", str(edited), "--from", "review", "--input", "topic=ducks"]
    )

    assert await cmd_rerun(args) == 0

    new_id = capsys.readouterr().out.strip()
    assert new_id and new_id != source
    result = await mixer.get_handle(new_id).result()
    assert result.steps["draft"].reused_from == f"{source}/draft"
    assert result.steps["review"].reused_from is None
    assert provider_server.count() == 2 + 2  # review and summary
    missing = build_parser().parse_args(["rerun", source, "--from", "nope"])
    assert await cmd_rerun(missing) == 1
    assert "from_steps: no step 'nope'" in capsys.readouterr().err


async def test_run_reuse_from_takes_unchanged_steps_of_another_run(
    mixer: MixerClient,
    provider_server: FakeProviderServer,
    task_queue: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    source = await _failed_source(mixer)
    edited = tmp_path / "pipeline.yaml"
    edited.write_text(json.dumps(pipeline(["echo", "fixed in place"])), encoding="utf-8")
    monkeypatch.setenv("TEMPORAL_ADDRESS", mixer.temporal.service_client.config.target_host)
    monkeypatch.setenv("LLMMIXER_TASK_QUEUE", task_queue)
    args = build_parser().parse_args(["run", str(edited), "--detach", "--reuse-from", source])

    assert await cmd_run(args) == 0

    result = await mixer.get_handle(capsys.readouterr().out.strip()).result()
    assert result.steps["draft"].reused_from == f"{source}/draft"
    assert result.steps["review"].reused_from == f"{source}/review"
    assert result.steps["check"].output is not None
    assert "fixed in place" in result.steps["check"].output
    assert provider_server.count() == 2 + 1  # summary only


async def test_a_chain_that_continued_as_new_is_rerun_from_all_its_runs(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    chain = [
        {
            "id": f"c{i}",
            "needs": [f"c{i - 1}"] if i else [],
            "prompt": f"step {i} " + ("{{steps.c" + str(i - 1) + ".output}}" if i else ""),
        }
        for i in range(6)
    ]
    spec = pipeline(["false"])
    spec["continue_as_new_after_events"] = 40
    spec["steps"] = [
        *chain,
        {"id": "gate", "kind": "approval", "needs": ["c5"]},
        {"id": "last", "kind": "pty", "needs": ["gate"], "command": ["false"]},
    ]
    handle = await mixer.start(spec)
    await until(handle, lambda p: p.steps["gate"].status == StepStatus.WAITING, "gate waits")
    assert await runs_of(mixer, handle.id) >= 2, "the run did not continue as new"
    # A signal, not the update: this file's worker keeps no cache, so every
    # task replays (see conftest.workflow_cache).
    await handle.temporal.signal("approve", InterventionRequest(step="gate"))
    with pytest.raises(RunFailed):
        await handle.result()
    assert provider_server.count() == 6

    edited = copy.deepcopy(spec)
    edited["steps"][-1]["command"] = ["echo", "done"]
    rerun = await handle.rerun(spec=edited)
    result = await rerun.result()

    assert result.status == RunStatus.COMPLETED
    assert provider_server.count() == 6  # every LLM step came from the first run's history
    assert all(result.steps[f"c{i}"].reused_from == f"{handle.id}/c{i}" for i in range(6))
    # The gate was approved on the same question and inputs: not asked again.
    assert result.steps["gate"].reused_from == f"{handle.id}/gate"
    assert result.steps["last"].output is not None and "done" in result.steps["last"].output


async def test_http_rerun_starts_a_new_run_and_refuses_bad_requests(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    source = await _failed_source(mixer)
    app = create_app(mixer, ServeSettings(token="rerun-test-token-0123456789"))
    auth = {"Authorization": "Bearer rerun-test-token-0123456789"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        edited = pipeline(["echo", "over http"])
        response = await http.post(
            f"/workflows/{source}/rerun", json={"spec": edited}, headers=auth
        )
        assert response.status_code == 201, response.text
        started = response.json()
        result = await mixer.get_handle(started["workflow_id"]).result()
        assert result.steps["review"].reused_from == f"{source}/review"
        assert provider_server.count() == 3

        unknown = await http.post(
            f"/workflows/{source}/rerun", json={"from_steps": ["nope"]}, headers=auth
        )
        assert unknown.status_code == 422
        assert "from_steps: no step 'nope'" in unknown.json()["errors"][0]
        missing = await http.post("/workflows/no-such-run/rerun", json={}, headers=auth)
        assert missing.status_code == 404
        anonymous = await http.post(f"/workflows/{source}/rerun", json={})
        assert anonymous.status_code == 401


async def test_the_new_run_names_its_source_in_llmmixer_fork_of(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    # Registered before the runs start: a run asks once which attributes exist.
    await register_search_attributes(mixer.temporal, mixer.temporal.namespace)
    source = await _failed_source(mixer)
    rerun = await mixer.rerun(source, spec=pipeline(["echo", "ok"]))
    await rerun.result()

    query = f'LlmmixerForkOf="{source}"'
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    found: set[str] = set()
    while rerun.id not in found and loop.time() < deadline:
        found = {execution.id async for execution in mixer.temporal.list_workflows(query)}
        await asyncio.sleep(0.3)
    assert found == {rerun.id}


def test_forcing_a_decompose_step_drops_every_planned_step_of_the_source() -> None:
    spec = validate_spec(
        {
            "name": "plans",
            "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
            "steps": [
                {"id": "first", "prompt": "a"},
                {"id": "plan", "kind": "decompose", "needs": ["first"], "prompt": "split"},
                {"id": "after", "needs": ["plan"], "prompt": "b"},
            ],
        }
    )
    entry = ReusedStep(call_hash="sha256:0", output="x", source="src/first")
    source = SourceRun(
        "src", {}, {"first": entry, "plan.part1": entry.model_copy(), "after": entry.model_copy()}
    )
    assert set(reuse_table(source, spec, []).steps) == {"first", "plan.part1", "after"}
    # The plan may differ this time: a planned step of the old plan is not reused.
    forced = reuse_table(source, spec, ["plan"])
    assert set(forced.steps) == {"first"} and forced.source == "src"


async def test_a_failed_reruns_audit_shows_its_reused_steps_and_its_rerun_reuses_them(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    source = await _failed_source(mixer)
    source_progress = await mixer.get_handle(source).temporal.query("progress")

    # The same spec again: the command fails again, so the re-run has no result.
    rerun = await mixer.rerun(source)
    with pytest.raises(RunFailed):
        await rerun.result()
    assert provider_server.count() == 2

    audit = await audit_from_client(mixer.temporal, rerun.id)
    for step in ("draft", "review"):
        assert audit["steps"][step]["reused_from"] == f"{source}/{step}", step
        assert audit["steps"][step]["status"] == "completed"
        assert audit["steps"][step]["output"] == source_progress["steps"][step]["output"]
    assert audit["steps"]["check"]["status"] == "failed"
    assert "reused_from" not in audit["steps"]["check"]
    assert f"Reused from `{source}/draft`" in render_markdown(audit)

    # A re-run of that re-run: the steps it reused are reused again, from the
    # run that made them (the reuse table its start carries, and its memo).
    again = await mixer.rerun(rerun.id, spec=pipeline(["echo", "fixed"]))
    result = await again.result()
    assert result.status == RunStatus.COMPLETED
    assert provider_server.count() == 3  # only summary asked
    assert result.steps["draft"].reused_from == f"{source}/draft"
    assert result.steps["review"].reused_from == f"{source}/review"
