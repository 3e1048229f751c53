"""Separate task queues for LLM and PTY work (README "Worker settings", "Scaling out").

``LLMMIXER_WORKER_ROLES`` chooses what a worker registers, and
``LLMMIXER_PTY_TASK_QUEUE`` (written into the spec by ``MixerClient``) moves
PTY and agent activities onto a queue of their own. The end-to-end test runs
two real ``llmmixer worker`` processes against the session's Temporal server
and reads from history which one ran what.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from fakes.workers import WorkerProcesses, eventually, worker_environment
from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from llmmixer.activities.terminal.policy import CommandPolicy
from llmmixer.client.mixer import MixerClient
from llmmixer.core.contracts import (
    AGENT_ACTIVITY,
    CHECK_PLAN_ACTIVITY,
    CHECK_SPEC_ACTIVITY,
    HEDGE_COST_ACTIVITY,
    LLM_ACTIVITY,
    MCP_CALL_ACTIVITY,
    MCP_LIST_ACTIVITY,
    PTY_ACTIVITY,
    TOOL_COMMAND_ACTIVITY,
)
from llmmixer.core.search import SEARCH_ATTRIBUTES_ACTIVITY
from llmmixer.workers.worker import (
    ALL_ROLES,
    WorkerSettings,
    mixer_worker,
    parse_roles,
)
from llmmixer.workflows.records import RunStatus, StepStatus

MARKER = "ran-on-the-pty-worker"


def _spec() -> dict[str, Any]:
    return {
        "name": "roles",
        "defaults": {"provider": "openai", "model": "gpt-4.1", "on_failure": "fail"},
        "steps": [
            {"id": "cmd", "kind": "pty", "command": [sys.executable, "-c", f"print('{MARKER}')"]},
            # Dry run: answered offline, but still by the LLM activity.
            {"id": "sum", "needs": ["cmd"], "prompt": "{{steps.cmd.output}}"},
        ],
    }


# ---- settings ------------------------------------------------------------------------


def test_roles_default_to_all_and_refuse_unknown_names() -> None:
    assert parse_roles("") == ALL_ROLES
    assert parse_roles(" pty , LLM ") == {"pty", "llm"}
    with pytest.raises(
        ValueError, match=r"LLMMIXER_WORKER_ROLES.*'gpu' is not one of workflows, llm, pty"
    ):
        parse_roles("llm,gpu")
    settings = WorkerSettings.from_env(
        {"LLMMIXER_WORKER_ROLES": "pty", "LLMMIXER_PTY_TASK_QUEUE": "commands"}
    )
    assert settings.roles == {"pty"} and settings.pty_queue == "commands"
    assert WorkerSettings.from_env({}).pty_queue == "llmmixer"


# Local activities of the workflow: registered wherever MixerWorkflow is.
CHECKS = {CHECK_SPEC_ACTIVITY, CHECK_PLAN_ACTIVITY, SEARCH_ATTRIBUTES_ACTIVITY}
# A provider call, and the price of a hedged call's cancelled loser.
LLM = {LLM_ACTIVITY, HEDGE_COST_ACTIVITY}
# Everything that starts a program: commands, agents, and tools of llm steps.
COMMANDS = {
    PTY_ACTIVITY,
    AGENT_ACTIVITY,
    TOOL_COMMAND_ACTIVITY,
    MCP_LIST_ACTIVITY,
    MCP_CALL_ACTIVITY,
}


def _registered(worker: Any) -> tuple[str, set[str], set[str]]:
    # The active config: workflows and activities arrive through the plugin.
    config = worker.config(active_config=True)
    workflows = {getattr(w, "__name__", str(w)) for w in config["workflows"]}
    activities = {fn.__temporal_activity_definition.name for fn in config["activities"]}
    return config["task_queue"], workflows, activities


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        # Default: everything on the one queue.
        ({}, [("q", {"MixerWorkflow"}, {*CHECKS, *LLM, *COMMANDS})]),
        # All roles and a PTY queue: one process polls both queues.
        (
            {"LLMMIXER_PTY_TASK_QUEUE": "q-pty"},
            [
                ("q", {"MixerWorkflow"}, {*CHECKS, *LLM}),
                ("q-pty", set(), COMMANDS),
            ],
        ),
        (
            {"LLMMIXER_WORKER_ROLES": "workflows,llm", "LLMMIXER_PTY_TASK_QUEUE": "q-pty"},
            [("q", {"MixerWorkflow"}, {*CHECKS, *LLM})],
        ),
        (
            {"LLMMIXER_WORKER_ROLES": "pty", "LLMMIXER_PTY_TASK_QUEUE": "q-pty"},
            [("q-pty", set(), COMMANDS)],
        ),
    ],
)
async def test_each_role_registers_on_its_queue(
    client: Client,
    task_queue: str,
    environ: dict[str, str],
    expected: list[tuple[str, set[str], set[str]]],
) -> None:
    # A queue name of this test's own: the SDK refuses a second worker object
    # for a queue that one not yet shut down already polls.
    def unique(queue: str) -> str:
        return queue.replace("q", task_queue, 1)

    environ = {key: unique(value) if "QUEUE" in key else value for key, value in environ.items()}
    environ["LLMMIXER_TASK_QUEUE"] = task_queue
    settings = WorkerSettings.from_env(environ)
    policy = CommandPolicy.from_env({})
    async with mixer_worker(client, settings, environ=environ, command_policy=policy) as worker:
        found = [_registered(w) for w in worker.workers]
    assert found == [(unique(queue), *names) for queue, *names in expected]


# ---- two real workers ----------------------------------------------------------------


async def test_pty_steps_wait_for_and_run_on_the_pty_worker(
    env: WorkflowEnvironment, task_queue: str, tmp_path: Path
) -> None:
    address = env.client.service_client.config.target_host
    pty_queue = f"{task_queue}-pty"
    split = {"LLMMIXER_PTY_TASK_QUEUE": pty_queue}
    base = worker_environment(address, task_queue, tmp_path)
    async with WorkerProcesses(env.client, tmp_path, base) as workers:
        llm_worker = await workers.start(env={**split, "LLMMIXER_WORKER_ROLES": "workflows,llm"})
        mixer = MixerClient(env.client, task_queue, pty_task_queue=pty_queue)
        handle = await mixer.start(
            _spec(), workflow_id=f"roles-{uuid.uuid4().hex[:8]}", dry_run=True
        )

        async def pending() -> list[Any]:
            description = await handle.temporal.describe()
            return list(description.raw_description.pending_activities)

        # With no PTY worker the command's activity is scheduled and stays
        # there: no attempt fails, the run keeps running.
        await eventually(pending, lambda found: len(found) == 1, "the PTY activity scheduled")
        await asyncio.sleep(3)
        [activity] = await pending()
        assert activity.activity_type.name == PTY_ACTIVITY
        assert activity.state == PendingActivityState.PENDING_ACTIVITY_STATE_SCHEDULED
        assert activity.attempt == 1 and not activity.HasField("last_failure")
        progress = await handle.progress()
        assert progress.status == RunStatus.RUNNING
        assert progress.steps["cmd"].status in (StepStatus.PENDING, StepStatus.RUNNING)

        pty_worker = await workers.start(
            pty_queue,
            env={**split, "LLMMIXER_WORKER_ROLES": "pty"},
            activity_only=True,
        )
        result = await asyncio.wait_for(handle.result(), 30)
        assert result.status == RunStatus.COMPLETED
        assert MARKER in result.steps["cmd"].output
        assert result.steps["cmd"].attempts == 1

        scheduled: dict[int, tuple[str, str]] = {}
        started: dict[str, str] = {}
        workflow_task_workers: set[str] = set()
        async for event in handle.temporal.fetch_history_events():
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                attributes = event.activity_task_scheduled_event_attributes
                scheduled[event.event_id] = (
                    attributes.activity_type.name,
                    attributes.task_queue.name,
                )
            elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                attributes = event.activity_task_started_event_attributes
                name, _ = scheduled[attributes.scheduled_event_id]
                started[name] = attributes.identity
            elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
                workflow_task_workers.add(event.workflow_task_started_event_attributes.identity)
        queues = dict(scheduled.values())
        assert queues == {PTY_ACTIVITY: pty_queue, LLM_ACTIVITY: task_queue}
        assert started == {PTY_ACTIVITY: pty_worker.identity, LLM_ACTIVITY: llm_worker.identity}
        assert workflow_task_workers == {llm_worker.identity}
