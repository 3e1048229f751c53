"""Scale figures: one worker's throughput, the memory of waiting runs, recovery after SIGKILL.

Called by ``run.py`` (``python bench/run.py`` runs these after the per-step
overhead); each workload also runs on plain asyncio (the floor, no
durability) and on LangGraph with its SQLite checkpointer where that means
something, and the report puts them side by side as ratios.

- **throughput**: ``runs`` three-step chained runs, at most ``IN_FLIGHT`` at
  once, against the fake provider answering at once; runs per second.
- **memory**: the resident set of a process holding ``runs`` runs that wait
  at an approval step. llmmixer: one ``llmmixer worker`` process (its
  workflow cache keeps them in memory). asyncio: a process of coroutines
  waiting on an event. LangGraph: a process that ran each graph to its
  ``interrupt()``; the waiting state lives in SQLite.
- **SIGKILL → resumed**: a worker running a command is SIGKILLed; the time
  until a second worker has started the step's next attempt. Plain asyncio
  loses the work; LangGraph resumes only when something re-invokes the
  thread, so there is no time to measure.

The llmmixer workers here are real ``llmmixer worker`` child processes (the
crash tests' ``tests/fakes/workers.py``), so their RSS is a worker's alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fakes.provider_server import FakeProviderServer
from fakes.workers import WorkerProcesses, eventually, worker_environment
from openai import AsyncOpenAI
from raw_temporal import RawChainWorkflow, RawWaitWorkflow, stream_chat
from systems import MODEL, langgraph_available
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client, WorkflowHistory

from llmmixer.client.mixer import MixerClient, MixerHandle
from llmmixer.core import search as search_names
from llmmixer.workers.plugin import mixer_replayer
from llmmixer.workflows.records import InterventionRequest, RunStatus

BENCH = Path(__file__).resolve().parent

# Runs in flight at once, for every system: a worker's default
# LLMMIXER_MAX_CONCURRENT_ACTIVITIES, so no system queues more than another.
IN_FLIGHT = 100
# Temporal declares a killed worker's activity lost after this (spec default 20).
HEARTBEAT_TIMEOUT_S = 2
FLOOR, LANGGRAPH = "asyncio", "langgraph-sqlite"
LLMMIXER, RAW, DBOS = "llmmixer", "raw-temporal", "dbos-sqlite"
BUDGET = "llmmixer, held by a budget"
STEPS = 3  # LLM steps per run of the throughput workload
WAKE_STEPS = 50  # steps a woken run replays
WORKER_COUNTS = (1, 2, 4)
# A worker process imports every provider SDK before it polls: on a busy
# machine that takes far longer than the crash tests' 30 s.
START_TIMEOUT_S = 180.0


@dataclass
class Throughput:
    """One system on the three-step workload: runs per second and where the CPU went."""

    runs_per_s: float
    # CPU time of the worker process(es) / the Temporal server per step
    # (3 per run); None where there is no such process of its own.
    worker_cpu_ms_per_step: float | None = None
    server_cpu_ms_per_step: float | None = None

    def as_json(self) -> dict[str, float | None]:
        return {
            "runs_per_s": self.runs_per_s,
            "worker_cpu_ms_per_step": self.worker_cpu_ms_per_step,
            "server_cpu_ms_per_step": self.server_cpu_ms_per_step,
        }


@dataclass
class History:
    """What one completed three-step run wrote to the server's history."""

    events: int
    payload_bytes: int

    def per_step(self) -> tuple[float, float]:
        return self.events / STEPS, self.payload_bytes / STEPS


@dataclass
class ScaleFigures:
    runs: int
    kill_reps: int
    throughput: dict[str, Throughput] = field(default_factory=dict)
    # llmmixer with 1, 2, 4 worker processes on the one server.
    workers: dict[int, Throughput] = field(default_factory=dict)
    history: dict[str, History] = field(default_factory=dict)
    rss_mb: dict[str, float] = field(default_factory=dict)  # after, whole process
    rss_per_run_kb: dict[str, float] = field(default_factory=dict)  # growth per run
    # Waking a 50-step run that waits for a person: the approve update's round
    # trip after it left the cache, and a replay of its history alone.
    wake_ms: list[float] = field(default_factory=list)
    replay_ms: list[float] = field(default_factory=list)
    resume_s: list[float] = field(default_factory=list)
    hedge: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "in_flight": IN_FLIGHT,
            "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
            "throughput": {k: v.as_json() for k, v in self.throughput.items()},
            "workers": {str(k): v.as_json() for k, v in self.workers.items()},
            "history_per_run": {
                k: {"events": v.events, "payload_bytes": v.payload_bytes}
                for k, v in self.history.items()
            },
            "rss_mb": self.rss_mb,
            "rss_per_run_kb": self.rss_per_run_kb,
            "wake_50_step_ms": self.wake_ms,
            "replay_50_step_ms": self.replay_ms,
            "sigkill_resume_s": self.resume_s,
        }


