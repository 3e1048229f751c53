"""The systems under test: each runs a workload shape once, against the same fake provider.

Every system makes the same provider calls (one streamed Chat Completions
call per step through the ``openai`` SDK) so that subtracting the provider's
fixed latency leaves only what the system itself costs:

- ``llmmixer``: a spec run by ``MixerWorkflow`` on an in-process worker.
- ``raw-temporal``: the hand-written workflows of ``raw_temporal.py``.
- ``asyncio``: plain coroutines calling the SDK. The floor: no durability.
- ``langgraph``: a ``StateGraph`` with the SQLite checkpointer, written per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import operator
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypedDict

from openai import AsyncOpenAI
from raw_temporal import ModelActivities, RawChainWorkflow, RawFanOutWorkflow, stream_chat
from temporalio.client import Client
from temporalio.worker import Worker

from llmmixer.activities.checks import CHECK_ACTIVITIES
from llmmixer.activities.commands import CommandActivities
from llmmixer.activities.llm import LlmActivities, LlmSettings
from llmmixer.activities.providers.settings import ProviderSettings
from llmmixer.activities.search import SearchAttributeCheck
from llmmixer.activities.terminal.policy import CommandPolicy
from llmmixer.client.mixer import MixerClient
from llmmixer.workers.plugin import sandbox_runner
from llmmixer.workers.worker import WorkerSettings, mixer_worker
from llmmixer.workflows.mixer import MixerWorkflow

MODEL = "gpt-5-mini"  # priced in activities/prices.toml, so llmmixer's cost path runs too


@dataclass(frozen=True)
class Shape:
    """A workload: ``chain`` of ``size`` steps, or root, ``size`` in parallel, join."""

    kind: Literal["chain", "fanout"]
    size: int

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.size}"

    @property
    def calls(self) -> int:
        return self.size if self.kind == "chain" else self.size + 2

    @property
    def stages(self) -> int:
        """Provider calls on the critical path: each costs the fixed latency once."""
        return self.size if self.kind == "chain" else 3


class System(Protocol):
    name: str

    async def run(self, shape: Shape) -> None:
        """Run ``shape`` once to completion; raise if it did not complete."""


# ---------------------------------------------------------------- llmmixer


def mixer_spec(shape: Shape) -> dict[str, Any]:
    """The shape as an llmmixer spec; each step's prompt reads the steps it needs."""
    defaults = {
        "provider": "openai",
        "model": MODEL,
        "on_failure": "fail",
        "retry": {"max_attempts": 1},
    }
    steps: list[dict[str, Any]] = []
    if shape.kind == "chain":
        for index in range(shape.size):
            step: dict[str, Any] = {"id": f"s{index}", "prompt": f"step {index}"}
            if index:
                step["needs"] = [f"s{index - 1}"]
                step["prompt"] += f": {{{{steps.s{index - 1}.output}}}}"
            steps.append(step)
    else:
        branches = [f"b{index}" for index in range(shape.size)]
        steps.append({"id": "root", "prompt": "root"})
        steps += [
            {"id": branch, "needs": ["root"], "prompt": f"{branch}: {{{{steps.root.output}}}}"}
            for branch in branches
        ]
        steps.append(
            {
                "id": "join",
                "needs": branches,
                "prompt": "join: " + " | ".join(f"{{{{steps.{b}.output}}}}" for b in branches),
            }
        )
    return {"name": f"bench-{shape.name}", "defaults": defaults, "steps": steps}


class LlmmixerSystem:
    def __init__(self, name: str, client: Client, task_queue: str) -> None:
        self.name = name
        self._mixer = MixerClient(client, task_queue)

    async def run(self, shape: Shape) -> None:
        handle = await self._mixer.start(
            mixer_spec(shape), workflow_id=f"bench-{shape.name}-{uuid.uuid4().hex[:10]}"
        )
        result = await handle.result()  # raises RunFailed unless completed
        if result.status.value != "completed":
            raise RuntimeError(f"{self.name}: run ended {result.status.value}")


@contextlib.asynccontextmanager
async def llmmixer_worker(
    client: Client,
    task_queue: str,
    environ: dict[str, str],
    *,
    name: str = "llmmixer",
    stream_deltas: bool = True,
    **worker_options: Any,
) -> AsyncIterator[LlmmixerSystem]:
    """llmmixer's own worker (``mixer_worker``), as ``llmmixer worker`` builds it.

    ``worker_options`` are extra ``temporalio.worker.Worker`` options to
    explore; ``mixer_worker`` does not expose them, so a worker with them is
    assembled here from the same parts (a copy used for exploring only).
    """
    settings = WorkerSettings(task_queue=task_queue, stream_deltas=stream_deltas)
    if not worker_options:
        async with mixer_worker(client, settings, environ=environ) as worker, worker:
            yield LlmmixerSystem(name, client, task_queue)
        return
    llm = LlmActivities(
        ProviderSettings.from_env(environ),
        settings=LlmSettings(stream_deltas=settings.stream_deltas),
    )
    commands = CommandActivities(CommandPolicy.from_env(environ))
    options: dict[str, Any] = {
        "workflow_runner": sandbox_runner(),
        "max_concurrent_activities": settings.max_concurrent_activities,
        "max_concurrent_workflow_tasks": settings.max_concurrent_workflow_tasks,
        "max_cached_workflows": 1000,
        **worker_options,
    }
    try:
        async with Worker(
            client,
            task_queue=task_queue,
            workflows=[MixerWorkflow],
            activities=[
                *CHECK_ACTIVITIES,
                SearchAttributeCheck().registered,
                llm.call_llm,
                commands.run_command,
            ],
            **options,
        ):
            yield LlmmixerSystem(name, client, task_queue)
    finally:
        await llm.aclose()


