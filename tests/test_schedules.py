"""``llmmixer schedule``: recurring runs on a real Temporal Schedule (the dev server)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fakes.workers import eventually
from temporalio.client import ScheduleOverlapPolicy
from temporalio.common import SearchAttributeKey
from temporalio.testing import WorkflowEnvironment

from llmmixer.client.cli import build_parser, main
from llmmixer.client.mixer import MixerClient
from llmmixer.client.schedules import MixerSchedule, ScheduleNotFound
from llmmixer.core.validation import SpecError
from llmmixer.workflows.records import RunStatus

NIGHTLY = {
    "name": "nightly-report",
    "description": "what changed since the last slot",
    "dry_run": True,
    "inputs": {"team": "platform"},
    "steps": [
        {
            "id": "report",
            "provider": "openai",
            "model": "gpt-4.1-mini",
            "prompt": "Report for {{inputs.team}} covering the slot {{inputs.scheduled_time}}.",
        }
    ],
    "output": "slot {{inputs.scheduled_time}}: {{steps.report.output}}",
}


async def test_a_schedule_is_created_triggered_listed_paused_and_deleted(
    mixer: MixerClient,
) -> None:
    name = f"nightly-{uuid.uuid4().hex[:8]}"
    created = await mixer.create_schedule(name, NIGHTLY, cron="0 3 * * *", overlap="buffer")
    try:
        assert created.name == name
        assert created.spec == "nightly-report"
        assert created.cron == ["0 3 * * *"]
        assert created.overlap == "buffer"
        assert not created.paused
        # The next slot is the next 03:00 UTC.
        assert created.next_runs and created.next_runs[0].astimezone(UTC).hour == 3
        raw = await mixer.temporal.get_schedule_handle(name).describe()
        assert raw.schedule.policy.overlap == ScheduleOverlapPolicy.BUFFER_ONE

        before = datetime.now(UTC) - timedelta(seconds=5)
        await mixer.trigger_schedule(name)
        described = await eventually(
            lambda: mixer.describe_schedule(name),
            lambda found: bool(found.recent_runs),
            "the triggered run",
        )
        run = described.recent_runs[0]
        assert run.workflow_id.startswith(f"{name}-")
        result = await mixer.get_handle(run.workflow_id).result()
        assert result.status == RunStatus.COMPLETED
        # The run read its scheduled time: Temporal's, to the second, in UTC.
        stamp = run.scheduled_at.astimezone(UTC).replace(microsecond=0)
        expected = stamp.replace(tzinfo=None).isoformat() + "Z"
        assert result.output is not None
        assert result.output.startswith(f"slot {expected}: ")
        assert f"covering the slot {expected}" in result.output
        assert before <= run.scheduled_at.astimezone(UTC) <= datetime.now(UTC)
        started = await mixer.get_handle(run.workflow_id).temporal.describe()
        attributes = started.typed_search_attributes
        scheduled_by = attributes.get(SearchAttributeKey.for_keyword("TemporalScheduledById"))
        assert scheduled_by == name
        assert await started.memo_value("spec") == "nightly-report"
        assert await started.memo_value("description") == "what changed since the last slot"

        listed = await eventually(
            mixer.list_schedules,
            lambda found: any(s.name == name for s in found),
            "the schedule in the list",
        )
        entry = next(s for s in listed if s.name == name)
        assert (entry.spec, entry.cron, entry.paused) == ("nightly-report", ["0 3 * * *"], False)

        await mixer.pause_schedule(name, note="freeze week")
        paused = await mixer.describe_schedule(name)
        assert paused.paused and paused.note == "freeze week"
        await mixer.unpause_schedule(name)
        assert not (await mixer.describe_schedule(name)).paused
    finally:
        await mixer.delete_schedule(name)
    with pytest.raises(ScheduleNotFound, match="llmmixer schedule list"):
        await mixer.describe_schedule(name)
    with pytest.raises(ScheduleNotFound):
        await mixer.trigger_schedule(name)


async def test_a_given_scheduled_time_is_not_replaced(mixer: MixerClient) -> None:
    name = f"fixed-{uuid.uuid4().hex[:8]}"
    await mixer.create_schedule(
        name, NIGHTLY, cron="0 3 * * *", inputs={"scheduled_time": "last-week"}
    )
    try:
        await mixer.trigger_schedule(name)
        described: MixerSchedule = await eventually(
            lambda: mixer.describe_schedule(name),
            lambda found: bool(found.recent_runs),
            "the triggered run",
        )
        result = await mixer.get_handle(described.recent_runs[0].workflow_id).result()
        assert result.output is not None and result.output.startswith("slot last-week: ")
    finally:
        await mixer.delete_schedule(name)


async def test_a_run_not_started_by_a_schedule_keeps_the_input_empty(mixer: MixerClient) -> None:
    spec = {**NIGHTLY, "inputs": {"team": "platform", "scheduled_time": ""}}
    handle = await mixer.start(spec)
    result = await handle.result()
    assert result.output is not None and result.output.startswith("slot : ")


async def test_an_invalid_spec_creates_no_schedule(mixer: MixerClient) -> None:
    name = f"broken-{uuid.uuid4().hex[:8]}"
    broken = {**NIGHTLY, "steps": [{**NIGHTLY["steps"][0], "prompt": "{{inputs.nope}}"}]}  # type: ignore[dict-item]
    with pytest.raises(SpecError, match="nope"):
        await mixer.create_schedule(name, broken, cron="0 3 * * *")
    with pytest.raises(ScheduleNotFound):
        await mixer.describe_schedule(name)


def test_the_cli_parses_every_schedule_action() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["schedule", "create", "weekly", "deps.yaml", "--cron", "0 9 * * 1", "--input", "a=b"]
    )
    assert (args.schedule_command, args.name, args.spec, args.cron, args.overlap) == (
        "create",
        "weekly",
        "deps.yaml",
        ["0 9 * * 1"],
        "skip",
    )
    for action in ("describe", "pause", "unpause", "trigger", "delete"):
        assert parser.parse_args(["schedule", action, "weekly"]).name == "weekly"
    with pytest.raises(SystemExit):
        parser.parse_args(["schedule", "create", "weekly", "deps.yaml"])  # no --cron
    with pytest.raises(SystemExit):
        parser.parse_args(
            ["schedule", "create", "w", "d.yaml", "--cron", "* * * * *", "--overlap", "x"]
        )


async def test_the_schedule_commands_round_trip(
    env: WorkflowEnvironment,
    mixer: MixerClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("TEMPORAL_ADDRESS", env.client.service_client.config.target_host)
    monkeypatch.setenv("LLMMIXER_TASK_QUEUE", mixer.task_queue)
    spec = tmp_path / "nightly.json"
    spec.write_text(json.dumps(NIGHTLY))
    name = f"cli-{uuid.uuid4().hex[:8]}"

    def cli(*arguments: str) -> Awaitable[int]:
        return asyncio.to_thread(main, ["schedule", *arguments])

    create = ["create", name, str(spec), "--cron", "0 9 * * 1", "--input", "team=data"]
    assert await cli(*create) == 0
    assert f"created schedule {name}" in capsys.readouterr().out
    assert await cli("trigger", name) == 0
    assert "triggered" in capsys.readouterr().out
    found = await eventually(
        lambda: mixer.describe_schedule(name), lambda s: bool(s.recent_runs), "the run"
    )
    result = await mixer.get_handle(found.recent_runs[0].workflow_id).result()
    assert result.output is not None and "Report for data" in result.output
    assert await cli("describe", name, "--json") == 0
    described = json.loads(capsys.readouterr().out)
    assert (described["spec"], described["cron"]) == ("nightly-report", ["0 9 * * 1"])
    assert described["recent_runs"][0]["scheduled_at"].endswith("Z")
    assert await cli("pause", name, "--note", "holiday") == 0
    assert (await mixer.describe_schedule(name)).paused
    assert await cli("delete", name) == 0
    capsys.readouterr()
    assert await cli("describe", name) == 1
    assert "no schedule named" in capsys.readouterr().err
