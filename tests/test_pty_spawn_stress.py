"""Starting commands from a busy, instrumented worker never hangs it or its heartbeats.

A worker is multi-threaded (the Temporal SDK, OpenTelemetry's span and
metric exporters), and Python's at-fork handlers (OpenTelemetry registers
some) run in a child forked by Python code. A child that takes a lock another
thread held at fork time hangs before its ``exec``; a spawn that waits for
that exec on the event loop stops every heartbeat of the worker with it.

Each test runs its commands in a fresh interpreter (``STRESS``) set up like a
traced worker: a ``TracerProvider`` with a ``BatchSpanProcessor`` and a
``MeterProvider`` with a periodic reader, both exporting all the time, plus
busy threads. A probe registered with ``os.register_at_fork`` records every
child in which Python code ran after the fork; a separate process keeps the
probe and any hung child away from the test session.

The last test runs a command through a real Temporal worker on a host where
starting it takes seconds: the activity must keep heartbeating meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from temporalio import workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from llmmixer.activities.commands import CommandActivities
from llmmixer.activities.terminal.mode import probe_pty
from llmmixer.activities.terminal.policy import CommandPolicy
from llmmixer.core.contracts import PTY_ACTIVITY, CommandCall, CommandResult

pytestmark = pytest.mark.timeout(240)

# argv: commands, parallel, seconds an at-fork child handler takes (a slow
# re-initialisation), per-command timeout, busy threads (0/1). Prints one
# JSON line.
STRESS = r"""
import asyncio, hashlib, json, os, sys, threading, time

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmmixer.activities.terminal.policy import CommandPolicy
from llmmixer.core.contracts import CommandCall
from llmmixer.activities.terminal.runner import run_command

commands, parallel = int(sys.argv[1]), int(sys.argv[2])
child_handler_s, per_command_s = float(sys.argv[3]), float(sys.argv[4])
busy = sys.argv[5] == "1"

# Python code running in a forked child before exec: each such child writes here.
probe_r, probe_w = os.pipe()
os.set_blocking(probe_r, False)

def in_child() -> None:
    os.write(probe_w, b"!")
    if child_handler_s:
        time.sleep(child_handler_s)

os.register_at_fork(after_in_child=in_child)

tracer_provider = TracerProvider()
tracer_provider.add_span_processor(
    BatchSpanProcessor(InMemorySpanExporter(), schedule_delay_millis=20)
)
trace.set_tracer_provider(tracer_provider)
reader = PeriodicExportingMetricReader(
    ConsoleMetricExporter(out=open(os.devnull, "w")), export_interval_millis=50
)
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
tracer = trace.get_tracer("stress")
counter = metrics.get_meter("stress").create_counter("spins")
stop = threading.Event()
shared = threading.Lock()

def spans() -> None:
    while not stop.is_set():
        with tracer.start_as_current_span("busy"):
            counter.add(1)

def hashing() -> None:
    block = os.urandom(1 << 20)
    while not stop.is_set():
        with shared:
            hashlib.sha256(block).digest()

if busy:
    for target in (spans, hashing):
        threading.Thread(target=target, daemon=True).start()

policy = CommandPolicy.from_env(
    {"PATH": os.environ["PATH"], "LLMMIXER_PTY_ALLOW": "*", "LLMMIXER_PTY_MODE": "pty"}
)

async def one(index: int, results: dict) -> None:
    call = CommandCall(workflow_id="wf", step_id=f"s{index}", argv=["true"], timeout_s=20)
    prepared = policy.prepare(call)
    try:
        outcome = await asyncio.wait_for(
            run_command(
                call,
                mode="pty",
                env=prepared.env,
                cwd=prepared.cwd,
                executable=prepared.executable,
                launcher=prepared.launcher,
            ),
            per_command_s,
        )
    except TimeoutError:
        results["hung"] += 1
        return
    results["exit_codes"][str(outcome.exit_code)] = (
        results["exit_codes"].get(str(outcome.exit_code), 0) + 1
    )
    results["modes"][outcome.mode] = results["modes"].get(outcome.mode, 0) + 1

async def ticker(results: dict) -> None:
    while True:
        before = time.monotonic()
        await asyncio.sleep(0.01)
        results["max_gap_s"] = max(results["max_gap_s"], time.monotonic() - before - 0.01)

async def main() -> dict:
    results = {"hung": 0, "exit_codes": {}, "modes": {}, "max_gap_s": 0.0}
    tick = asyncio.create_task(ticker(results))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    gate = asyncio.Semaphore(parallel)

    async def gated(index: int) -> None:
        async with gate:
            await one(index, results)

    await asyncio.gather(*(gated(i) for i in range(commands)))
    results["seconds"] = time.monotonic() - started
    tick.cancel()
    return results

