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
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.worker import Interceptor, Worker, WorkflowInterceptorClassInput

from llmmixer.activities.checks import CHECK_ACTIVITIES
from llmmixer.activities.commands import CommandActivities
from llmmixer.activities.hedging import FirstTokenLatencies, HedgingActivities
from llmmixer.activities.llm import LlmActivities, LlmSettings
from llmmixer.activities.pricing import PriceTable
from llmmixer.activities.providers.breaker import BreakerBoard, BreakerPolicy
from llmmixer.activities.providers.settings import ProviderSettings
from llmmixer.activities.search import SearchAttributeCheck
from llmmixer.activities.telemetry import breaker_state_changed
from llmmixer.activities.terminal.policy import CommandPolicy
from llmmixer.activities.tools import CommandToolActivities, McpSessionPool, McpToolActivities
from llmmixer.runtime.connection import PTY_TASK_QUEUE_ENV
from llmmixer.runtime.settings import ROLES, Settings, WorkerEnv
from llmmixer.runtime.telemetry import prometheus_address, setup_telemetry
from llmmixer.workers.plugin import MixerWorkerPlugin
from llmmixer.workers.telemetry import with_prometheus, worker_interceptors
from llmmixer.workflows.mixer import WAITING_EXTERN, MixerWorkflow

log = logging.getLogger("llmmixer.worker")

ROLES_ENV = "LLMMIXER_WORKER_ROLES"
ROLE_WORKFLOWS, ROLE_LLM, ROLE_PTY = "workflows", "llm", "pty"
ALL_ROLES: frozenset[str] = frozenset(ROLES)


@dataclass
class WorkerSettings:
    """Worker tuning, read from ``LLMMIXER_*`` variables (see docs/settings.md)."""

    task_queue: str = "llmmixer"
    #: Most activities (LLM calls and commands) running at once on this worker.
    max_concurrent_activities: int = 100
    #: Most workflow tasks processed at once.
    max_concurrent_workflow_tasks: int = 100
    #: Most concurrent calls per provider, e.g. {"openai": 8}; others unlimited.
    provider_concurrency: Mapping[str, int] = field(default_factory=dict)
    #: Seconds running activities get to finish after SIGTERM before they are cancelled.
    shutdown_grace_s: float = 30.0
    #: Forward streamed LLM text and command output to watchers as step_delta events.
    stream_deltas: bool = True
    #: Circuit breaker per (provider, model) on this worker.
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    #: What this worker runs: ``workflows``, ``llm`` activities, ``pty`` activities
    #: (commands and CLI agents). PTY-heavy hosts are isolated by giving them
    #: ``pty`` alone and the others ``workflows,llm``.
    roles: frozenset[str] = ALL_ROLES
    #: The task queue PTY activities are scheduled on; None means ``task_queue``.
    #: Runs learn it from their spec's ``pty_task_queue`` (MixerClient fills it
    #: from the same variable), so set it alike on clients and workers.
    pty_task_queue: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerSettings:
        """From the settings tree (``runtime/settings.py``): every variable is
        checked, and ``SettingsError`` lists each bad one, so a worker refuses
        to start instead of running with half its configuration."""
        tree = Settings.from_env(os.environ if environ is None else environ)
        providers = tree.providers
        return cls(
            task_queue=tree.connection.task_queue,
            max_concurrent_activities=tree.worker.max_concurrent_activities,
            max_concurrent_workflow_tasks=tree.worker.max_concurrent_workflow_tasks,
            provider_concurrency=dict(providers.concurrency),
            shutdown_grace_s=tree.worker.shutdown_grace_s,
            stream_deltas=tree.worker.stream_deltas,
            breaker=BreakerPolicy(
                failure_threshold=providers.breaker_failure_ratio,
                min_calls=providers.breaker_min_calls,
                window_s=providers.breaker_window_s,
                cooldown_s=providers.breaker_cooldown_s,
            ),
            roles=frozenset(tree.worker.roles),
            pty_task_queue=tree.connection.pty_task_queue,
        )

    @property
    def pty_queue(self) -> str:
        """Where PTY activities run: the PTY queue when configured, else the main one."""
        return self.pty_task_queue or self.task_queue