# ------------------------------------------------------------ raw Temporal


class RawTemporalSystem:
    name = "raw-temporal"

    def __init__(self, client: Client, task_queue: str) -> None:
        self._client = client
        self._task_queue = task_queue

    async def run(self, shape: Shape) -> None:
        workflow = RawChainWorkflow.run if shape.kind == "chain" else RawFanOutWorkflow.run
        await self._client.execute_workflow(
            workflow,
            shape.size,
            id=f"bench-raw-{shape.name}-{uuid.uuid4().hex[:10]}",
            task_queue=self._task_queue,
        )


@contextlib.asynccontextmanager
async def raw_temporal_worker(
    client: Client, task_queue: str, openai_client: AsyncOpenAI
) -> AsyncIterator[RawTemporalSystem]:
    """A worker with the SDK's default options: what a hand-written app starts with."""
    activities = ModelActivities(openai_client, MODEL)
    worker = Worker(
        client,
        task_queue=task_queue,
        workflows=[RawChainWorkflow, RawFanOutWorkflow],
        activities=[activities.call_model],
    )
    async with worker:
        yield RawTemporalSystem(client, task_queue)


# ----------------------------------------------------------------- asyncio


class AsyncioSystem:
    name = "asyncio"

    def __init__(self, openai_client: AsyncOpenAI) -> None:
        self._call: Callable[[str], Awaitable[str]] = lambda prompt: stream_chat(
            openai_client, MODEL, prompt
        )

    async def run(self, shape: Shape) -> None:
        if shape.kind == "chain":
            text = ""
            for index in range(shape.size):
                text = await self._call(f"step {index}: {text}")
            return
        root = await self._call("root")
        branches = await asyncio.gather(
            *(self._call(f"branch {index}: {root}") for index in range(shape.size))
        )
        await self._call("join: " + " | ".join(branches))


# --------------------------------------------------------------- LangGraph


def langgraph_available() -> bool:
    # An optional extra (`pip install '.[bench]'`): without it that row is skipped.
    import importlib.util

    try:
        return all(
            importlib.util.find_spec(name) is not None
            for name in ("langgraph.graph", "langgraph.checkpoint.sqlite.aio")
        )
    except ModuleNotFoundError:  # a parent package is missing
        return False


class _GraphState(TypedDict):
    # Each node adds its own answer; parallel branches' updates are merged.
    outputs: Annotated[dict[str, str], operator.or_]


class LangGraphSystem:
    """A compiled graph per shape with ``AsyncSqliteSaver``.

    ``durability="sync"`` writes each superstep's checkpoint before the next
    one starts: the same promise as Temporal's (a finished step is never run
    again), which is what this comparison is about. LangGraph's default,
    ``"async"``, writes it while the next step already runs.
    """

    def __init__(self, name: str, checkpointer: Any, openai_client: AsyncOpenAI, durability: str):
        self.name = name
        self._saver = checkpointer
        self._openai = openai_client
        self._durability = durability
        self._graphs: dict[Shape, Any] = {}

    def _node(self, step: str, reads: list[str]) -> Callable[[_GraphState], Awaitable[Any]]:
        async def node(state: _GraphState) -> dict[str, dict[str, str]]:
            prompt = f"{step}: " + " | ".join(state["outputs"].get(r, "") for r in reads)
            return {"outputs": {step: await stream_chat(self._openai, MODEL, prompt)}}

        return node

    def _graph(self, shape: Shape) -> Any:
        from langgraph.graph import END, START, StateGraph

        if shape in self._graphs:
            return self._graphs[shape]
        builder: Any = StateGraph(_GraphState)
        if shape.kind == "chain":
            names = [f"s{index}" for index in range(shape.size)]
            for index, step in enumerate(names):
                builder.add_node(step, self._node(step, names[index - 1 : index]))
            builder.add_edge(START, names[0])
            for before, after in itertools.pairwise(names):
                builder.add_edge(before, after)
            builder.add_edge(names[-1], END)
        else:
            branches = [f"b{index}" for index in range(shape.size)]
            builder.add_node("root", self._node("root", []))
            for branch in branches:
                builder.add_node(branch, self._node(branch, ["root"]))
                builder.add_edge("root", branch)
            builder.add_node("join", self._node("join", branches))
            builder.add_edge(START, "root")
            builder.add_edge(branches, "join")  # waits for all of them
            builder.add_edge("join", END)
        graph = builder.compile(checkpointer=self._saver)
        self._graphs[shape] = graph
        return graph

    async def run(self, shape: Shape) -> None:
        config = {"configurable": {"thread_id": uuid.uuid4().hex}}
        await self._graph(shape).ainvoke({"outputs": {}}, config, durability=self._durability)


@contextlib.asynccontextmanager
async def langgraph_systems(
    db_path: Path, openai_client: AsyncOpenAI
) -> AsyncIterator[list[LangGraphSystem]]:
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    async with AsyncSqliteSaver.from_conn_string(str(db_path)) as saver:
        yield [
            LangGraphSystem("langgraph-sqlite", saver, openai_client, "sync"),
            LangGraphSystem("langgraph-sqlite-async", saver, openai_client, "async"),
        ]
