"""Nothing is lost when the Temporal server itself stops or crashes mid-run.

The embedded server (``EmbeddedServer``, what ``llmmixer dev`` and ``run``
start) keeps its state in a SQLite file under ``LLMMIXER_HOME``. These tests
run one on a free loopback port with a temporary home, start a run on a real
``llmmixer worker`` process, stop the server in the middle of a streaming
step (gracefully, and with SIGKILL as a crash would), start it again on the
same file and port, and check that the run picks up where history says it
was: the same worker reconnects by itself, the run completes, and the steps
that had completed before the outage are never sent to a provider again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fakes.provider_server import FakeProviderServer, Reply
from fakes.workers import (
    SLOW_CHUNK_DELAY_S,
    SLOW_TEXT,
    WorkerProcesses,
    crash_defaults,
    eventually,
    llm_step,
    worker_environment,
)
from temporalio.client import Client

from llmmixer.client.mixer import MixerClient
from llmmixer.runtime.address import free_port
from llmmixer.runtime.connection import data_converter
from llmmixer.workers.devserver import EmbeddedServer
from llmmixer.workflows.records import RunStatus, StepStatus

# Generous: a restart on a loaded 2-core CI machine takes a few seconds, and
# the run then needs a heartbeat timeout and a re-run of the streaming step.
RESUME_BOUND_S = 45.0


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    """The embedded server on a free port, its SQLite file in a temporary LLMMIXER_HOME."""
    embedded = EmbeddedServer(
        host="127.0.0.1", port=free_port("127.0.0.1"), ui=False, home=tmp_path / "home"
    )
    await embedded.start()
    try:
        yield embedded
    finally:
        await embedded.stop()


@pytest.fixture
async def server_client(server: EmbeddedServer) -> Client:
    # Same converter as the workers, so the test reads their payloads.
    return await Client.connect(server.address, data_converter=data_converter())


async def _stop_server(server: EmbeddedServer, how: str) -> None:
    if how == "sigkill":
        # A crash: no shutdown path runs; only what SQLite committed survives.
        assert server.pid is not None
        os.killpg(server.pid, signal.SIGKILL)
    await server.stop()  # graceful SIGTERM, or just reaping the killed group
    assert not server.running


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_a_run_resumes_after_the_server_restarts_on_its_sqlite_file(
    how: str,
    server: EmbeddedServer,
    server_client: Client,
    task_queue: str,
    tmp_path: Path,
    provider_server: FakeProviderServer,
) -> None:
    provider_server.script(
        "openai",
        Reply(text=SLOW_TEXT, chunk_delay_s=SLOW_CHUNK_DELAY_S),
        Reply(text="the whole answer"),
        model="m-slow",
    )
    spec: dict[str, Any] = {
        "name": "crash-server",
        "defaults": crash_defaults(),
        "steps": [
            llm_step("first", "one"),
            llm_step("second", "two {{steps.first.output}}", ["first"]),
            llm_step("slow", "long answer after {{steps.second.output}}", ["second"]),
            llm_step("last", "sum up {{steps.slow.output}}", ["slow"]),
        ],
    }
    base = worker_environment(server.address, task_queue, tmp_path, provider_server.env())
    async with WorkerProcesses(server_client, tmp_path, base) as workers:
        worker = await workers.start()
        mixer = MixerClient(server_client, task_queue)
        handle = await mixer.start(spec, workflow_id=f"crash-server-{uuid.uuid4().hex[:8]}")

        async def slow_calls() -> int:
            return provider_server.count("openai", "m-slow")

        await eventually(slow_calls, lambda n: n == 1, "slow call")
        await asyncio.sleep(1.5)
        before = await handle.progress()
        assert before.steps["second"].status == StepStatus.COMPLETED
        assert before.steps["slow"].status == StepStatus.RUNNING

        stopped_at = time.monotonic()
        await _stop_server(server, how)
        # Down long enough for every poll, heartbeat and stream signal of the
        # worker to fail, and for the slow step's heartbeat timeout to lapse.
        await asyncio.sleep(3.0)
        assert worker.running, f"the worker exited while the server was down:\n{worker.log()}"
        await server.start()
        restarted_s = time.monotonic() - stopped_at

        result = await asyncio.wait_for(handle.result(), RESUME_BOUND_S)
        resumed_s = time.monotonic() - stopped_at

        assert result.status == RunStatus.COMPLETED
        assert worker.running, "the same worker process reconnected; none was restarted"
        assert len(workers.started) == 1
        for done in ("first", "second"):
            assert provider_server.count("openai", f"m-{done}") == 1, done
            assert result.steps[done].attempts == 1
        assert provider_server.count("openai", "m-last") == 1
        # The slow step either finished its stream after the restart or, when
        # its heartbeat timeout lapsed during the outage, ran again in whole.
        slow = result.steps["slow"]
        assert slow.output in (SLOW_TEXT, "the whole answer")
        assert slow.attempts == provider_server.count("openai", "m-slow")
        print(
            f"{how}: server back after {restarted_s:.1f}s, run completed {resumed_s:.1f}s "
            f"after the stop; slow step attempts={slow.attempts}"
        )