def parse_roles(value: str) -> frozenset[str]:
    """``LLMMIXER_WORKER_ROLES``: a comma list of roles; empty means all of them."""
    return frozenset(WorkerEnv.from_env({ROLES_ENV: value}).roles)


@contextlib.asynccontextmanager
async def mixer_worker(
    client: Client,
    settings: WorkerSettings | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    command_policy: CommandPolicy | None = None,
    user_is_operator: bool = False,
    max_cached_workflows: int = 1000,
) -> AsyncIterator[MixerWorker]:
    """A configured worker, not yet running; closes SDK clients on exit.

    ``user_is_operator``: whoever writes the specs also runs this worker
    (``llmmixer dev``, the embedded ``llmmixer run``), so an unset
    ``LLMMIXER_PTY_ALLOW`` lets commands run any executable. The default is
    the safe one, for ``llmmixer worker``: unset, no command runs.

    One Temporal ``Worker`` per task queue this process polls: the main queue
    for workflows and LLM activities, and the PTY queue for commands and agents
    when ``settings.pty_task_queue`` names another queue (``settings.roles``
    decides which of them this process takes).
    """
    env = dict(os.environ if environ is None else environ)
    settings = settings or WorkerSettings.from_env(env)
    setup_telemetry(env)
    metrics_address = prometheus_address(env)
    if metrics_address:
        client = await with_prometheus(client, metrics_address)
    # Hedges learn their delay from the first tokens this worker's calls saw.
    latencies, prices = FirstTokenLatencies(), PriceTable.load()
    hedging = HedgingActivities(prices)
    llm = LlmActivities(
        ProviderSettings.from_env(env),
        prices=prices,
        latencies=latencies,
        # A no-op unless a meter provider is installed (runtime/telemetry.py).
        breakers=BreakerBoard(settings.breaker, on_change=breaker_state_changed),
        settings=LlmSettings(
            max_concurrent=settings.provider_concurrency, stream_deltas=settings.stream_deltas
        ),
    )
    if ROLE_LLM in settings.roles:
        # Off the event loop: SDK imports take seconds, and a client in this
        # process (`llmmixer run`) may be keeping a server connection alive.
        await asyncio.to_thread(llm.warm_up)
    policy = command_policy or CommandPolicy.from_env(env, user_is_operator=user_is_operator)
    commands = CommandActivities(
        policy,
        # A running command's output reaches watchers like a model's text.
        stream_deltas=settings.stream_deltas,
    )
    # MCP servers are started under the same policy; their sessions live as
    # long as this worker and are reused by every run it serves.
    mcp_pool = McpSessionPool.from_env(policy, env)
    tools = _ToolActivities(CommandToolActivities(commands), McpToolActivities(mcp_pool))
    (queue, (workflows, activities)), *other_queues = _registrations(
        settings, llm, commands, tools, hedging
    ).items()
    # Joins workflow and activity spans to the client's trace when tracing is
    # on and the client does not already carry the interceptor.
    interceptors = worker_interceptors(client)
    # With no cache (tests replay every task) there is nothing to evict.
    eviction = WaitingRunEviction() if max_cached_workflows > 0 else None
    worker = Worker(
        client,
        task_queue=queue,
        # Workflows, activities and the sandbox come from the plugin; the
        # converter from the client (``MixerPlugin`` when it made the client).
        workflows=[],
        plugins=[
            MixerWorkerPlugin(
                workflows=workflows,
                activities=activities,
                interceptors=[*interceptors, *([eviction] if eviction else [])],
            )
        ],
        max_concurrent_activities=settings.max_concurrent_activities,
        max_concurrent_workflow_tasks=settings.max_concurrent_workflow_tasks,
        graceful_shutdown_timeout=timedelta(seconds=settings.shutdown_grace_s),
        # Tests pass 0 so every workflow task replays from history, which
        # turns any non-determinism into a test failure.
        max_cached_workflows=max_cached_workflows,
        # After a worker dies, its next workflow task first waits on that
        # worker's sticky queue; 10 s (the default) of the ~13 s recovery was
        # that wait (tests/test_crash_worker.py). A busy worker that misses
        # 5 s only costs a replay.
        sticky_queue_schedule_to_start_timeout=timedelta(seconds=5),
    )
    if eviction is not None and workflows:
        eviction.attach(worker)
    workers = [worker]
    for queue, (workflows, activities) in other_queues:
        # The same options (grace, limits, interceptors) on the other queue.
        config = worker.config()
        config["task_queue"] = queue
        config["plugins"] = [
            MixerWorkerPlugin(workflows=workflows, activities=activities, interceptors=interceptors)
        ]
        workers.append(Worker(**config))
    try:
        yield MixerWorker(workers)
    finally:
        await mcp_pool.aclose()
        await llm.aclose()


