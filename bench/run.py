"""Per-step orchestration overhead of llmmixer against raw Temporal, plain asyncio and LangGraph.

    python bench/run.py              # full run (a few minutes); writes the figures into
                                     # bench/README.md and the README's Benchmarks section
    python bench/run.py --quick      # smoke run (under a minute); prints, writes nothing
    python bench/run.py --explore    # also time server and worker settings (see README)
    python bench/run.py --no-scale   # per-step overhead only (skip scale.py's workloads)

Everything runs on this machine: the embedded Temporal dev server (a temp
``LLMMIXER_HOME``, no UI), the workers in this process, and the fake provider
server of ``tests/fakes`` answering every call after a fixed delay. Overhead
per step is (wall time - provider latency on the critical path) / stages.
Then ``scale.py``: one worker's throughput, the memory of waiting runs, and
the time from a worker's SIGKILL to its step resuming on another worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Bytecode caches, as an installed package has them (pip compiles them): the
# workflow sandbox imports the workflow's modules afresh for every run, and
# without caches each import compiles its source again. A machine that sets
# PYTHONDONTWRITEBYTECODE would otherwise time the compiler, not llmmixer.
sys.dont_write_bytecode = False

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# The fake provider lives with the tests (stdlib only); import it as the tests do.
sys.path.insert(0, str(REPO / "tests"))

from fakes.provider_server import FAKE_KEYS, FakeProviderServer, Reply  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402
from report import (  # noqa: E402
    Result,
    about,
    block,
    machine,
    write_between_markers,
)
from scale import (  # noqa: E402
    ScaleFigures,
    model_inputs,
    run_scale,
    scale_table,
    throughput_table,
    workers_table,
)
from systems import (  # noqa: E402
    AsyncioSystem,
    Shape,
    System,
    langgraph_available,
    langgraph_systems,
    llmmixer_worker,
    raw_temporal_worker,
)
from temporalio.client import Client  # noqa: E402

from llmmixer.runtime.address import free_port  # noqa: E402
from llmmixer.runtime.connection import data_converter  # noqa: E402
from llmmixer.workers.devserver import EmbeddedServer  # noqa: E402

SHAPES = (Shape("chain", 10), Shape("fanout", 20))
RUN_TIMEOUT_S = 120.0


@dataclass
class ServerVariant:
    """Embedded-server settings to try; the default is what ``llmmixer dev`` runs."""

    label: str
    dynamic_config: Mapping[str, object] = field(default_factory=dict)
    extra_args: Sequence[str] = ()


@dataclass
class WorkerVariant:
    """llmmixer worker settings to try, on the default server."""

    label: str
    stream_deltas: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)


SERVER_VARIANTS = (
    # Normal task queues have 4 partitions; a poller and a task on different
    # partitions meet only after forwarding. One worker needs only one.
    ServerVariant(
        "1 task-queue partition",
        {"matching.numTaskqueueReadPartitions": 1, "matching.numTaskqueueWritePartitions": 1},
    ),
    # To see what eager activity dispatch is worth (the dev server turns it on).
    ServerVariant("eager activities off", {"system.enableActivityEagerExecution": False}),
    # A reference only: gives up durability through an OS crash, not acceptable.
    ServerVariant("sqlite synchronous=off", extra_args=("--sqlite-pragma", "synchronous=off")),
)

WORKER_VARIANTS = (
    WorkerVariant("stream_deltas off", stream_deltas=False),
    WorkerVariant("workflow polls 2", options={"max_concurrent_workflow_task_polls": 2}),
    WorkerVariant("workflow polls 10", options={"max_concurrent_workflow_task_polls": 10}),
    WorkerVariant("activity polls 20", options={"max_concurrent_activity_task_polls": 20}),
    WorkerVariant("eager activities off", options={"disable_eager_activity_execution": True}),
    WorkerVariant("max_cached_workflows 0", options={"max_cached_workflows": 0}),
)


# ------------------------------------------------------------------ running


@contextlib.asynccontextmanager
async def embedded_server(home: Path, variant: ServerVariant | None) -> AsyncIterator[str]:
    server = EmbeddedServer(
        port=free_port(),
        ui=False,
        home=home,
        dynamic_config=variant.dynamic_config if variant else None,
        extra_args=variant.extra_args if variant else (),
    )
    async with server:
        yield server.address


async def measure(
    systems: Sequence[System],
    fake: FakeProviderServer,
    *,
    reps: int,
    latency_s: float,
    progress: bool = True,
) -> list[Result]:
    """Run every shape on every system ``reps`` times after one warm-up.

    Systems take turns within each repetition, so a slow patch of the machine
    (another process, a GC, the server compacting) is spread over all of them
    instead of landing on one.
    """
    results = {
        (shape, system.name): Result(shape, system.name, latency_s)
        for shape in SHAPES
        for system in systems
    }
    for rep in range(reps + 1):
        for shape in SHAPES:
            for system in systems:
                # One scripted reply per call, each a single chunk after the
                # fake's fixed delay: every call costs exactly the same.
                fake.script("openai", *[Reply(chunks=["ok"]) for _ in range(shape.calls)])
                started = time.perf_counter()
                async with asyncio.timeout(RUN_TIMEOUT_S):
                    await system.run(shape)
                wall = time.perf_counter() - started
                if fake.pending("openai"):
                    raise RuntimeError(f"{system.name} made fewer calls than {shape.name} needs")
                if rep:  # rep 0 warms up connections, caches and the JIT-less imports
                    results[(shape, system.name)].walls_s.append(wall)
        if progress:
            print(f"  repetition {rep}/{reps} done", file=sys.stderr, flush=True)
    return [results[(shape, system.name)] for shape in SHAPES for system in systems]


async def run_main(
    fake: FakeProviderServer, home: Path, args: argparse.Namespace, latency_s: float
) -> list[Result]:
    """The headline comparison on the default server."""
    environ = _worker_environ(fake)
    async with contextlib.AsyncExitStack() as stack:
        address = await stack.enter_async_context(embedded_server(home / "main", None))
        mixer_client = await Client.connect(address, data_converter=data_converter())
        raw_client = await Client.connect(address)  # the SDK's default converter: raw
        openai_client = _openai(fake)
        stack.push_async_callback(openai_client.close)
        systems: list[System] = [
            await stack.enter_async_context(
                llmmixer_worker(mixer_client, "bench-llmmixer", environ)
            ),
            await stack.enter_async_context(
                raw_temporal_worker(raw_client, "bench-raw", openai_client)
            ),
            AsyncioSystem(openai_client),
        ]
        if args.langgraph and langgraph_available():
            systems += await stack.enter_async_context(
                langgraph_systems(home / "langgraph.sqlite", openai_client)
            )
        elif args.langgraph:
            print("langgraph not installed (pip install '.[bench]'): skipped", file=sys.stderr)
        return await measure(systems, fake, reps=args.reps, latency_s=latency_s)


async def run_scale_main(
    fake: FakeProviderServer, home: Path, args: argparse.Namespace
) -> ScaleFigures:
    """The scale workloads, on a server of their own (a fresh SQLite file)."""
    async with contextlib.AsyncExitStack() as stack:
        server = EmbeddedServer(port=free_port(), ui=False, home=home / "scale")
        await stack.enter_async_context(server)
        address = server.address
        client = await Client.connect(address, data_converter=data_converter())
        openai_client = _openai(fake)
        stack.push_async_callback(openai_client.close)
        return await run_scale(
            address,
            client,
            fake,
            home,
            openai_client,
            runs=args.runs,
            kill_reps=args.kill_reps,
            langgraph=args.langgraph,
            server_pid=server.pid,
            wake_reps=1 if args.quick else 3,
            worker_counts=(1, 2) if args.quick else (1, 2, 4),
        )


async def run_hedge_row(
    fake: FakeProviderServer, home: Path, args: argparse.Namespace
) -> str | None:
    """bench/hedge.py's workload, when that file exists: its Markdown, or None.

    ``run_hedge`` is called with the keyword arguments it declares among
    ``fake``, ``home``, ``args``, ``quick`` and ``latency_s``.
    """
    try:
        from hedge import run_hedge  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    offered: dict[str, Any] = {
        "fake": fake,
        "home": home / "hedge",
        "args": args,
        "quick": args.quick,
        "latency_s": args.latency_ms / 1000,
    }
    accepted = inspect.signature(run_hedge).parameters
    found = await run_hedge(**{k: v for k, v in offered.items() if k in accepted})
    if found is None:
        return None
    report = getattr(found, "report", None)
    return str(report() if callable(report) else found)


async def run_explore(
    fake: FakeProviderServer, home: Path, args: argparse.Namespace, latency_s: float
) -> list[tuple[str, list[Result]]]:
    """llmmixer (and raw Temporal, for server settings) under other settings."""
    environ = _worker_environ(fake)
    found: list[tuple[str, list[Result]]] = []
    for index, server_variant in enumerate((None, *SERVER_VARIANTS)):
        label = server_variant.label if server_variant else "defaults"
        print(f"exploring server: {label}", file=sys.stderr, flush=True)
        async with contextlib.AsyncExitStack() as stack:
            address = await stack.enter_async_context(
                embedded_server(home / f"explore-{index}", server_variant)
            )
            mixer_client = await Client.connect(address, data_converter=data_converter())
            raw_client = await Client.connect(address)
            openai_client = _openai(fake)
            stack.push_async_callback(openai_client.close)
            systems: list[System] = [
                await stack.enter_async_context(
                    llmmixer_worker(mixer_client, "bench-llmmixer", environ)
                ),
                await stack.enter_async_context(
                    raw_temporal_worker(raw_client, "bench-raw", openai_client)
                ),
            ]
            if server_variant is None:
                for worker_index, variant in enumerate(WORKER_VARIANTS):
                    systems.append(
                        await stack.enter_async_context(
                            llmmixer_worker(
                                mixer_client,
                                f"bench-llmmixer-{worker_index}",
                                environ,
                                name=f"llmmixer, {variant.label}",
                                stream_deltas=variant.stream_deltas,
                                **variant.options,
                            )
                        )
                    )
            found.append((label, await measure(systems, fake, reps=args.reps, latency_s=latency_s)))
    return found


def _worker_environ(fake: FakeProviderServer) -> dict[str, str]:
    return {"OPENAI_BASE_URL": fake.openai_base_url, "OPENAI_API_KEY": FAKE_KEYS["OPENAI_API_KEY"]}


def _openai(fake: FakeProviderServer) -> AsyncOpenAI:
    # As llmmixer's adapter: SDK retries off, so a fault is never hidden in a timing.
    return AsyncOpenAI(
        api_key=FAKE_KEYS["OPENAI_API_KEY"], base_url=fake.openai_base_url, max_retries=0
    )


# ---------------------------------------------------------------- reporting


def explore_table(found: Sequence[tuple[str, Sequence[Result]]]) -> str:
    lines = [
        "| server | system | chain-10, ms/step | fanout-20, ms/stage |",
        "| --- | --- | ---: | ---: |",
    ]
    for server, results in found:
        by_system: dict[str, dict[str, Result]] = {}
        for result in results:
            by_system.setdefault(result.system, {})[result.shape.kind] = result
        for system, shapes in by_system.items():
            cells = [
                f"{shapes[kind].median_ms:.1f} (p90 {shapes[kind].p90_ms:.1f})"
                for kind in ("chain", "fanout")
            ]
            lines.append(f"| {server} | {system} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def _dump(
    path: Path,
    results: Sequence[Result],
    found: Sequence[tuple[str, Sequence[Result]]],
    scale: ScaleFigures | None = None,
) -> None:
    def rows(items: Sequence[Result]) -> list[dict[str, Any]]:
        return [
            {
                "workload": r.shape.name,
                "system": r.system,
                "latency_s": r.latency_s,
                "walls_s": r.walls_s,
                "overhead_ms_median": r.median_ms,
                "overhead_ms_p90": r.p90_ms,
            }
            for r in items
        ]

    document = {
        "machine": machine(),
        "results": rows(results),
        "explore": {server: rows(items) for server, items in found},
        "scale": scale.as_json() if scale else None,
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repetitions, 20 ms")
    parser.add_argument("--reps", type=int, default=None, help="runs per cell (default 10)")
    parser.add_argument("--latency-ms", type=float, default=None, help="per call (default 100)")
    parser.add_argument("--explore", action="store_true", help="also time settings variants")
    parser.add_argument("--no-langgraph", dest="langgraph", action="store_false")
    parser.add_argument("--no-scale", dest="scale", action="store_false", help="skip scale.py")
    parser.add_argument("--runs", type=int, default=None, help="scale runs (default 1000)")
    parser.add_argument("--kill-reps", type=int, default=None, help="SIGKILLs (default 5)")
    parser.add_argument(
        "--no-write", dest="write", action="store_false", help="print only (implied by --quick)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also save raw timings here")
    args = parser.parse_args(argv)
    args.reps = args.reps or (2 if args.quick else 10)
    args.runs = args.runs or (30 if args.quick else 1000)
    args.kill_reps = args.kill_reps or (1 if args.quick else 5)
    args.latency_ms = (
        args.latency_ms if args.latency_ms is not None else (20 if args.quick else 100)
    )
    args.write = args.write and not args.quick  # a smoke run's figures mean nothing
    return args


async def amain(args: argparse.Namespace) -> None:
    latency_s = args.latency_ms / 1000
    fake = FakeProviderServer().start()
    fake.chunk_delay_s = latency_s
    try:
        with tempfile.TemporaryDirectory(prefix="llmmixer-bench-") as tmp:
            home = Path(tmp)
            results = await run_main(fake, home, args, latency_s)
            found = await run_explore(fake, home, args, latency_s) if args.explore else []
            scale = await run_scale_main(fake, home, args) if args.scale else None
            if scale is not None:
                scale.hedge = await run_hedge_row(fake, home, args)
    finally:
        fake.stop()
    print()
    print(block(results, reps=args.reps, latency_ms=args.latency_ms, short=False))
    if found:
        print()
        print(explore_table(found))
    if scale:
        print()
        print(scale_sections(scale))
    if args.json:
        _dump(args.json, results, found, scale)
    if args.write:
        write_between_markers(
            BENCH / "README.md",
            block(results, reps=args.reps, latency_ms=args.latency_ms, short=False),
        )
        short = block(results, reps=args.reps, latency_ms=args.latency_ms, short=True)
        if scale:
            short += "\n\n" + scale_table(scale) + "\n\n" + throughput_table(scale)
            write_between_markers(BENCH / "README.md", scale_about(scale), "bench-scale")
            write_between_markers(BENCH / "README.md", model_inputs(scale), "bench-model")
            if scale.hedge:
                write_between_markers(BENCH / "README.md", scale.hedge, "hedge")
        write_between_markers(REPO / "README.md", short)
        if found:
            line = about(
                reps=args.reps, latency_ms=args.latency_ms, command="python bench/run.py --explore"
            )
            write_between_markers(
                BENCH / "README.md", f"{line}\n\n{explore_table(found)}", "bench-explore"
            )
        print("\nfigures written to bench/README.md and README.md", file=sys.stderr)


def scale_sections(scale: ScaleFigures) -> str:
    """The scale tables, one after another."""
    parts = [scale_table(scale), throughput_table(scale), workers_table(scale)]
    if scale.hedge:
        parts.append(scale.hedge)
    return "\n\n".join(parts)


def scale_about(scale: ScaleFigures) -> str:
    line = about(reps=scale.kill_reps, latency_ms=0).split(": fixed provider latency")[0]
    return (
        f"{line}, on {machine()}: {scale.runs} runs per workload, the fake provider "
        f"answering at once.\n\n{scale_table(scale)}\n\n{throughput_table(scale)}"
        f"\n\n{workers_table(scale)}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    main()