# ---------------------------------------------------------------- specs


def three_step_spec() -> dict[str, Any]:
    return {
        "name": "bench-three",
        "defaults": {
            "provider": "openai",
            "model": MODEL,
            "on_failure": "fail",
            "retry": {"max_attempts": 1},
        },
        "steps": [
            {"id": "a", "prompt": "first"},
            {"id": "b", "needs": ["a"], "prompt": "second: {{steps.a.output}}"},
            {"id": "c", "needs": ["b"], "prompt": "third: {{steps.b.output}}"},
        ],
    }


def approval_spec() -> dict[str, Any]:
    return {"name": "bench-wait", "steps": [{"id": "gate", "kind": "approval", "prompt": "Ship?"}]}


def budget_spec() -> dict[str, Any]:
    """One call spends the budget; the second step is held until someone raises it."""
    return {
        "name": "bench-budget",
        "budget": {"max_tokens": 1},
        "defaults": {"provider": "openai", "model": MODEL, "on_failure": "fail"},
        "steps": [
            {"id": "a", "prompt": "first"},
            {"id": "b", "needs": ["a"], "prompt": "second: {{steps.a.output}}"},
        ],
    }


def long_wait_spec(steps: int = WAKE_STEPS) -> dict[str, Any]:
    """``steps`` chained LLM steps, then an approval: what waking a long run replays."""
    chain: list[dict[str, Any]] = [
        {"id": f"s{i}", "prompt": f"step {i}", **({"needs": [f"s{i - 1}"]} if i else {})}
        for i in range(steps)
    ]
    chain.append({"id": "gate", "kind": "approval", "needs": [f"s{steps - 1}"]})
    return {
        "name": "bench-wake",
        "defaults": {"provider": "openai", "model": MODEL, "on_failure": "fail"},
        "steps": chain,
    }


def command_spec(seconds: float) -> dict[str, Any]:
    return {
        "name": "bench-kill",
        "defaults": {
            "on_failure": "fail",
            "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
            # Retry at once, so the figure is the heartbeat timeout and the
            # hand-over, not a backoff chosen here.
            "retry": {"max_attempts": 5, "initial_interval_s": 0.1, "max_interval_s": 0.5},
        },
        "steps": [
            {
                "id": "work",
                "kind": "pty",
                "command": [sys.executable, "-c", f"import time; time.sleep({seconds})"],
            }
        ],
    }