class WaitingRunEviction(Interceptor):
    """Runs that only wait for people leave this worker's workflow cache.

    A cached run holds its whole workflow sandbox (the workflow's modules,
    loaded for it alone: about 0.6 MB), and a run waiting for an approval
    may wait for days: a worker holding thousands of them would hold
    gigabytes. ``MixerWorkflow`` says through ``WAITING_EXTERN`` when it has
    nothing running and only waits; shortly after that workflow task, this
    asks the worker to evict the run. The next signal or update replays its
    history on whichever worker takes it (bench/README.md measures that
    wake-up), and the run goes on exactly as recorded.

    The SDK has no public call to evict one run; its Core worker has
    (``request_workflow_eviction``), reached through the worker's bridge.
    Without it (another SDK version) runs simply stay cached, as before.
    """

    def __init__(self, grace_s: float = 0.2) -> None:
        # The grace lets the workflow task's completion reach Core first, and
        # a decision that arrives at once finds the run still in memory.
        self.grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._evict: Callable[[str], None] | None = None
        self._pending: dict[str, asyncio.TimerHandle] = {}

    def attach(self, worker: Worker) -> None:
        """Evict through ``worker`` (its Core worker exists once it is built)."""
        bridge = getattr(worker, "_bridge_worker", None)
        request = getattr(bridge, "request_workflow_eviction", None)
        if not callable(request):
            log.warning(
                "this temporalio version offers no workflow eviction: runs waiting for "
                "people stay in the workflow cache (max_cached_workflows bounds them)"
            )
            return
        self._loop = asyncio.get_running_loop()
        self._evict = request

    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput) -> None:
        input.unsafe_extern_functions[WAITING_EXTERN] = self._note
        return None

    def _note(self, run_id: str, waiting: bool) -> None:
        # Called from the workflow's thread, inside its activation.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._mark, run_id, waiting)

    def _mark(self, run_id: str, waiting: bool) -> None:
        # The latest word of a run wins: a run that got busy again stays.
        earlier = self._pending.pop(run_id, None)
        if earlier is not None:
            earlier.cancel()
        if waiting and self._loop is not None:
            self._pending[run_id] = self._loop.call_later(self.grace_s, self._evict_now, run_id)

    def _evict_now(self, run_id: str) -> None:
        self._pending.pop(run_id, None)
        if self._evict is None:
            return
        try:
            self._evict(run_id)
        except Exception as error:  # a worker shutting down; the run stays cached
            log.debug("could not evict waiting run %s: %s", run_id, error)


@dataclass(frozen=True)
class _ToolActivities:
    commands: CommandToolActivities
    mcp: McpToolActivities


