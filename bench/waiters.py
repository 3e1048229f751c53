"""The memory benchmark's baselines: a process holding RUNS waiting runs, then its RSS.

    python bench/waiters.py asyncio-wait RUNS
    python bench/waiters.py langgraph-wait RUNS DB_PATH

A process of its own, importing only what the system needs, so its resident
set is that system's alone (``scale.py`` starts it and reads the JSON line it
prints: RSS before and after, in KiB).
"""

from __future__ import annotations

import asyncio
import json
import operator
import os
import sys
from pathlib import Path
from typing import Annotated, Any, TypedDict

IN_FLIGHT = 100


def rss_kb() -> int:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


async def asyncio_waiting(runs: int) -> tuple[int, int]:
    """Coroutines parked on an event: what an in-memory orchestrator's waiting run costs."""
    before = rss_kb()
    release = asyncio.Event()

    async def run(index: int) -> dict[str, Any]:
        # What a run holds while it waits: its spec and its step records.
        spec = {"name": "bench-wait", "steps": [{"id": "gate", "kind": "approval"}]}
        steps = {"gate": {"status": "waiting", "attempts": 1, "output": "", "prompt": "Ship?"}}
        await release.wait()
        return {"id": index, "spec": spec, "steps": steps}

    tasks = [asyncio.create_task(run(index)) for index in range(runs)]
    await asyncio.sleep(0.5)
    after = rss_kb()
    release.set()
    await asyncio.gather(*tasks)
    return before, after


class _State(TypedDict):
    outputs: Annotated[dict[str, str], operator.or_]


async def langgraph_waiting(runs: int, db_path: str) -> tuple[int, int]:
    """Graphs run to an ``interrupt()``: their waiting state is in SQLite, not in memory."""
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
    from langgraph.graph import END, START, StateGraph
    from langgraph.types import interrupt

    def gate(state: _State) -> dict[str, dict[str, str]]:
        return {"outputs": {"gate": str(interrupt("Ship?"))}}

    builder: Any = StateGraph(_State)
    builder.add_node("gate", gate)
    builder.add_edge(START, "gate")
    builder.add_edge("gate", END)
    async with AsyncSqliteSaver.from_conn_string(db_path) as saver:
        graph = builder.compile(checkpointer=saver)
        # One run first, so the baseline includes LangGraph and SQLite warmed up.
        await graph.ainvoke({"outputs": {}}, {"configurable": {"thread_id": "warm-up"}})
        before = rss_kb()
        gate_count = asyncio.Semaphore(IN_FLIGHT)

        async def one(index: int) -> None:
            async with gate_count:
                config = {"configurable": {"thread_id": f"wait-{index}"}}
                await graph.ainvoke({"outputs": {}}, config, durability="sync")

        await asyncio.gather(*(one(index) for index in range(runs)))
        return before, rss_kb()


def main(argv: list[str]) -> None:
    kind, runs = argv[0], int(argv[1])
    if kind == "asyncio-wait":
        before, after = asyncio.run(asyncio_waiting(runs))
    elif kind == "langgraph-wait":
        before, after = asyncio.run(langgraph_waiting(runs, argv[2]))
    else:
        raise SystemExit(f"unknown kind {kind!r}: asyncio-wait or langgraph-wait")
    print(json.dumps({"before_kb": before, "after_kb": after}))


if __name__ == "__main__":
    main(sys.argv[1:])
