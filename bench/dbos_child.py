"""The DBOS row of the scale table: a process running RUNS three-step workflows with DBOS.

    OPENAI_BASE_URL=... OPENAI_API_KEY=... python bench/dbos_child.py RUNS DB_PATH

DBOS keeps its durable state in a system database; here its SQLite one
(``sqlite:///DB_PATH``), written before each step returns, so a finished step
is never run again: the same promise as Temporal's history. Each step is one
streamed Chat Completions call through the ``openai`` SDK against the fake
provider, as every other system makes it. A process of its own, so its CPU
time is DBOS's alone (``scale.py`` reads the JSON line it prints).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path

from openai import AsyncOpenAI

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from raw_temporal import stream_chat  # noqa: E402

MODEL = "gpt-5-mini"
IN_FLIGHT = 100


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(runs: int, db_path: str) -> dict[str, float]:
    from dbos import DBOS

    client = AsyncOpenAI(
        api_key=os.environ["OPENAI_API_KEY"], base_url=os.environ["OPENAI_BASE_URL"], max_retries=0
    )

    @DBOS.step()
    async def call(prompt: str) -> str:
        return await stream_chat(client, MODEL, prompt)

    @DBOS.workflow()
    async def three(index: int) -> str:
        text = await call("first")
        text = await call(f"second: {text}")
        return await call(f"third: {text}")

    DBOS(config={"name": "llmmixer-bench", "system_database_url": f"sqlite:///{db_path}"})
    DBOS.launch()
    try:
        await (await DBOS.start_workflow_async(three, -1)).get_result()  # warm-up
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one(index: int) -> None:
            async with gate:
                handle = await DBOS.start_workflow_async(three, index)
                await handle.get_result()

        started, cpu = time.perf_counter(), cpu_s()
        await asyncio.gather(*(one(index) for index in range(runs)))
        elapsed, used = time.perf_counter() - started, cpu_s() - cpu
    finally:
        DBOS.destroy()
        await client.close()
    return {"runs_per_s": runs / elapsed, "cpu_s": used}


def main(argv: list[str]) -> None:
    print(json.dumps(asyncio.run(run(int(argv[0]), argv[1]))))


if __name__ == "__main__":
    main(sys.argv[1:])
