"""The raw Temporal baseline: what a person would write by hand, one activity per call.

This is the yardstick for llmmixer's interpretation of a spec. The workflows
know their shape in code (no spec, no validation, no records, no event stream)
and the activity streams one Chat Completions call through the ``openai`` SDK,
exactly as llmmixer's OpenAI adapter does, against the same fake provider. So
the difference between the two is what llmmixer adds on top of Temporal.

Both sides use the same retry limit (one attempt) so a fault shows as an error
rather than as hidden retry time, and the default sandboxed workflow runner.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from openai import AsyncOpenAI

ACTIVITY_NAME = "bench_call_model"
_TIMEOUT = timedelta(seconds=60)
_ONE_ATTEMPT = RetryPolicy(maximum_attempts=1)


class ModelActivities:
    """Holds one SDK client per worker, as llmmixer's provider pool does."""

    def __init__(self, client: AsyncOpenAI, model: str) -> None:
        self._client = client
        self._model = model

    @activity.defn(name=ACTIVITY_NAME)
    async def call_model(self, prompt: str) -> str:
        return await stream_chat(self._client, self._model, prompt)


async def stream_chat(client: AsyncOpenAI, model: str, prompt: str) -> str:
    """One streamed Chat Completions call; the asyncio and LangGraph baselines use it too."""
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        stream_options={"include_usage": True},
    )
    parts: list[str] = []
    async with stream:
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    parts.append(choice.delta.content)
    return "".join(parts)


async def _call(prompt: str) -> str:
    return await workflow.execute_activity(
        ACTIVITY_NAME,
        prompt,
        result_type=str,
        start_to_close_timeout=_TIMEOUT,
        retry_policy=_ONE_ATTEMPT,
    )


@workflow.defn(name="BenchRawChain")
class RawChainWorkflow:
    """``length`` calls in a row, each prompt carrying the previous answer."""

    @workflow.run
    async def run(self, length: int) -> str:
        text = ""
        for index in range(length):
            text = await _call(f"step {index}: {text}")
        return text


@workflow.defn(name="BenchRawFanOut")
class RawFanOutWorkflow:
    """One root call, ``width`` calls in parallel on its answer, one join over all of them."""

    @workflow.run
    async def run(self, width: int) -> str:
        root = await _call("root")
        branches = await asyncio.gather(*(_call(f"branch {i}: {root}") for i in range(width)))
        return await _call("join: " + " | ".join(branches))


@workflow.defn(name="BenchRawWait")
class RawWaitWorkflow:
    """Waits for a person's ``approve`` signal: the raw baseline of a waiting run."""

    def __init__(self) -> None:
        self._approved = False

    @workflow.signal(name="approve")
    def approve(self) -> None:
        self._approved = True

    @workflow.run
    async def run(self) -> str:
        await workflow.wait_condition(lambda: self._approved)
        return "approved"
