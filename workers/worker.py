"""Building and running an llmmixer worker.

One worker process hosts ``MixerWorkflow`` and the activities. Everything
stateful (SDK clients, breakers, the PTY capability, limits) is created here
once per process and handed to the activity instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from llmmixer.activities.command_policy import CommandPolicy
from llmmixer.activities.commands import CommandActivities
from llmmixer.activities.llm import LlmActivities, LlmSettings
from llmmixer.activities.providers.breaker import BreakerBoard, BreakerPolicy
from llmmixer.activities.providers.settings import ProviderSettings
from llmmixer.activities.telemetry import breaker_state_changed
from llmmixer.workers.telemetry import (
    prometheus_address,
    setup_telemetry,
    with_prometheus,
    worker_interceptors,
)
from llmmixer.workflows.mixer import MixerWorkflow

log = logging.getLogger("llmmixer.worker")


@dataclass
class WorkerSettings:
    """Worker tuning, read from ``LLMMIXER_*`` variables (see README, "Worker settings")."""

    task_queue: str = "llmmixer"
    #: Most activities (LLM calls and commands) running at once on this worker.
    max_concurrent_activities: int = 100
    #: Most workflow tasks processed at once.
    max_concurrent_workflow_tasks: int = 100
    #: Most concurrent calls per provider, e.g. {"openai": 8}; others unlimited.
    provider_concurrency: Mapping[str, int] = field(default_factory=dict)
    #: Seconds running activities get to finish after SIGTERM before they are cancelled.
    shutdown_grace_s: float = 30.0
    #: Forward streamed LLM text to watchers as step_delta events.
    stream_deltas: bool = True
    #: Circuit breaker per (provider, model) on this worker.
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if environ is None else environ
        concurrency: dict[str, int] = {}
        for provider in ("anthropic", "openai", "gemini"):
            value = env.get(f"LLMMIXER_{provider.upper()}_CONCURRENCY")
            if value:
                concurrency[provider] = _positive_int(
                    f"LLMMIXER_{provider.upper()}_CONCURRENCY", value
                )
        return cls(
            task_queue=env.get("LLMMIXER_TASK_QUEUE") or "llmmixer",
            max_concurrent_activities=_positive_int(
                "LLMMIXER_MAX_CONCURRENT_ACTIVITIES",
                env.get("LLMMIXER_MAX_CONCURRENT_ACTIVITIES", "100"),
            ),
            max_concurrent_workflow_tasks=_positive_int(
                "LLMMIXER_MAX_CONCURRENT_WORKFLOW_TASKS",
                env.get("LLMMIXER_MAX_CONCURRENT_WORKFLOW_TASKS", "100"),
            ),
            provider_concurrency=concurrency,
            shutdown_grace_s=float(env.get("LLMMIXER_SHUTDOWN_GRACE_S", "30")),
            stream_deltas=env.get("LLMMIXER_STREAM_DELTAS", "1") not in ("0", "false", "no"),
            breaker=BreakerPolicy(
                failure_threshold=float(env.get("LLMMIXER_BREAKER_FAILURE_RATIO", "0.5")),
                min_calls=_positive_int(
                    "LLMMIXER_BREAKER_MIN_CALLS", env.get("LLMMIXER_BREAKER_MIN_CALLS", "5")
                ),
                window_s=float(env.get("LLMMIXER_BREAKER_WINDOW_S", "60")),
                cooldown_s=float(env.get("LLMMIXER_BREAKER_COOLDOWN_S", "30")),
            ),
        )


def _positive_int(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{name}={value!r} is not a positive whole number: set it to e.g. 8")
    return number


def sandbox_runner() -> SandboxedWorkflowRunner:
    # llmmixer's workflow-side modules are pure and deterministic; passing them
    # through avoids re-importing pydantic models for every workflow run.
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules("llmmixer")
    )


@contextlib.asynccontextmanager
async def mixer_worker(
    client: Client,
    settings: WorkerSettings | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    command_policy: CommandPolicy | None = None,
    max_cached_workflows: int = 1000,
) -> AsyncIterator[Worker]:
    """A configured worker, not yet running; closes SDK clients on exit."""
    env = dict(os.environ if environ is None else environ)
    settings = settings or WorkerSettings.from_env(env)
    setup_telemetry(env)
    metrics_address = prometheus_address(env)
    if metrics_address:
        client = await with_prometheus(client, metrics_address)
    llm = LlmActivities(
        ProviderSettings.from_env(env),
        # A no-op unless a meter provider is installed (workers/telemetry.py).
        breakers=BreakerBoard(settings.breaker, on_change=breaker_state_changed),
        settings=LlmSettings(
            max_concurrent=settings.provider_concurrency, stream_deltas=settings.stream_deltas
        ),
    )
    commands = CommandActivities(command_policy or CommandPolicy.from_env(env))
    worker = Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[MixerWorkflow],
        activities=[llm.call_llm, commands.run_command, commands.run_agent],
        workflow_runner=sandbox_runner(),
        max_concurrent_activities=settings.max_concurrent_activities,
        max_concurrent_workflow_tasks=settings.max_concurrent_workflow_tasks,
        graceful_shutdown_timeout=timedelta(seconds=settings.shutdown_grace_s),
        # Tests pass 0 so every workflow task replays from history, which
        # turns any non-determinism into a test failure.
        max_cached_workflows=max_cached_workflows,
        # Joins workflow and activity spans to the client's trace when tracing
        # is on and the client does not already carry the interceptor.
        interceptors=worker_interceptors(client),
    )
    try:
        yield worker
    finally:
        await llm.aclose()


async def run_until_signalled(worker: Worker) -> None:
    """Run ``worker`` until SIGINT/SIGTERM, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    async with worker:
        log.info("worker polling task queue %s", worker.task_queue)
        await stop.wait()
        log.info("stopping: finishing running activities (grace period applies)")
