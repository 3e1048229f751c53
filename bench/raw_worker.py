"""A raw Temporal worker in a process of its own, for scale.py's throughput and memory rows.

    OPENAI_BASE_URL=... OPENAI_API_KEY=... python bench/raw_worker.py ADDRESS TASK_QUEUE

The SDK's default worker options (as ``systems.raw_temporal_worker``), the
workflows of ``raw_temporal.py`` and its one activity. Prints ``ready`` once
polling and runs until SIGTERM, so its CPU time and resident set are the raw
baseline's alone, next to an ``llmmixer worker`` process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from openai import AsyncOpenAI
from temporalio.client import Client
from temporalio.worker import Worker

sys.path.insert(0, str(Path(__file__).resolve().parent))

from raw_temporal import (
    ModelActivities,
    RawChainWorkflow,
    RawFanOutWorkflow,
    RawWaitWorkflow,
)

MODEL = "gpt-5-mini"


async def main(address: str, task_queue: str) -> None:
    client = await Client.connect(address)
    openai_client = AsyncOpenAI(
        api_key=os.environ["OPENAI_API_KEY"], base_url=os.environ["OPENAI_BASE_URL"], max_retries=0
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    activities = ModelActivities(openai_client, MODEL)
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[RawChainWorkflow, RawFanOutWorkflow, RawWaitWorkflow],
        activities=[activities.call_model],
    ):
        print("ready", flush=True)
        await stop.wait()
    await openai_client.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
