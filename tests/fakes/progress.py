"""Waiting on a run from a test: poll its progress until a condition holds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from llmmixer.client.mixer import MixerClient, MixerHandle
from llmmixer.workflows.records import RunProgress, StepStatus


async def until(
    handle: MixerHandle,
    predicate: Callable[[RunProgress], bool],
    what: str = "",
    within_s: float = 30.0,
) -> RunProgress:
    """The first progress answer for which ``predicate`` holds; fails after ``within_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        progress = await handle.progress()
        if predicate(progress):
            return progress
        if loop.time() > deadline:
            raise AssertionError(
                f"never reached: {what or 'condition'}; last progress:\n"
                f"{progress.model_dump_json(indent=1)}"
            )
        await asyncio.sleep(0.1)


def waiting(step: str) -> Callable[[RunProgress], bool]:
    return lambda progress: progress.steps[step].status == StepStatus.WAITING


async def runs_of(mixer: MixerClient, workflow_id: str) -> int:
    """How many runs the workflow id has had (continue-as-new adds one each time)."""
    query = f'WorkflowId="{workflow_id}"'
    return len([e async for e in mixer.temporal.list_workflows(query)])
