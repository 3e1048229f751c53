"""A real worker runs the tool activities where it runs commands and stops its MCP servers."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel
from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from llmmixer.core.contracts import (
    MCP_CALL_ACTIVITY,
    MCP_LIST_ACTIVITY,
    TOOL_COMMAND_ACTIVITY,
    McpCallRequest,
    McpListRequest,
    McpListResult,
    ToolCall,
    ToolRunRequest,
    ToolRunResult,
)
from llmmixer.core.tools import CommandTool, McpTool
from llmmixer.workers.worker import WorkerSettings, mixer_worker

pytestmark = pytest.mark.timeout(180)

MCP_SERVER = str(Path(__file__).resolve().parent / "fakes" / "mcp_server.py")


class ToolJob(BaseModel):
    queue: str
    command: ToolRunRequest
    listing: McpListRequest
    calls: list[McpCallRequest]


class ToolJobResult(BaseModel):
    command: ToolRunResult
    listed: list[str]
    calls: list[ToolRunResult]


@workflow.defn(name="TestToolActivitiesWorkflow")
class ToolJobWorkflow:
    """Schedules each tool activity the way a tool loop would, on the worker's queue."""

    @workflow.run
    async def run(self, job: ToolJob) -> ToolJobResult:
        options = {
            "task_queue": job.queue,
            "start_to_close_timeout": timedelta(seconds=60),
            "heartbeat_timeout": timedelta(seconds=20),
        }
        command = await workflow.execute_activity(
            TOOL_COMMAND_ACTIVITY, job.command, result_type=ToolRunResult, **options
        )
        listed = await workflow.execute_activity(
            MCP_LIST_ACTIVITY, job.listing, result_type=McpListResult, **options
        )
        # In parallel, as a model's several calls of one turn are.
        calls = await asyncio.gather(
            *(
                workflow.execute_activity(
                    MCP_CALL_ACTIVITY, call, result_type=ToolRunResult, **options
                )
                for call in job.calls
            )
        )
        return ToolJobResult(
            command=command, listed=[tool.name for tool in listed.tools], calls=list(calls)
        )


async def test_a_worker_runs_tool_activities_and_stops_its_mcp_servers_on_shutdown(
    client: Client, task_queue: str, tmp_path: Path
) -> None:
    counter, starts = tmp_path / "counter", tmp_path / "starts"
    server = McpTool(
        name="fake",
        command=[sys.executable, MCP_SERVER, "--counter", str(counter), "--starts", str(starts)],
        exclude=["fail"],
    )
    tool = CommandTool(
        name="say",
        argv=[sys.executable, "-c", "import sys; print(sys.argv[1])", "{{args.text}}"],
        parameters={"type": "object", "properties": {"text": {"type": "string"}}},
    )
    job = ToolJob(
        queue=task_queue,
        command=ToolRunRequest(
            workflow_id="wf",
            step_id="ask",
            tool=tool,
            call=ToolCall(id="1", name="say", arguments={"text": "a; b"}),
        ),
        listing=McpListRequest(workflow_id="wf", step_id="ask", server=server),
        calls=[
            McpCallRequest(
                workflow_id="wf",
                step_id="ask",
                server=server,
                call=ToolCall(id=str(n), name="bump", arguments={"note": str(n)}),
            )
            for n in range(3)
        ],
    )
    environ = {"PATH": os.environ.get("PATH", ""), "LLMMIXER_PTY_ALLOW": sys.executable}
    settings = WorkerSettings(task_queue=task_queue, shutdown_grace_s=2.0)
    job_queue = f"{task_queue}-jobs"
    async with (
        mixer_worker(client, settings, environ=environ) as worker,
        worker,
        Worker(
            client,
            task_queue=job_queue,
            workflows=[ToolJobWorkflow],
            workflow_runner=UnsandboxedWorkflowRunner(),
        ),
    ):
        result = await client.execute_workflow(
            ToolJobWorkflow.run,
            job,
            id=f"tools-{uuid.uuid4().hex[:8]}",
            task_queue=job_queue,
            result_type=ToolJobResult,
        )
    assert result.command.content.strip() == "a; b" and not result.command.is_error
    assert sorted(result.listed) == ["bump", "echo", "read_first_line"]
    assert sorted(call.content for call in result.calls) == ["1", "2", "3"]
    assert len(counter.read_text().splitlines()) == 3
    (pid,) = (int(line) for line in starts.read_text().split())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.1)
    pytest.fail("the MCP server outlived the worker")