def _registrations(
    settings: WorkerSettings,
    llm: LlmActivities,
    commands: CommandActivities,
    tools: _ToolActivities,
    hedging: HedgingActivities,
) -> dict[str, tuple[list[type], list[Callable[..., Any]]]]:
    """What to register on which task queue, for this worker's roles.

    Temporal expects every worker polling a queue to register the same
    activities (a task for an unregistered one fails its attempt), so PTY
    activities stay off the main queue once they have a queue of their own,
    and a worker without the ``pty`` role never runs a command.
    """
    found: dict[str, tuple[list[type], list[Callable[..., Any]]]] = {}

    def add(queue: str, workflow: type | None = None, *fns: Callable[..., Any]) -> None:
        workflows, activities = found.setdefault(queue, ([], []))
        if workflow is not None:
            workflows.append(workflow)
        activities.extend(fns)

    if ROLE_WORKFLOWS in settings.roles:
        add(settings.task_queue, MixerWorkflow)
    if ROLE_LLM in settings.roles:
        add(
            settings.task_queue,
            None,
            llm.call_llm,
            # A hedge's loser is priced where the price table is.
            hedging.hedge_cost,
        )
    if ROLE_PTY in settings.roles:
        # Tool calls start programs and MCP servers: they run where commands run.
        add(
            settings.pty_queue,
            None,
            commands.run_command,
            commands.run_agent,
            tools.commands.run_tool_command,
            tools.mcp.list_mcp_tools,
            tools.mcp.call_mcp_tool,
        )
    elif settings.pty_queue == settings.task_queue and ROLE_LLM in settings.roles:
        log.warning(
            "roles %s without pty and no %s: PTY and agent steps scheduled on %r fail "
            "their attempts on this worker; give commands a queue of their own",
            ",".join(sorted(settings.roles)),
            PTY_TASK_QUEUE_ENV,
            settings.task_queue,
        )
    if settings.task_queue in found:
        # The spec check runs where the workflow runs (a local activity); plan
        # checks are scheduled on the run's queue, to whichever worker polls it.
        add(settings.task_queue, None, *CHECK_ACTIVITIES, SearchAttributeCheck().registered)
    return found


class MixerWorker:
    """The Temporal workers of one llmmixer worker process, started and stopped together.

    ``async with`` runs them all; leaving it shuts them down at once (each
    stops polling, gives running activities the grace period, then cancels
    them), so two queues never add their grace periods up.
    """

    def __init__(self, workers: Sequence[Worker]) -> None:
        if not workers:
            raise ValueError("MixerWorker needs at least one Temporal worker")
        self.workers = list(workers)
        self._stack: contextlib.AsyncExitStack | None = None

    @property
    def task_queue(self) -> str:
        """The first queue polled: the main one unless this is a PTY-only worker."""
        return self.workers[0].task_queue

    @property
    def task_queues(self) -> list[str]:
        return [worker.task_queue for worker in self.workers]

    async def __aenter__(self) -> MixerWorker:
        async with contextlib.AsyncExitStack() as stack:
            for worker in self.workers:
                await stack.enter_async_context(worker)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is None:
            return
        # Begin every shutdown before waiting on any (the SDK's shutdown is
        # safe to repeat; the stack's exits then only collect the results).
        await asyncio.gather(*(worker.shutdown() for worker in self.workers))
        await stack.aclose()

    async def shutdown(self) -> None:
        await asyncio.gather(*(worker.shutdown() for worker in self.workers))


async def run_until_signalled(
    worker: MixerWorker, on_signal: Callable[[], None] | None = None
) -> None:
    """Run ``worker`` until SIGINT/SIGTERM, then shut down gracefully.

    ``on_signal`` runs inside the signal handler, before anything else: the
    CLI flips ``/readyz`` to 503 there, so a supervisor stops counting this
    worker as available the moment it starts draining, not once it is gone.
    Shutdown then stops polling, gives running activities the grace period
    (``LLMMIXER_SHUTDOWN_GRACE_S``) to finish and cancels the rest; a
    cancelled activity is retried on another worker, so nothing is lost.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def signalled() -> None:
        if not stop.is_set() and on_signal is not None:
            on_signal()
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, signalled)
    async with worker:
        log.info("worker polling task queue(s) %s", ", ".join(worker.task_queues))
        await stop.wait()
        log.info("stopping: finishing running activities (grace period applies)")
