"""A worker killed in the middle of a tool loop loses nothing and repeats nothing.

The worker is a real ``llmmixer worker`` process (tests/fakes/workers.py),
killed with SIGKILL after a tool call finished and while the next model
turn streams. The tool appends to a counter file: its side effect must
happen exactly once, however the loop resumes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fakes.provider_server import FakeProviderServer, Reply, ToolUse
from fakes.workers import (
    SLOW_CHUNK_DELAY_S,
    SLOW_TEXT,
    WorkerProcesses,
    crash_defaults,
    eventually,
    worker_environment,
)
from temporalio.testing import WorkflowEnvironment

from llmmixer.client.mixer import MixerClient
from llmmixer.workflows.records import RunStatus, StepStatus

pytestmark = pytest.mark.timeout(180)

APPEND = "import sys; open(sys.argv[1], 'a').write('x\\n'); print('appended')"


@pytest.fixture
async def workers(
    env: WorkflowEnvironment, task_queue: str, tmp_path: Path, provider_server: FakeProviderServer
) -> AsyncIterator[WorkerProcesses]:
    address = env.client.service_client.config.target_host
    extra = provider_server.env()
    # A checkout run from its own tree (PYTHONPATH) hands it to its workers.
    if "PYTHONPATH" in os.environ:
        extra["PYTHONPATH"] = os.environ["PYTHONPATH"]
    base = worker_environment(address, task_queue, tmp_path, extra)
    async with WorkerProcesses(env.client, tmp_path, base) as started:
        yield started


async def test_sigkill_between_a_tool_call_and_the_next_turn_runs_the_tool_once(
    workers: WorkerProcesses,
    env: WorkflowEnvironment,
    task_queue: str,
    provider_server: FakeProviderServer,
    tmp_path: Path,
) -> None:
    counter = tmp_path / "counter"
    provider_server.script(
        "openai",
        Reply(tool_calls=[ToolUse("append", {"path": str(counter)}, id="a1")]),
        Reply(text=SLOW_TEXT, chunk_delay_s=SLOW_CHUNK_DELAY_S),
        Reply(text="appended once"),
        model="m-ask",
    )
    spec = {
        "name": "tool-crash",
        "defaults": crash_defaults(),
        "steps": [
            {
                "id": "ask",
                "model": "m-ask",
                "prompt": "append once",
                "tools": [
                    {
                        "kind": "command",
                        "name": "append",
                        "parameters": {
                            "type": "object",
                            "properties": {"path": {"type": "string"}},
                            "required": ["path"],
                        },
                        "argv": [sys.executable, "-c", APPEND, "{{args.path}}"],
                    }
                ],
            }
        ],
    }
    first = await workers.start()
    mixer = MixerClient(env.client, task_queue)
    handle = await mixer.start(spec, workflow_id=f"tool-crash-{uuid.uuid4().hex[:8]}")
    # The tool ran, and the second turn is streaming on the first worker.
    await eventually(lambda: asyncio.to_thread(lambda: counter.exists()), bool, "the tool call ran")
    await eventually(
        lambda: asyncio.to_thread(provider_server.count, "openai", "m-ask"),
        lambda n: n == 2,
        "the second turn asked",
    )
    await asyncio.sleep(1.5)
    assert (await handle.progress()).steps["ask"].status == StepStatus.RUNNING
    assert await first.kill(signal.SIGKILL) == -signal.SIGKILL
    await workers.start()
    result = await asyncio.wait_for(handle.result(), 60)
    assert result.status == RunStatus.COMPLETED
    assert result.output == "appended once"
    # The side effect happened once: the finished call was taken from history.
    assert counter.read_text() == "x\n"
    # Turn one was never asked again; only the turn in flight was.
    assert provider_server.count("openai", "m-ask") == 3
    record = result.steps["ask"]
    assert [turn.number for turn in record.turns] == [1, 2]
    assert record.turns[0].calls[0].status == "completed"