results = asyncio.run(main())
stop.set()
try:
    results["children_ran_python"] = len(os.read(probe_r, 1 << 16))
except BlockingIOError:
    results["children_ran_python"] = 0
results["launcher"] = list(policy.command_launcher())
print(json.dumps(results), flush=True)
os._exit(0)  # the exporters' threads need no orderly goodbye
"""


@pytest.fixture(autouse=True)
def needs_a_pty() -> None:
    problem = probe_pty()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"no pty on this CI machine: {problem}")
        pytest.skip(f"no pty here: {problem}")


async def stress(
    commands: int,
    parallel: int,
    *,
    child_handler_s: float = 0.0,
    per_command_s: float = 20.0,
    busy: bool = False,
) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        STRESS,
        str(commands),
        str(parallel),
        str(child_handler_s),
        str(per_command_s),
        "1" if busy else "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 180)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail("the worker stand-in hung: its event loop never came back")
    assert process.returncode == 0, err.decode()[-3000:]
    results: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return results


async def test_hundreds_of_commands_start_from_a_traced_busy_worker_without_a_hang() -> None:
    results = await stress(300, 10, busy=True)
    assert results["hung"] == 0, results
    assert results["exit_codes"] == {"0": 300}, results
    assert results["modes"] == {"pty": 300}, results
    # No Python ran between fork and exec: no at-fork handler, no lock to hang on.
    assert results["children_ran_python"] == 0, results
    assert results["seconds"] < 60, results


async def test_the_event_loop_keeps_turning_while_commands_start() -> None:
    # An at-fork handler that takes 0.3 s in the child (a tracing SDK
    # re-initialising on a loaded host): a spawn that waited for the exec on
    # the loop would stall it, and every heartbeat of the worker, that long.
    # No spinning threads here: they would stall the loop through the GIL,
    # whatever starts the commands.
    results = await stress(40, 8, child_handler_s=0.3)
    assert results["hung"] == 0 and results["exit_codes"] == {"0": 40}, results
    assert results["max_gap_s"] < 0.2, results


HEARTBEAT_TIMEOUT_S = 2.0
START_DELAY_S = 4.0
# Stands in for the capability launcher (setpriv) on a host so loaded that a
# command needs seconds before it leads its session: the spawn waits for that
# in its thread, and the worker's event loop must not wait with it.
SLOW_LAUNCHER = (
    sys.executable,
    "-I",
    "-S",
    "-c",
    f"import os, sys, time; time.sleep({START_DELAY_S}); os.execv(sys.argv[1], sys.argv[1:])",
)


@workflow.defn(name="TestSlowStartWorkflow")
class SlowStartWorkflow:
    """One command with a heartbeat timeout shorter than its start, and no retry."""

    @workflow.run
    async def run(self, call: CommandCall) -> CommandResult:
        return await workflow.execute_activity(
            PTY_ACTIVITY,
            call,
            result_type=CommandResult,
            start_to_close_timeout=timedelta(seconds=60),
            heartbeat_timeout=timedelta(seconds=HEARTBEAT_TIMEOUT_S),
            retry_policy=RetryPolicy(maximum_attempts=1),
        )


async def test_heartbeats_keep_flowing_while_a_command_takes_seconds_to_start(
    client: Client, task_queue: str
) -> None:
    policy = dataclasses.replace(
        CommandPolicy.from_env(user_is_operator=True),
        launcher=SLOW_LAUNCHER,
        launcher_problem=None,
    )
    activities = CommandActivities(policy, heartbeat_interval_s=0.25)
    gaps: list[float] = []

    async def ticker() -> None:
        # The worker runs on this event loop: a spawn that held it would show here.
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            gaps.append(time.monotonic() - before - 0.01)

    call = CommandCall(
        workflow_id="wf", step_id="slow", argv=[sys.executable, "-c", "print('started')"]
    )
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[SlowStartWorkflow],
        activities=[activities.run_command],
        workflow_runner=UnsandboxedWorkflowRunner(),
        max_cached_workflows=0,
    ):
        tick = asyncio.create_task(ticker())
        try:
            # Fails with a heartbeat timeout (no retry) if the loop stalled
            # for longer than HEARTBEAT_TIMEOUT_S while the command started.
            result = await client.execute_workflow(
                SlowStartWorkflow.run,
                call,
                id=f"slow-{uuid.uuid4().hex[:10]}",
                task_queue=task_queue,
            )
        finally:
            tick.cancel()
    assert result.exit_code == 0 and result.output == "started\n", result
    assert result.attempt == 1
    # The start really took longer than the heartbeat timeout ...
    assert result.duration_ms >= START_DELAY_S * 1000, result
    # ... and the loop never stopped for anything like it.
    assert max(gaps) < 0.5, sorted(gaps)[-5:]
