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
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fakes.provider_server import FakeProviderServer
from fakes.workers import WorkerProcesses, eventually, worker_environment
from openai import AsyncOpenAI
from raw_temporal import stream_chat
from systems import MODEL, langgraph_available
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client

from llmmixer.client.mixer import MixerClient, MixerHandle
from llmmixer.workflows.records import RunStatus

# Runs in flight at once, for every system: a worker's default
# LLMMIXER_MAX_CONCURRENT_ACTIVITIES, so no system queues more than another.
IN_FLIGHT = 100
# Temporal declares a killed worker's activity lost after this (spec default 20).
HEARTBEAT_TIMEOUT_S = 2
FLOOR, LANGGRAPH = "asyncio", "langgraph-sqlite"


@dataclass
class ScaleFigures:
    runs: int
    kill_reps: int
    throughput: dict[str, float] = field(default_factory=dict)  # runs per second
    rss_mb: dict[str, float] = field(default_factory=dict)  # after, whole process
    rss_per_run_kb: dict[str, float] = field(default_factory=dict)  # growth per run
    resume_s: list[float] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "in_flight": IN_FLIGHT,
            "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
            "throughput_runs_per_s": self.throughput,
            "rss_mb": self.rss_mb,
            "rss_per_run_kb": self.rss_per_run_kb,
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


async def bounded(count: int, limit: int, one: Callable[[int], Awaitable[None]]) -> float:
    """Run ``one(i)`` for every i, at most ``limit`` at once; seconds taken."""
    gate = asyncio.Semaphore(limit)

    async def guarded(index: int) -> None:
        async with gate:
            await one(index)

    started = time.perf_counter()
    await asyncio.gather(*(guarded(index) for index in range(count)))
    return time.perf_counter() - started


# ---------------------------------------------------------------- throughput


async def throughput_llmmixer(mixer: MixerClient, runs: int) -> float:
    spec = three_step_spec()
    prefix = uuid.uuid4().hex[:8]

    async def one(index: int) -> None:
        handle = await mixer.start(spec, workflow_id=f"bench-tp-{prefix}-{index}")
        result = await handle.result()  # raises unless completed
        assert result.status == RunStatus.COMPLETED

    return runs / await bounded(runs, IN_FLIGHT, one)


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


async def memory_llmmixer(
    workers: WorkerProcesses, client: Client, runs: int
) -> tuple[float, float]:
    """(RSS MB after, KB per waiting run) of a fresh worker holding ``runs`` waiting runs."""
    queue = f"bench-mem-{uuid.uuid4().hex[:8]}"
    worker = await workers.start(queue)
    await asyncio.sleep(2)  # let start-up allocations settle before the baseline
    before = rss_kb(worker.pid)
    mixer = MixerClient(client, queue)
    spec = approval_spec()
    handles: list[MixerHandle] = []

    async def start(index: int) -> None:
        handles.append(await mixer.start(spec, workflow_id=f"{queue}-{index}"))

    await bounded(runs, IN_FLIGHT, start)

    async def waiting() -> int:
        count = 0

        async def check(index: int) -> None:
            nonlocal count
            if (await handles[index].progress()).status == RunStatus.WAITING:
                count += 1

        await bounded(len(handles), 50, check)
        return count

    await eventually(waiting, lambda n: n == runs, f"{runs} runs waiting", within_s=300, every_s=1)
    after = rss_kb(worker.pid)
    for handle in handles:
        await handle.temporal.terminate("benchmark over")
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


# ---------------------------------------------------------------- SIGKILL


async def resume_after_sigkill(workers: WorkerProcesses, client: Client) -> float:
    """Seconds from SIGKILLing the worker running a step to its next attempt starting elsewhere."""
    queue = f"bench-kill-{uuid.uuid4().hex[:8]}"
    first = await workers.start(queue)
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
    second = await workers.start(queue)
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
) -> ScaleFigures:
    figures = ScaleFigures(runs=runs, kill_reps=kill_reps)
    langgraph = langgraph and langgraph_available()
    saved_delay = fake.chunk_delay_s
    # The provider answers at once: throughput is the orchestrator's ceiling.
    fake.chunk_delay_s = 0.0
    log_dir = home / "scale-workers"
    log_dir.mkdir(parents=True, exist_ok=True)
    base = worker_environment(address, "bench-scale", home, fake.env())
    try:
        async with WorkerProcesses(client, log_dir, base) as workers:
            _note(f"throughput: {runs} three-step runs per system")
            queue = f"bench-tp-{uuid.uuid4().hex[:8]}"
            worker = await workers.start(queue)
            figures.throughput["llmmixer"] = await throughput_llmmixer(
                MixerClient(client, queue), runs
            )
            await worker.stop()
            figures.throughput[FLOOR] = await throughput_asyncio(openai_client, runs)
            if langgraph:
                figures.throughput[LANGGRAPH] = await throughput_langgraph(
                    home / "scale-throughput.sqlite", openai_client, runs
                )

            _note(f"memory: {runs} waiting runs per system")
            mb, per_run = await memory_llmmixer(workers, client, runs)
            figures.rss_mb["llmmixer"], figures.rss_per_run_kb["llmmixer"] = mb, per_run
            mb, per_run = await asyncio.to_thread(memory_child, "asyncio-wait", runs, None)
            figures.rss_mb[FLOOR], figures.rss_per_run_kb[FLOOR] = mb, per_run
            if langgraph:
                db = str(home / "scale-memory.sqlite")
                mb, per_run = await asyncio.to_thread(memory_child, "langgraph-wait", runs, db)
                figures.rss_mb[LANGGRAPH], figures.rss_per_run_kb[LANGGRAPH] = mb, per_run

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


def scale_table(figures: ScaleFigures) -> str:
    runs = figures.runs
    lines = [
        "| scale workload | llmmixer | asyncio (floor) | langgraph-sqlite "
        "| llmmixer ÷ asyncio | llmmixer ÷ langgraph |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]

    def row(label: str, values: dict[str, float], fmt: Callable[[float], str]) -> str:
        mine, floor, graph = (values.get(k) for k in ("llmmixer", FLOOR, LANGGRAPH))
        cells = [fmt(v) if v is not None else "–" for v in (mine, floor, graph)]
        return f"| {label} | {' | '.join(cells)} | {_ratio(mine, floor)} | {_ratio(mine, graph)} |"

    lines.append(
        row(
            f"throughput: 3-step runs per second ({runs} runs, ≤{IN_FLIGHT} in flight)",
            figures.throughput,
            lambda v: f"{v:.1f}",
        )
    )
    lines.append(
        row(f"memory: RSS with {runs} runs waiting, MB", figures.rss_mb, lambda v: f"{v:.0f}")
    )
    lines.append(
        row(
            "memory: growth per waiting run, KB",
            figures.rss_per_run_kb,
            lambda v: f"{v:.1f}",
        )
    )
    if figures.resume_s:
        resume = statistics.median(figures.resume_s)
        spread = f"{min(figures.resume_s):.1f}–{max(figures.resume_s):.1f}"
        lines.append(
            f"| SIGKILL → step resumed on a second worker, s (median of {len(figures.resume_s)}"
            f", heartbeat timeout {HEARTBEAT_TIMEOUT_S} s) | {resume:.1f} ({spread}) | lost "
            "| no automatic resume | – | – |"
        )
    return "\n".join(lines)
