"""SIGTERM drains a real ``llmmixer worker`` (README "Worker settings", deploy/README "Shutdown").

On SIGTERM the worker reports not ready at once (``/readyz`` 503), stops
polling, lets running activities finish within ``LLMMIXER_SHUTDOWN_GRACE_S``,
then cancels what is still running and exits 0. Each test runs the worker as
a child process, exactly as a container runtime would stop it, against the
session's real Temporal server; the steps are PTY commands, so the timing is
the command's own and no provider is involved.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fakes.processes import wait_gone
from fakes.workers import WorkerProcess, WorkerProcesses, eventually, worker_environment
from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from llmmixer.client.mixer import MixerClient, MixerHandle
from llmmixer.runtime.address import free_port
from llmmixer.workflows.records import RunStatus

# Exit after the grace period plus this: the command's kill, the cancellation
# reported to Temporal, and interpreter shutdown.
EXIT_SLACK_S = 6.0


@pytest.fixture
async def workers(
    env: WorkflowEnvironment, task_queue: str, tmp_path: Path
) -> AsyncIterator[WorkerProcesses]:
    address = env.client.service_client.config.target_host
    async with WorkerProcesses(
        env.client, tmp_path, worker_environment(address, task_queue, tmp_path)
    ) as started:
        yield started


async def readyz(port: int) -> int:
    """The status code of ``GET /readyz``; 0 when nothing answers."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError):
        return 0
    try:
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: worker\r\n\r\n")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 2)
    except (OSError, TimeoutError):
        return 0
    finally:
        writer.close()
    parts = status_line.split()
    return int(parts[1]) if len(parts) > 1 else 0


def command_spec(seconds: float, pid_file: Path) -> dict[str, Any]:
    # Writes its pid (so the test can see it killed), works, then says so.
    code = (
        "import os, sys, time; "
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
        "print('begun', flush=True); "
        f"time.sleep({seconds}); "
        "print('finished', flush=True)"
    )
    return {
        "name": "drain",
        "defaults": {
            "on_failure": "fail",
            # A lost activity is noticed in seconds, and retried at once.
            "heartbeat_timeout_s": 2,
            "retry": {"max_attempts": 5, "initial_interval_s": 0.5, "max_interval_s": 1},
        },
        "steps": [{"id": "cmd", "kind": "pty", "command": [sys.executable, "-c", code]}],
    }


async def start_worker(workers: WorkerProcesses, grace_s: float) -> tuple[WorkerProcess, int]:
    port = free_port()
    worker = await workers.start(
        env={"LLMMIXER_SHUTDOWN_GRACE_S": str(grace_s), "LLMMIXER_HEALTH_PORT": str(port)}
    )
    await eventually(lambda: readyz(port), lambda code: code == 200, "/readyz 200")
    return worker, port


async def command_started(handle: MixerHandle, pid_file: Path, identity: str) -> None:
    async def holder() -> str | None:
        description = await handle.temporal.describe()
        for pending in description.raw_description.pending_activities:
            if pending.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED:
                return pending.last_worker_identity
        return None

    await eventually(holder, lambda found: found == identity, "the command started")
    await eventually(lambda: asyncio.to_thread(pid_file.exists), bool, "the command wrote its pid")


async def sigterm_and_watch(worker: WorkerProcess, port: int) -> tuple[float, float]:
    """SIGTERM the worker; seconds until /readyz said 503, and until the process exited."""
    started = time.monotonic()
    # The worker alone, as `docker stop` does: a command runs in a session of
    # its own, and stopping it is the worker's job.
    os.kill(worker.pid, signal.SIGTERM)
    code = await eventually(
        lambda: readyz(port), lambda code: code != 200, "/readyz not 200", every_s=0.02
    )
    not_ready_after = time.monotonic() - started
    assert code == 503, "the health server went away instead of answering 503 while draining"
    await worker.process.wait()
    return not_ready_after, time.monotonic() - started


async def started_attempts(handle: MixerHandle) -> list[tuple[int, str]]:
    """(attempt, worker identity) of every activity attempt history records as started."""
    found = []
    async for event in handle.temporal.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            attributes = event.activity_task_started_event_attributes
            found.append((attributes.attempt, attributes.identity))
    return found


async def test_sigterm_lets_a_running_command_finish_then_exits_0(
    workers: WorkerProcesses, env: WorkflowEnvironment, task_queue: str, tmp_path: Path
) -> None:
    first, port = await start_worker(workers, grace_s=20)
    pid_file = tmp_path / "cmd.pid"
    mixer = MixerClient(env.client, task_queue)
    handle = await mixer.start(
        command_spec(3, pid_file), workflow_id=f"drain-{uuid.uuid4().hex[:8]}"
    )
    await command_started(handle, pid_file, first.identity)

    not_ready_after, exited_after = await sigterm_and_watch(first, port)
    assert first.process.returncode == 0, first.log()
    assert not_ready_after < 1.0
    # It waited for the command (about 3 s) rather than cutting it off.
    assert exited_after < 20, first.log()

    # Its workflow task needs a worker that polls; the step itself is done.
    await workers.start()
    result = await asyncio.wait_for(handle.result(), 30)
    assert result.status == RunStatus.COMPLETED
    assert "finished" in result.steps["cmd"].output
    assert result.steps["cmd"].attempts == 1
    assert await started_attempts(handle) == [(1, first.identity)]


async def test_sigterm_cancels_a_command_still_running_after_the_grace(
    workers: WorkerProcesses, env: WorkflowEnvironment, task_queue: str, tmp_path: Path
) -> None:
    grace_s = 2.0
    first, port = await start_worker(workers, grace_s=grace_s)
    pid_file = tmp_path / "cmd.pid"
    mixer = MixerClient(env.client, task_queue)
    handle = await mixer.start(
        command_spec(300, pid_file), workflow_id=f"drain-{uuid.uuid4().hex[:8]}"
    )
    await command_started(handle, pid_file, first.identity)
    command_pid = int(await asyncio.to_thread(pid_file.read_text))

    not_ready_after, exited_after = await sigterm_and_watch(first, port)
    assert first.process.returncode == 0, first.log()
    assert not_ready_after < 1.0
    assert grace_s <= exited_after < grace_s + EXIT_SLACK_S, first.log()
    # The cancelled activity killed its command on the way out.
    assert await wait_gone([command_pid], timeout_s=5) == []

    # The attempt ended as a failure Temporal retries (not a cancelled step):
    # the run is still going, and the step's next attempt waits for a worker.
    async def pending() -> Any:
        description = await handle.temporal.describe()
        return list(description.raw_description.pending_activities)

    [activity] = await eventually(
        pending,
        lambda found: len(found) == 1 and found[0].attempt >= 2,
        "the command's next attempt scheduled",
    )
    assert activity.state == PendingActivityState.PENDING_ACTIVITY_STATE_SCHEDULED
    # (Describe, not the progress query: no worker is left to answer one.)
    assert (await handle.temporal.describe()).status == WorkflowExecutionStatus.RUNNING
    await handle.temporal.terminate("test over")