# ---------------------------------------------------------------- helpers


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` from /proc (Linux), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_s(*pids: int) -> float:
    """User plus system CPU seconds of ``pids`` so far, from /proc (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


async def bounded(count: int, limit: int, one: Callable[[int], Awaitable[None]]) -> float:
    """Run ``one(i)`` for every i, at most ``limit`` at once; seconds taken."""
    gate = asyncio.Semaphore(limit)

    async def guarded(index: int) -> None:
        async with gate:
            await one(index)

    started = time.perf_counter()
    await asyncio.gather(*(guarded(index) for index in range(count)))
    return time.perf_counter() - started


class RawWorker:
    """``raw_worker.py`` in a child process: the raw baseline with a process of its own."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pid = process.pid

    @classmethod
    async def start(cls, address: str, queue: str, env: dict[str, str]) -> RawWorker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(BENCH / "raw_worker.py"),
            address,
            queue,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"raw worker did not start (exit {await process.wait()})")
        return cls(process)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    # The children import the same llmmixer and bench modules as this process.
    return {**os.environ, **extra}


async def history_of(client: Client, workflow_id: str) -> History:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return History(
        events=len(history.events),
        payload_bytes=sum(len(event.SerializeToString()) for event in history.events),
    )


# ---------------------------------------------------------------- throughput


async def _measured(
    pids: list[int], server_pid: int | None, runs: int, go: Callable[[], Awaitable[float]]
) -> Throughput:
    steps = runs * STEPS
    worker_before = cpu_s(*pids)
    server_before = cpu_s(server_pid) if server_pid else 0.0
    seconds = await go()
    return Throughput(
        runs_per_s=runs / seconds,
        worker_cpu_ms_per_step=(cpu_s(*pids) - worker_before) * 1000 / steps,
        server_cpu_ms_per_step=(cpu_s(server_pid) - server_before) * 1000 / steps
        if server_pid
        else None,
    )


async def throughput_llmmixer(
    workers: WorkerProcesses, client: Client, runs: int, count: int, server_pid: int | None
) -> tuple[Throughput, History]:
    queue = f"bench-tp-{uuid.uuid4().hex[:8]}"
    started = [await workers.start(queue, ready_timeout_s=START_TIMEOUT_S) for _ in range(count)]
    mixer = MixerClient(client, queue)
    spec = three_step_spec()

    async def one(index: int) -> None:
        handle = await mixer.start(spec, workflow_id=f"{queue}-{index}")
        result = await handle.result()  # raises unless completed
        assert result.status == RunStatus.COMPLETED

    await bounded(min(runs, 20), IN_FLIGHT, lambda i: one(runs + i))  # warm-up
    figures = await _measured(
        [w.pid for w in started], server_pid, runs, lambda: bounded(runs, IN_FLIGHT, one)
    )
    history = await history_of(client, f"{queue}-0")
    for worker in started:
        await worker.stop()
    return figures, history


async def throughput_raw(
    address: str, fake: FakeProviderServer, runs: int, server_pid: int | None
) -> tuple[Throughput, History]:
    queue = f"bench-raw-tp-{uuid.uuid4().hex[:8]}"
    worker = await RawWorker.start(address, queue, _child_env(fake.env()))
    client = await Client.connect(address)  # the SDK's default converter, as a raw app has

    async def one(index: int) -> None:
        await client.execute_workflow(
            RawChainWorkflow.run, STEPS, id=f"{queue}-{index}", task_queue=queue
        )

    try:
        await bounded(min(runs, 20), IN_FLIGHT, lambda i: one(runs + i))  # warm-up
        figures = await _measured(
            [worker.pid], server_pid, runs, lambda: bounded(runs, IN_FLIGHT, one)
        )
        history = await history_of(client, f"{queue}-0")
    finally:
        await worker.stop()
    return figures, history


def throughput_dbos(fake: FakeProviderServer, runs: int, db_path: Path) -> Throughput:
    done = subprocess.run(
        [sys.executable, str(BENCH / "dbos_child.py"), str(runs), str(db_path)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=BENCH,
        env=_child_env(fake.env()),
    )
    if done.returncode != 0:
        raise RuntimeError(f"DBOS child failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return Throughput(
        runs_per_s=figures["runs_per_s"],
        worker_cpu_ms_per_step=figures["cpu_s"] * 1000 / (runs * STEPS),
    )


def dbos_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("dbos") is not None


async def throughput_asyncio(openai_client: AsyncOpenAI, runs: int) -> float:
    async def one(index: int) -> None:
        text = await stream_chat(openai_client, MODEL, "first")
        text = await stream_chat(openai_client, MODEL, f"second: {text}")
        await stream_chat(openai_client, MODEL, f"third: {text}")

    return runs / await bounded(runs, IN_FLIGHT, one)


async def throughput_langgraph(db_path: Path, openai_client: AsyncOpenAI, runs: int) -> float:
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
    from langgraph.graph import END, START, StateGraph
    from systems import _GraphState

    def node(name: str, reads: str | None) -> Callable[[_GraphState], Awaitable[Any]]:
        async def call(state: _GraphState) -> dict[str, dict[str, str]]:
            prompt = f"{name}: {state['outputs'].get(reads, '') if reads else ''}"
            return {"outputs": {name: await stream_chat(openai_client, MODEL, prompt)}}

        return call

    builder: Any = StateGraph(_GraphState)
    for name, reads in (("a", None), ("b", "a"), ("c", "b")):
        builder.add_node(name, node(name, reads))
    builder.add_edge(START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", "c")
    builder.add_edge("c", END)
    async with AsyncSqliteSaver.from_conn_string(str(db_path)) as saver:
        graph = builder.compile(checkpointer=saver)

        async def one(index: int) -> None:
            config = {"configurable": {"thread_id": uuid.uuid4().hex}}
            await graph.ainvoke({"outputs": {}}, config, durability="sync")

        return runs / await bounded(runs, IN_FLIGHT, one)


# ---------------------------------------------------------------- memory


async def _count_waiting(client: Client, queue: str) -> int:
    # Visibility, not the progress query: a query on a run that left the
    # worker's cache would replay it into the cache again.
    found = await client.count_workflows(
        f'{search_names.STATE} = "waiting" AND ExecutionStatus = "Running" '
        f'AND TaskQueue = "{queue}"'
    )
    return found.count


async def memory_llmmixer(
    workers: WorkerProcesses, client: Client, runs: int, spec: dict[str, Any]
) -> tuple[float, float]:
    """(RSS MB after, KB per waiting run) of a fresh worker holding ``runs`` waiting runs."""
    queue = f"bench-mem-{uuid.uuid4().hex[:8]}"
    worker = await workers.start(queue, ready_timeout_s=START_TIMEOUT_S)
    mixer = MixerClient(client, queue)
    # One run first, so the baseline includes a run's one-time costs (imports,
    # the SDK clients, the first sandbox) and the growth is per run.
    warm = await mixer.start(spec, workflow_id=f"{queue}-warm")
    await eventually(
        lambda: _count_waiting(client, queue), lambda n: n >= 1, "warm-up run waiting", every_s=0.5
    )
    await asyncio.sleep(2)  # let start-up allocations settle before the baseline
    before = rss_kb(worker.pid)
    handles: list[MixerHandle] = [warm]

    async def start(index: int) -> None:
        handles.append(await mixer.start(spec, workflow_id=f"{queue}-{index}"))

    await bounded(runs, IN_FLIGHT, start)
    await eventually(
        lambda: _count_waiting(client, queue),
        lambda n: n >= runs + 1,
        f"{runs} runs waiting",
        within_s=600,
        every_s=1,
    )
    await asyncio.sleep(2)  # the worker evicts waiting runs shortly after their last task
    after = rss_kb(worker.pid)
    await bounded(len(handles), 50, lambda i: handles[i].temporal.terminate("benchmark over"))
    await worker.stop()
    return after / 1024, (after - before) / runs


async def memory_raw(address: str, fake: FakeProviderServer, runs: int) -> tuple[float, float]:
    """The same for raw Temporal: workflows waiting on a signal, cached by the SDK's default."""
    queue = f"bench-raw-mem-{uuid.uuid4().hex[:8]}"
    worker = await RawWorker.start(address, queue, _child_env(fake.env()))
    client = await Client.connect(address)

    async def start(index: int) -> None:
        await client.start_workflow(RawWaitWorkflow.run, id=f"{queue}-{index}", task_queue=queue)

    async def waiting(index: int) -> None:
        handle = client.get_workflow_handle(f"{queue}-{index}")
        # Its first workflow task completed: the run is cached and waits.
        await eventually(
            lambda: handle.describe(),
            lambda found: found.raw_description.workflow_execution_info.history_length >= 4,
            f"raw run {index} waiting",
            every_s=0.2,
        )

    try:
        await start(-1)
        await waiting(-1)
        await asyncio.sleep(2)
        before = rss_kb(worker.pid)
        await bounded(runs, IN_FLIGHT, start)
        await bounded(runs, 50, waiting)
        await asyncio.sleep(2)
        after = rss_kb(worker.pid)
        await bounded(
            runs + 1,
            50,
            lambda i: client.get_workflow_handle(f"{queue}-{i - 1}").terminate("benchmark over"),
        )
    finally:
        await worker.stop()
    return after / 1024, (after - before) / runs


def memory_child(kind: str, runs: int, db_path: str | None) -> tuple[float, float]:
    """(RSS MB after, KB per waiting run) of a ``waiters.py`` child process running ``kind``."""
    done = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("waiters.py")),
            kind,
            str(runs),
            db_path or "",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=Path(__file__).parent,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{kind} memory child failed:\n{done.stdout}\n{done.stderr}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return figures["after_kb"] / 1024, (figures["after_kb"] - figures["before_kb"]) / runs


# ---------------------------------------------------------------- waking


async def wake_long_run(
    workers: WorkerProcesses, client: Client, reps: int
) -> tuple[list[float], list[float]]:
    """Milliseconds to wake a 50-step run waiting at an approval, after it left the cache.

    (the approve update's round trip, and the replay of the woken run's history alone)
    """
    queue = f"bench-wake-{uuid.uuid4().hex[:8]}"
    worker = await workers.start(queue, ready_timeout_s=START_TIMEOUT_S)
    mixer = MixerClient(client, queue)
    wakes: list[float] = []
    replays: list[float] = []
    try:
        for rep in range(reps + 1):
            handle = await mixer.start(long_wait_spec(), workflow_id=f"{queue}-{rep}")
            await eventually(
                lambda: _count_waiting(client, queue),
                lambda n: n >= 1,
                "the long run waiting",
                within_s=300,
                every_s=0.2,
            )
            await asyncio.sleep(2)  # evicted by now: the wake-up replays
            started = time.perf_counter()
            await handle.temporal.execute_update("approve_step", InterventionRequest(step="gate"))
            woke = (time.perf_counter() - started) * 1000
            await handle.result()
            # The run that woke: since it continued as new before waiting,
            # the latest run of the chain, not the 50 steps before it.
            history = await handle.temporal.fetch_history()
            replayed = await replay_ms(history)
            if rep:  # the first warms the worker up
                wakes.append(woke)
                replays.append(replayed)
    finally:
        await worker.stop()
    return wakes, replays


async def replay_ms(history: WorkflowHistory, copies: int = 10) -> float:
    """Milliseconds a worker spends replaying ``history`` once.

    One ``Replayer`` replays ``copies`` of it in one call, after a first call
    that pays the replayer's own set-up (a bridge worker per call), so the
    figure is the replay, as a worker that already runs does it.
    """
    replayer = mixer_replayer()
    await replayer.replay_workflow(history)

    async def copies_of() -> AsyncIterator[WorkflowHistory]:
        for index in range(copies):
            yield WorkflowHistory(f"{history.workflow_id}-{index}", history.events)

    started = time.perf_counter()
    await replayer.replay_workflows(copies_of())
    return (time.perf_counter() - started) * 1000 / copies


# ---------------------------------------------------------------- SIGKILL
async def resume_after_sigkill(workers: WorkerProcesses, client: Client) -> float:
    """Seconds from SIGKILLing the worker running a step to its next attempt starting elsewhere."""
    queue = f"bench-kill-{uuid.uuid4().hex[:8]}"
    first = await workers.start(queue, ready_timeout_s=START_TIMEOUT_S)
    mixer = MixerClient(client, queue)
    handle = await mixer.start(command_spec(120), workflow_id=queue)

    async def holder() -> tuple[str, int] | None:
        description = await handle.temporal.describe()
        for pending in description.raw_description.pending_activities:
            if pending.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED:
                return pending.last_worker_identity, pending.attempt
        return None

    await eventually(holder, lambda found: found == (first.identity, 1), "the step started")
    # The second worker joins only now, so the first attempt is surely the first's.
    second = await workers.start(queue, ready_timeout_s=START_TIMEOUT_S)
    killed = time.perf_counter()
    await first.kill(signal.SIGKILL)
    await eventually(
        holder,
        lambda found: found is not None and found[0] == second.identity,
        "the step resumed on the second worker",
        within_s=60,
        every_s=0.05,
    )
    resumed = time.perf_counter() - killed
    await handle.temporal.terminate("benchmark over")
    await second.stop()
    return resumed


# ---------------------------------------------------------------- driver


async def run_scale(
    address: str,
    client: Client,
    fake: FakeProviderServer,
    home: Path,
    openai_client: AsyncOpenAI,
    *,
    runs: int,
    kill_reps: int,
    langgraph: bool,
    server_pid: int | None = None,
    wake_reps: int = 3,
    worker_counts: tuple[int, ...] = WORKER_COUNTS,
) -> ScaleFigures:
    figures = ScaleFigures(runs=runs, kill_reps=kill_reps)
    langgraph = langgraph and langgraph_available()
    saved_delay = fake.chunk_delay_s
    # The provider answers at once: throughput is the orchestrator's ceiling.
    fake.chunk_delay_s = 0.0
    log_dir = home / "scale-workers"
    log_dir.mkdir(parents=True, exist_ok=True)
    # The worker children import the llmmixer this process imports.
    extra = {**fake.env(), **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}}
    base = worker_environment(address, "bench-scale", home, extra)
    try:
        async with WorkerProcesses(client, log_dir, base) as workers:
            _note(f"throughput: {runs} three-step runs per system")
            # Raw Temporal and llmmixer alternate, so neither gets the quiet moment.
            raw, figures.history[RAW] = await throughput_raw(address, fake, runs, server_pid)
            for count in worker_counts:
                _note(f"  llmmixer with {count} worker(s)")
                figures.workers[count], history = await throughput_llmmixer(
                    workers, client, runs, count, server_pid
                )
                figures.history.setdefault(LLMMIXER, history)
            figures.throughput[LLMMIXER] = figures.workers[worker_counts[0]]
            raw_again, _ = await throughput_raw(address, fake, runs, server_pid)
            figures.throughput[RAW] = max(raw, raw_again, key=lambda t: t.runs_per_s)
            if dbos_available():
                figures.throughput[DBOS] = await asyncio.to_thread(
                    throughput_dbos, fake, runs, home / "scale-dbos.sqlite"
                )
            figures.throughput[FLOOR] = Throughput(await throughput_asyncio(openai_client, runs))
            if langgraph:
                figures.throughput[LANGGRAPH] = Throughput(
                    await throughput_langgraph(
                        home / "scale-throughput.sqlite", openai_client, runs
                    )
                )

            _note(f"memory: {runs} waiting runs per system")
            for key, spec in ((LLMMIXER, approval_spec()), (BUDGET, budget_spec())):
                mb, per_run = await memory_llmmixer(workers, client, runs, spec)
                figures.rss_mb[key], figures.rss_per_run_kb[key] = mb, per_run
            mb, per_run = await memory_raw(address, fake, runs)
            figures.rss_mb[RAW], figures.rss_per_run_kb[RAW] = mb, per_run
            mb, per_run = await asyncio.to_thread(memory_child, "asyncio-wait", runs, None)
            figures.rss_mb[FLOOR], figures.rss_per_run_kb[FLOOR] = mb, per_run
            if langgraph:
                db = str(home / "scale-memory.sqlite")
                mb, per_run = await asyncio.to_thread(memory_child, "langgraph-wait", runs, db)
                figures.rss_mb[LANGGRAPH], figures.rss_per_run_kb[LANGGRAPH] = mb, per_run

            _note(f"waking a {WAKE_STEPS}-step run: {wake_reps} time(s)")
            figures.wake_ms, figures.replay_ms = await wake_long_run(workers, client, wake_reps)

            _note(f"SIGKILL -> resumed: {kill_reps} time(s)")
            for _ in range(kill_reps):
                figures.resume_s.append(await resume_after_sigkill(workers, client))
    finally:
        fake.chunk_delay_s = saved_delay
    return figures


def _note(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- report


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "–"
    return f"{value / base:.2f}×" if value / base < 10 else f"{value / base:.0f}×"


def _cell(value: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def throughput_table(figures: ScaleFigures) -> str:
    """Runs per second on the three-step workload, and the CPU each side spent per step."""
    raw = figures.throughput.get(RAW)
    lines = [
        f"| throughput: 3-step runs ({figures.runs} runs, ≤{IN_FLIGHT} in flight) "
        "| runs/s | × raw Temporal | worker CPU ms/step | server CPU ms/step "
        "| history events/step | history KB/step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for system, found in figures.throughput.items():
        history = figures.history.get(system)
        events, size = history.per_step() if history else (None, None)
        lines.append(
            f"| {system} | {found.runs_per_s:.1f} "
            f"| {_ratio(found.runs_per_s, raw.runs_per_s if raw else None)} "
            f"| {_cell(found.worker_cpu_ms_per_step)} | {_cell(found.server_cpu_ms_per_step)} "
            f"| {_cell(events, '{:.1f}')} | {_cell(size / 1024 if size else None, '{:.2f}')} |"
        )
    return "\n".join(lines)


def workers_table(figures: ScaleFigures) -> str:
    """llmmixer with 1, 2 and 4 worker processes against the one embedded server."""
    one = figures.workers.get(1)
    lines = [
        "| llmmixer worker processes | runs/s | × one worker | worker CPU ms/step "
        "| server CPU ms/step |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for count, found in sorted(figures.workers.items()):
        lines.append(
            f"| {count} | {found.runs_per_s:.1f} "
            f"| {_ratio(found.runs_per_s, one.runs_per_s if one else None)} "
            f"| {_cell(found.worker_cpu_ms_per_step)} | {_cell(found.server_cpu_ms_per_step)} |"
        )
    return "\n".join(lines)


def scale_table(figures: ScaleFigures) -> str:
    runs = figures.runs
    lines = [
        "| scale workload | llmmixer | raw-temporal | asyncio (floor) | langgraph-sqlite "
        "| llmmixer ÷ raw Temporal |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    systems = (LLMMIXER, RAW, FLOOR, LANGGRAPH)

    def row(label: str, values: dict[str, float], fmt: Callable[[float], str]) -> str:
        cells = [fmt(values[k]) if k in values else "–" for k in systems]
        ratio = _ratio(values.get(LLMMIXER), values.get(RAW))
        return f"| {label} | {' | '.join(cells)} | {ratio} |"

    throughput = {k: v.runs_per_s for k, v in figures.throughput.items()}
    lines.append(
        row(
            f"throughput: 3-step runs per second ({runs} runs, ≤{IN_FLIGHT} in flight)",
            throughput,
            lambda v: f"{v:.1f}",
        )
    )
    lines.append(
        row(f"memory: RSS with {runs} runs waiting, MB", figures.rss_mb, lambda v: f"{v:.0f}")
    )
    lines.append(
        row(
            "memory: growth per run waiting for a person, KB",
            figures.rss_per_run_kb,
            lambda v: f"{v:.1f}",
        )
    )
    if BUDGET in figures.rss_per_run_kb:
        lines.append(
            f"| memory: growth per run held by a budget, KB "
            f"| {figures.rss_per_run_kb[BUDGET]:.1f} | – | – | – | – |"
        )
    if figures.wake_ms:
        wake = statistics.median(figures.wake_ms)
        replay = statistics.median(figures.replay_ms)
        lines.append(
            f"| waking a {WAKE_STEPS}-step run that left the cache: approve round trip, ms "
            f"(median of {len(figures.wake_ms)}; its replay alone {replay:.0f} ms) "
            f"| {wake:.0f} | – | – | – | – |"
        )
    if figures.resume_s:
        resume = statistics.median(figures.resume_s)
        spread = f"{min(figures.resume_s):.1f}–{max(figures.resume_s):.1f}"
        lines.append(
            f"| SIGKILL → step resumed on a second worker, s (median of {len(figures.resume_s)}"
            f", heartbeat timeout {HEARTBEAT_TIMEOUT_S} s) | {resume:.1f} ({spread}) "
            "| as llmmixer | lost | no automatic resume | – |"
        )
    return "\n".join(lines)


def model_inputs(figures: ScaleFigures) -> str:
    """The measured inputs of bench/README.md's sizing model, and what they give."""
    mine = figures.throughput.get(LLMMIXER)
    history = figures.history.get(LLMMIXER)
    if mine is None or mine.worker_cpu_ms_per_step is None or history is None:
        return "(no llmmixer throughput measured)"
    worker_ms = mine.worker_cpu_ms_per_step
    server_ms = mine.server_cpu_ms_per_step or 0.0
    events, size = history.per_step()
    steps_per_worker_core = 1000 / worker_ms
    lines = [
        f"- worker CPU per step: **{worker_ms:.1f} ms** → one worker core serves about "
        f"**{steps_per_worker_core:.0f} steps/s** (on these cores);",
        f"- server CPU per step (embedded dev server, SQLite): **{server_ms:.1f} ms**;",
        f"- history per step: **{events:.1f} events, {size / 1024:.2f} KB** written.",
    ]
    scaling = ", ".join(
        f"{count}: {found.runs_per_s:.1f} runs/s"
        for count, found in sorted(figures.workers.items())
    )
    if scaling:
        lines.append(f"- llmmixer worker processes against one server on 2 cores: {scaling}.")
    return "\n".join(lines)
