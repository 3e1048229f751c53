"""Prompt caching on a shared-context fan-out: input cost with `cache: auto` against `cache: off`.

    python bench/caching.py              # prints the figures
    python bench/caching.py --write      # also writes them into the README's Benchmarks section

Twenty sibling steps share one 10,000-token context (the diff, the document)
and each asks its own question after it, run by ``MixerWorkflow`` on the
embedded dev server against the fake provider of ``tests/fakes``, which
accounts Anthropic's prompt cache as Anthropic does: a prefix is written
once the writing reply has started, read after that, and siblings sent at
the same moment all miss. The input cost of each run is priced from the
step records with ``activities/prices.toml`` (claude-sonnet-5-5: a cache
write at 1.25x the input price, a read at 0.05x). Not a timed test: the figure depends on the price
table and the layout, not on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))

from fakes.provider_server import FAKE_KEYS, FakeProviderServer, fake_tokens  # noqa: E402
from report import write_between_markers  # noqa: E402
from temporalio.client import Client  # noqa: E402

from llmmixer.activities.pricing import PriceTable  # noqa: E402
from llmmixer.client.mixer import MixerClient  # noqa: E402
from llmmixer.core.contracts import Usage  # noqa: E402
from llmmixer.runtime.address import free_port  # noqa: E402
from llmmixer.runtime.connection import data_converter  # noqa: E402
from llmmixer.workers.devserver import EmbeddedServer  # noqa: E402
from llmmixer.workers.worker import WorkerSettings, mixer_worker  # noqa: E402

SIBLINGS = 20
CONTEXT_TOKENS = 10_000
MODEL = "claude-sonnet-5-5"
GOAL = 0.30  # at most 30% of the uncached input cost
MARKER = "caching"


def context() -> str:
    line = "- def handler(request): return render(request, 'page.html', context)\n"
    text = line * (CONTEXT_TOKENS * 4 // len(line) + 1)
    return text[: CONTEXT_TOKENS * 4]


def fanout_spec(cache: str) -> dict[str, Any]:
    return {
        "name": f"shared-context-{cache}",
        "inputs": {"diff": context()},
        "defaults": {"provider": "anthropic", "model": MODEL, "cache": cache, "max_tokens": 300},
        "steps": [
            # The shared context first, each step's own question after a blank line.
            {"id": f"review-{i}", "prompt": f"{{{{inputs.diff}}}}\n\nReview aspect {i} of it."}
            for i in range(SIBLINGS)
        ],
    }


def input_cost(prices: PriceTable, steps: list[Usage]) -> float:
    """Each step priced on its own (a long-context tier applies per call), then summed."""
    total = 0.0
    for usage in steps:
        cost = prices.cost("anthropic", MODEL, usage.model_copy(update={"output_tokens": 0}))
        assert cost is not None, f"{MODEL} must be in prices.toml"
        total += cost
    return total


async def run(mixer: MixerClient, cache: str) -> list[Usage]:
    handle = await mixer.start(fanout_spec(cache), workflow_id=f"cache-{cache}-{uuid.uuid4().hex}")
    result = await handle.result()
    return [record.usage for record in result.steps.values()]


async def measure() -> dict[str, list[Usage]]:
    fake = FakeProviderServer().start()
    # Replies take a while, as real ones do, so the siblings really overlap.
    fake.chunk_delay_s = 0.05
    environ = {
        "ANTHROPIC_BASE_URL": fake.anthropic_base_url,
        "ANTHROPIC_API_KEY": FAKE_KEYS["ANTHROPIC_API_KEY"],
    }
    usages: dict[str, list[Usage]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="llmmixer-cache-bench-") as home:
            async with EmbeddedServer(port=free_port(), ui=False, home=Path(home)) as server:
                client = await Client.connect(server.address, data_converter=data_converter())
                settings = WorkerSettings(task_queue=f"cache-bench-{uuid.uuid4().hex[:8]}")
                async with mixer_worker(client, settings, environ=environ) as worker, worker:
                    mixer = MixerClient(client, settings.task_queue)
                    for cache in ("off", "auto"):
                        fake.reset()
                        fake.chunk_delay_s = 0.05
                        usages[cache] = await run(mixer, cache)
    finally:
        fake.stop()
    return usages


def report(usages: dict[str, list[Usage]]) -> str:
    prices = PriceTable.load()
    off, auto = usages["off"], usages["auto"]
    ratio = input_cost(prices, auto) / input_cost(prices, off)

    def row(name: str, steps: list[Usage]) -> str:
        u = sum(steps, Usage())
        return (
            f"| `{name}` | {u.input_tokens:,} | {u.cache_read_tokens:,} | "
            f"{u.cache_write_tokens:,} | ${input_cost(prices, steps):.4f} |"
        )

    verdict = "meets" if ratio <= GOAL else "misses"
    price = prices.price("anthropic", MODEL)
    assert price is not None and price.cache_write is not None and price.cached_input is not None
    write, read = price.cache_write / price.input, price.cached_input / price.input
    return "\n".join(
        [
            f"{SIBLINGS} sibling steps sharing a {fake_tokens(context()):,}-token context, "
            f"{MODEL} prices (cache write {write:g}x input, read {read:g}x), through the fake "
            "provider's Anthropic cache accounting (`python bench/caching.py`):",
            "",
            "| `cache` | input tokens | read from cache | written to cache | input cost |",
            "| --- | ---: | ---: | ---: | ---: |",
            row("off", off),
            row("auto", auto),
            "",
            f"With `cache: auto` the fan-out's input costs **{ratio:.0%}** of the uncached "
            f"input ({verdict} the goal of at most {GOAL:.0%}): the first sibling writes the "
            "context once, the others wait on this worker until it has started and read it.",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write into README.md")
    args = parser.parse_args(argv)
    text = report(asyncio.run(measure()))
    print(text)
    if args.write:
        write_between_markers(REPO / "README.md", text, MARKER)


if __name__ == "__main__":
    main()
