"""The command activity inside a real Temporal workflow (session dev server).

A test-only workflow runs ``PTY_ACTIVITY`` with a short heartbeat timeout, so
these tests see what ``MixerWorkflow`` will see: results, error types, retry
decisions and cancellation reaching the process group.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from fakes.processes import SPAWN_TREE, pid_alive, pids_in, wait_gone
from temporalio import workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from llmmixer.activities.commands import CommandActivities, OutputDelta
from llmmixer.activities.terminal.policy import CommandPolicy
from llmmixer.core.contracts import (
    PTY_ACTIVITY,
    CommandCall,
    CommandResult,
    ErrorType,
    FailureDetails,
    RespondRule,
)

pytestmark = pytest.mark.timeout(120)


@workflow.defn(name="TestCommandActivityWorkflow")
class CommandTestWorkflow:
    """Runs one command the way MixerWorkflow does, with a 2-attempt retry policy."""

    @workflow.run
    async def run(self, call: CommandCall) -> CommandResult:
        return await workflow.execute_activity(
            PTY_ACTIVITY,
            call,
            result_type=CommandResult,
            start_to_close_timeout=timedelta(seconds=call.timeout_s + 30),
            heartbeat_timeout=timedelta(seconds=3),
            retry_policy=RetryPolicy(
                maximum_attempts=2, initial_interval=timedelta(milliseconds=100)
            ),
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )


@dataclass
class Harness:
    client: Client
    task_queue: str
    activities: CommandActivities
    deltas: list[OutputDelta] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(delta.text for delta in self.deltas)

    async def run(self, call: CommandCall) -> CommandResult:
        return await self.client.execute_workflow(
            CommandTestWorkflow.run,
            call,
            id=f"cmd-{uuid.uuid4().hex[:10]}",
            task_queue=self.task_queue,
        )


def make_call(*argv: str, **fields: object) -> CommandCall:
    return CommandCall(workflow_id="wf", step_id="step", argv=list(argv), **fields)


def py(script: str, **fields: object) -> CommandCall:
    return make_call(sys.executable, "-c", script, **fields)


async def start_harness(
    client: Client, task_queue: str, policy: CommandPolicy
) -> AsyncIterator[Harness]:
    activities = CommandActivities(policy, heartbeat_interval_s=0.5)
    harness = Harness(client, task_queue, activities)
    activities.on_output = harness.deltas.append
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[CommandTestWorkflow],
        activities=[activities.run_command],
        # the test workflow imports pytest helpers; it is trivially deterministic
        workflow_runner=UnsandboxedWorkflowRunner(),
        max_cached_workflows=0,
    ):
        yield harness


@pytest.fixture
async def harness(client: Client, task_queue: str) -> AsyncIterator[Harness]:
    # The test is the worker's operator: any executable.
    policy = CommandPolicy.from_env(user_is_operator=True)
    async for running in start_harness(client, task_queue, policy):
        yield running


def application_error(failure: WorkflowFailureError) -> ApplicationError:
    activity_error = failure.cause
    assert isinstance(activity_error, ActivityError), failure
    cause = activity_error.cause
    assert isinstance(cause, ApplicationError), activity_error
    return cause


def details_of(error: ApplicationError) -> FailureDetails:
    return FailureDetails.model_validate(error.details[0])


async def test_successful_run_records_mode_and_attempt(harness: Harness) -> None:
    call = py(
        "import sys; sys.stdout.write('Proceed? '); sys.stdout.flush();"
        " print('answer', sys.stdin.readline().strip())",
        respond=[RespondRule(expect=r"Proceed\?", send="y\n")],
    )
    result = await harness.run(call)
    assert result.exit_code == 0
    assert "answer y" in result.output
    assert result.mode == harness.activities.capability.mode
    assert result.attempt == 1
    assert harness.deltas and harness.deltas[0].step_id == "step"
    assert harness.output == result.output


async def test_exit_code_in_success_codes_passes(harness: Harness) -> None:
    result = await harness.run(py("import sys; sys.exit(3)", success_codes=[0, 3]))
    assert result.exit_code == 3


async def test_refused_executable_is_not_retried(client: Client, task_queue: str) -> None:
    policy = CommandPolicy.from_env({"PATH": "/usr/bin:/bin", "LLMMIXER_PTY_ALLOW": "git"})
    async for harness in start_harness(client, task_queue, policy):
        with pytest.raises(WorkflowFailureError) as failed:
            await harness.run(py("print('must not run')"))
        error = application_error(failed.value)
        assert error.type == ErrorType.COMMAND_REFUSED
        assert error.non_retryable
        assert "LLMMIXER_PTY_ALLOW" in error.message
        assert details_of(error).attempt == 1
        assert harness.deltas == []  # nothing ran


async def test_failed_exit_code_is_retried_then_reported(harness: Harness) -> None:
    with pytest.raises(WorkflowFailureError) as failed:
        await harness.run(py("print('boom happened'); raise SystemExit(2)"))
    error = application_error(failed.value)
    assert error.type == ErrorType.COMMAND_FAILED
    assert not error.non_retryable  # the retry policy decided, and it ran twice
    assert "exited with code 2" in error.message and "boom happened" in error.message
    details = details_of(error)
    assert details.attempt == 2
    assert details.partial_output == "boom happened\n"


async def test_timeout_is_not_retried_and_keeps_partial_output(harness: Harness) -> None:
    call = py("import time; print('started', flush=True); time.sleep(60)", timeout_s=1.5)
    with pytest.raises(WorkflowFailureError) as failed:
        await harness.run(call)
    error = application_error(failed.value)
    assert error.type == ErrorType.COMMAND_TIMEOUT
    assert error.non_retryable
    assert "timeout_s=1.5" in error.message
    details = details_of(error)
    assert details.attempt == 1
    assert details.partial_output == "started\n"


async def test_cancelling_the_workflow_kills_the_process_group(harness: Harness) -> None:
    handle = await harness.client.start_workflow(
        CommandTestWorkflow.run,
        py(SPAWN_TREE, timeout_s=120),
        id=f"cmd-cancel-{uuid.uuid4().hex[:10]}",
        task_queue=harness.task_queue,
    )
    for _ in range(300):
        if "PIDS" in harness.output:
            break
        await asyncio.sleep(0.05)
    child, grandchild = pids_in(harness.output)
    assert pid_alive(child) and pid_alive(grandchild)

    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()
    assert isinstance(failed.value.cause, CancelledError)
    assert await wait_gone([child, grandchild], timeout_s=10) == []


async def test_unset_allowlist_refuses_on_an_operators_worker(
    client: Client, task_queue: str
) -> None:
    policy = CommandPolicy.from_env({"PATH": os.environ["PATH"]})
    async for harness in start_harness(client, task_queue, policy):
        with pytest.raises(WorkflowFailureError) as failed:
            await harness.run(py("print('must not run')"))
        error = application_error(failed.value)
        assert error.type == ErrorType.COMMAND_REFUSED and error.non_retryable
        assert "LLMMIXER_PTY_ALLOW is not set" in error.message
        assert harness.deltas == []


async def test_a_backtracking_respond_pattern_cannot_freeze_the_worker(harness: Harness) -> None:
    """``(a+)+$`` against a long run of a's: exponential for ``re``, linear for RE2.

    The command then stays quiet for longer than the 3 s heartbeat timeout:
    it only succeeds if the event loop kept heartbeating meanwhile.
    """
    call = py(
        "import sys, time\n"
        "sys.stdout.write('a' * 5000 + 'b'); sys.stdout.flush()\n"
        "time.sleep(4)\n"
        "print(' done')",
        respond=[RespondRule(expect=r"(a+)+$", send="never\n")],
    )
    started = time.monotonic()
    result = await harness.run(call)
    assert result.exit_code == 0 and result.output.endswith("b done\n")
    assert result.attempt == 1
    assert time.monotonic() - started < 20


async def test_a_pattern_re2_cannot_run_is_refused_naming_the_rule(harness: Harness) -> None:
    call = py(
        "print('x')",
        respond=[RespondRule(expect="ok", send="y\n"), RespondRule(expect=r"(a)\1", send="y\n")],
    )
    with pytest.raises(WorkflowFailureError) as failed:
        await harness.run(call)
    error = application_error(failed.value)
    assert error.type == ErrorType.COMMAND_REFUSED and error.non_retryable
    assert "respond[1].expect" in error.message and "RE2" in error.message


async def test_output_is_bounded_by_the_workers_ceiling(client: Client, task_queue: str) -> None:
    policy = CommandPolicy.from_env(
        {
            "PATH": os.environ["PATH"],
            "LLMMIXER_PTY_ALLOW": "*",
            "LLMMIXER_PTY_MAX_OUTPUT_BYTES": str(64 * 1024),
        }
    )
    # The spec asks for 1 GiB; the worker keeps 64 KiB, head and tail.
    call = py(
        "import sys\nfor i in range(20000): sys.stdout.write(f'line {i:06d} ' + 'x' * 40 + '\\n')",
        max_output_bytes=1 << 30,
    )
    async for harness in start_harness(client, task_queue, policy):
        result = await harness.run(call)
        assert result.truncated
        assert len(result.output.encode()) < 66 * 1024
        assert result.output.startswith("line 000000") and "line 019999" in result.output


SECRET = "acme-token-0123456789-abcdefghij"


async def test_a_secret_the_command_finds_elsewhere_is_redacted_everywhere(
    client: Client, task_queue: str, tmp_path: Path
) -> None:
    """The worker holds ACME_API_TOKEN; a command reads the same value from a file.

    It prints it whole, and split across two writes with a pause between (two
    reads on the worker's side), then fails: result, deltas, heartbeat-fed
    output, failure message and partial output must all be redacted.
    """
    leaked = tmp_path / "found.txt"
    leaked.write_text(SECRET)
    policy = CommandPolicy.from_env(
        {"PATH": os.environ["PATH"], "LLMMIXER_PTY_ALLOW": "*", "ACME_API_TOKEN": SECRET}
    )
    script = (
        "import sys, time\n"
        f"value = open({str(leaked)!r}).read()\n"
        "print('whole:', value, flush=True)\n"
        "sys.stdout.write('split: ' + value[:12]); sys.stdout.flush(); time.sleep(0.8)\n"
        "sys.stdout.write(value[12:] + '\\n'); sys.stdout.flush()\n"
        "raise SystemExit(sys.argv[1] == 'fail')"
    )
    async for harness in start_harness(client, task_queue, policy):
        result = await harness.run(make_call(sys.executable, "-c", script, "ok"))
        assert result.output == "whole: [REDACTED]\nsplit: [REDACTED]\n"
        with pytest.raises(WorkflowFailureError) as failed:
            await harness.run(make_call(sys.executable, "-c", script, "fail"))
        error = application_error(failed.value)
        assert error.type == ErrorType.COMMAND_FAILED
        assert "whole: [REDACTED]" in error.message
        assert "split: [REDACTED]" in (details_of(error).partial_output or "")
        assert "[REDACTED]" in harness.output
        for text in (result.output, error.message, str(error.details), harness.output):
            assert SECRET not in text
            assert SECRET[:12] not in text and SECRET[12:] not in text
