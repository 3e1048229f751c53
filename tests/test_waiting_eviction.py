"""Runs that only wait for people leave the worker's workflow cache, and wake intact.

A cached run holds its workflow object, its state and the SDK's bookkeeping;
a worker with many thousands of runs waiting for approvals would hold them
all for nothing. The worker
evicts a run once it has nothing running and only waits (an approval, a
spent budget); a decision then replays its history and the run goes on.
Each test first sees the run leave the cache of a real worker (the old
code kept every waiting run cached), then wakes it through the public client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from temporalio.client import Client

from llmmixer.client.mixer import MixerClient, MixerHandle
from llmmixer.workers.worker import MixerWorker, WorkerSettings, mixer_worker
from llmmixer.workflows.records import RunStatus, StepStatus


@pytest.fixture
async def cached_worker(
    client: Client, task_queue: str, worker_env: dict[str, str]
) -> AsyncIterator[MixerWorker]:
    """A worker with a workflow cache, as every deployed worker has."""
    environ = {"LLMMIXER_PTY_ALLOW": "*", **worker_env}
    settings = dataclasses.replace(
        WorkerSettings.from_env(environ), task_queue=task_queue, shutdown_grace_s=2.0
    )
    async with (
        mixer_worker(client, settings, environ=environ, max_cached_workflows=100) as worker,
        worker,
    ):
        yield worker


def cached_runs(worker: MixerWorker) -> set[str]:
    # The SDK keeps a worker's cached runs here (temporalio 1.35).
    workflows = worker.workers[0]._workflow_worker
    assert workflows is not None
    return set(workflows._running_workflows)


async def until(check: Callable[[], Any], what: str, within_s: float = 30.0) -> None:
    async with asyncio.timeout(within_s):
        while True:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.1)
    raise AssertionError(what)


async def waiting_then_evicted(worker: MixerWorker, handle: MixerHandle) -> None:
    run_id = (await handle.temporal.describe()).run_id

    async def waiting() -> bool:
        return (await handle.progress()).status == RunStatus.WAITING

    await until(waiting, "the run never waited")
    # The progress query itself brings the run back into the cache: it leaves again.
    await until(lambda: run_id not in cached_runs(worker), "the waiting run stayed cached")


async def test_a_run_waiting_for_an_approval_leaves_the_cache_and_the_approval_wakes_it(
    client: Client, task_queue: str, cached_worker: MixerWorker
) -> None:
    mixer = MixerClient(client, task_queue)
    spec = {
        "name": "evicted-approval",
        "dry_run": True,
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
        "steps": [
            {"id": "draft", "prompt": "write it"},
            {"id": "gate", "kind": "approval", "needs": ["draft"], "prompt": "Ship?"},
            {"id": "after", "needs": ["gate"], "prompt": "ship {{steps.draft.output}}"},
        ],
    }
    handle = await mixer.start(spec, workflow_id=f"evict-{uuid.uuid4().hex[:8]}")
    await waiting_then_evicted(cached_worker, handle)

    outcome = await handle.approve("gate", "go")
    assert outcome.action == "approve"
    result = await handle.result()
    assert result.status == RunStatus.COMPLETED
    assert result.steps["gate"].output == "go"
    assert result.steps["after"].status == StepStatus.COMPLETED


async def test_a_run_held_by_its_budget_leaves_the_cache_and_raising_it_wakes_it(
    client: Client, task_queue: str, cached_worker: MixerWorker
) -> None:
    mixer = MixerClient(client, task_queue)
    spec = {
        "name": "evicted-budget",
        "dry_run": True,
        "budget": {"max_tokens": 1},
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
        "steps": [
            {"id": "a", "prompt": "first"},
            {"id": "b", "needs": ["a"], "prompt": "second"},
        ],
    }
    handle = await mixer.start(spec, workflow_id=f"evict-{uuid.uuid4().hex[:8]}")
    await waiting_then_evicted(cached_worker, handle)
    assert (await handle.progress()).steps["b"].budget_hold is not None

    await handle.raise_budget(max_tokens=1_000_000)
    result = await handle.result()
    assert result.status == RunStatus.COMPLETED
    assert result.steps["b"].status == StepStatus.COMPLETED


async def test_a_run_with_a_step_running_stays_cached(
    client: Client, task_queue: str, cached_worker: MixerWorker
) -> None:
    mixer = MixerClient(client, task_queue)
    spec = {
        "name": "busy",
        "steps": [
            {"id": "work", "kind": "pty", "command": ["sleep", "2"]},
            {"id": "gate", "kind": "approval", "prompt": "Ship?"},
        ],
    }
    handle = await mixer.start(spec, workflow_id=f"busy-{uuid.uuid4().hex[:8]}")
    run_id = (await handle.temporal.describe()).run_id

    async def both_started() -> bool:
        progress = await handle.progress()
        return progress.steps["work"].status == StepStatus.RUNNING and bool(progress.waiting)

    await until(both_started, "the command and the approval never ran side by side")
    await asyncio.sleep(1)  # well past the eviction's grace
    assert run_id in cached_runs(cached_worker)
    await handle.approve("gate")
    assert (await handle.result()).status == RunStatus.COMPLETED
