"""Tail latency of a 20-way fan-out stage, with and without `hedge`.

    python bench/hedge.py              # 50 runs each way (about 15 minutes); prints the table
    python bench/hedge.py --write      # also rewrites the hedge block of bench/README.md
    python bench/hedge.py --quick      # 8 runs each way of a 10-way stage, times cut by 10
    python bench/hedge.py --max 2      # only the hedged runs with max 2 (default: 1 and 2)

The fake provider of ``tests/fakes`` answers each call's first token after
a drawn wait (95% of calls after 1 s, 5% after 10 s, from a seeded
generator): the tail that hedging is for. Twenty sibling steps run side by
side (one stage: the run's wall time is its slowest call), run by
``MixerWorkflow`` on the embedded dev server, ``runs`` times without
``hedge`` and ``runs`` times with each ``defaults.hedge`` (``after: p90``,
learned by the worker from a warm-up run, with ``max: 1`` and ``max: 2``
by default; the goal is judged on the last). Reported: p50, p95 and
p99 of the runs' wall times, how many second calls started and won, and
what they cost in extra prompt tokens. Not a timed test: it runs minutes,
and its figures depend on the drawn latencies as much as on llmmixer.

``run_hedge(...)`` is the entry point for ``bench/run.py``; ``HedgeFigures``
prints itself (``report()``) and fills in the ``hedge`` block of
bench/README.md (``write()``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(BENCH))

from fakes.provider_server import FAKE_KEYS, FakeProviderServer, LatencyMix  # noqa: E402
from report import machine, percentile, write_between_markers  # noqa: E402
from temporalio.client import Client  # noqa: E402

from llmmixer.client.mixer import MixerClient  # noqa: E402
from llmmixer.runtime.address import free_port  # noqa: E402
from llmmixer.runtime.connection import data_converter  # noqa: E402
from llmmixer.workers.devserver import EmbeddedServer  # noqa: E402
from llmmixer.workers.worker import WorkerSettings, mixer_worker  # noqa: E402
from llmmixer.workflows.records import RunProgress  # noqa: E402

MARKER = "hedge"  # <!-- hedge:start --> ... <!-- hedge:end --> in bench/README.md
README = BENCH / "README.md"
MODEL = "gpt-4.1-mini"
GOAL = 1.5  # p99 at most 1.5x p50 with hedging


@dataclass(frozen=True)
class HedgeWorkload:
    runs: int = 50
    width: int = 20
    fast_s: float = 1.0
    slow_s: float = 10.0
    slow_share: float = 0.05
    seed: int = 18
    # The hedge every step gets in the hedged runs, as a spec writes it,
    # and the `max` of each hedged configuration (the goal is judged on the last).
    hedge: dict[str, Any] = field(default_factory=lambda: {"after": "p90"})
    maxes: tuple[int, ...] = (1, 2)

    def hedges(self) -> list[dict[str, Any]]:
        return [self.hedge | ({"max": m} if m > 1 else {}) for m in self.maxes]

    @classmethod
    def quick(cls) -> HedgeWorkload:
        return cls(runs=8, width=10, fast_s=0.1, slow_s=1.0, slow_share=0.1)


@dataclass
class Variant:
    """The runs of one configuration: wall times and what the hedges did."""

    label: str
    walls_s: list[float] = field(default_factory=list)
    calls: int = 0
    hedges: int = 0
    hedge_wins: int = 0
    extra_input_tokens: int = 0
    input_tokens: int = 0
    reasons: list[str] = field(default_factory=list)
    second_reasons: list[str] = field(default_factory=list)

    # Hedges a call may get (0: no hedge).
    max_hedges: int = 0

    def add(self, wall_s: float, result: RunProgress) -> None:
        self.walls_s.append(wall_s)
        for record in result.steps.values():
            self.calls += 1
            self.input_tokens += record.usage.input_tokens
            for note in record.hedges:
                self.hedges += 1
                self.hedge_wins += note.winner == "hedge"
                self.extra_input_tokens += note.loser_usage.input_tokens
                (self.reasons if note.number == 1 else self.second_reasons).append(note.reason)

    def p(self, q: float) -> float:
        return percentile(self.walls_s, q)


@dataclass
class HedgeFigures:
    workload: HedgeWorkload
    plain: Variant
    hedged: list[Variant]
    command: str = "python bench/hedge.py"

    def report(self) -> str:
        w = self.workload

        def row(v: Variant) -> str:
            ratio = v.p(0.99) / v.p(0.5)
            hedged = f"{v.hedges} ({v.hedges / v.calls:.1%})" if v.calls else "0"
            extra = f"{v.extra_input_tokens / v.input_tokens:.1%}" if v.input_tokens else "-"
            return (
                f"| {v.label} | {len(v.walls_s)} | {v.p(0.5):.2f} | {v.p(0.95):.2f} | "
                f"{v.p(0.99):.2f} | {ratio:.1f}× | {hedged} | {v.hedge_wins} | {extra} |"
            )

        def stage_share(hedges: int) -> float:
            # A call stays slow only when it and each of its hedges are.
            return 1 - (1 - w.slow_share ** (hedges + 1)) ** w.width

        def slow_stages(hedges: int) -> str:
            caught = 1 - (1 - stage_share(hedges)) ** w.runs
            return (
                f"{_pct(w.slow_share ** (hedges + 1))} of calls, {_pct(stage_share(hedges))} "
                f"of stages (the chance that one of {w.runs} runs holds one: {_pct(caught)})"
            )

        goal = self.hedged[-1]
        ratio = goal.p(0.99) / goal.p(0.5)
        verdict = "meets" if ratio <= GOAL else "misses"
        example = next((r for v in self.hedged for r in v.reasons), "(no hedge started)")
        second = next((r for v in self.hedged for r in v.second_reasons), None)
        moves = "; ".join(
            f"{v.label}: p50 {v.p(0.5):.1f} s, p95 {v.p(0.95):.1f} s, "
            f"p99 {v.p(0.99):.1f} s ({v.p(0.99) / v.p(0.5):.1f}× p50)"
            for v in self.hedged
        )
        tails = "; ".join(
            f"with {v.max_hedges} hedge{'s' if v.max_hedges > 1 else ''}: "
            f"{slow_stages(v.max_hedges)}"
            for v in self.hedged
        )
        lines = [
            f"Measured {time.strftime('%Y-%m-%d')} by `{self.command}`: a {w.width}-way "
            f"fan-out stage, {w.runs} runs each way; the fake provider's first token "
            f"after {w.fast_s:g} s for {1 - w.slow_share:.0%} of calls and {w.slow_s:g} s "
            f"for {w.slow_share:.0%} (seed {w.seed}); on {machine()}.",
            "",
            "| config | runs | wall s, p50 | p95 | p99 | p99 / p50 | hedges started "
            "| won by a hedge | extra prompt tokens |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            row(self.plain),
            *(row(v) for v in self.hedged),
            "",
            f"Without hedging: p50 {self.plain.p(0.5):.1f} s, p95 {self.plain.p(0.95):.1f} s. "
            f"{moves}. With `{goal.label.strip('`')}`, p99 is **{ratio:.1f}× p50** "
            f"({verdict} the goal of at most {GOAL:g}×). A stage waits for its slowest "
            f"call, and a call stays slow ({w.slow_s:g} s) only when it and each of its "
            f"hedges are. Without hedging: {slow_stages(0)}; {tails}. "
            f"A hedge's reason, as the step's record says it: `{example}`"
            + (f"; a second hedge's: `{second}`." if second else "."),
        ]
        return "\n".join(lines)

    def write(self, path: Path = README) -> None:
        write_between_markers(path, self.report(), MARKER)


def _pct(share: float) -> str:
    return f"{share * 100:.3g}%"


def fanout_spec(width: int, hedge: dict[str, Any] | None) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "provider": "openai",
        "model": MODEL,
        "on_failure": "fail",
        # The loser hears of its cancellation at its next keep-alive beat
        # (every quarter of this); shorter risks losing a healthy call to a
        # busy event loop on a loaded machine.
        "heartbeat_timeout_s": 8,
    }
    if hedge is not None:
        defaults["hedge"] = hedge
    return {
        "name": "hedge-fanout" if hedge else "plain-fanout",
        "defaults": defaults,
        "steps": [{"id": f"b{i}", "prompt": f"branch {i}"} for i in range(width)],
    }


async def _run(mixer: MixerClient, spec: dict[str, Any]) -> tuple[float, RunProgress]:
    started = time.monotonic()
    handle = await mixer.start(spec, workflow_id=f"{spec['name']}-{uuid.uuid4().hex[:10]}")
    result = await handle.result()
    return time.monotonic() - started, result


async def measure(mixer: MixerClient, workload: HedgeWorkload) -> HedgeFigures:
    """All variants on a running worker whose LLM calls go to a fake with ``workload``'s mix."""
    plain = Variant("no hedge")
    hedged = [
        Variant("`hedge: {" + ", ".join(f"{k}: {v}" for k, v in hedge.items()) + "}`", max_hedges=m)
        for hedge, m in zip(workload.hedges(), workload.maxes, strict=True)
    ]
    # A warm-up run: the SDK's client is built, and the worker learns the
    # model's first-token latencies (a learned `after` needs min_samples).
    await _run(mixer, fanout_spec(workload.width, None))
    configs: list[tuple[Variant, dict[str, Any] | None]] = [(plain, None)]
    configs += list(zip(hedged, workload.hedges(), strict=True))
    for variant, hedge in configs:
        for _ in range(workload.runs):
            wall, result = await _run(mixer, fanout_spec(workload.width, hedge))
            variant.add(wall, result)
    return HedgeFigures(workload, plain, hedged)


async def run_hedge(
    workload: HedgeWorkload | None = None, *, quick: bool = False, progress: bool = False
) -> HedgeFigures:
    """Start the embedded server, a worker and the fake; run both variants; stop them."""
    workload = workload or (HedgeWorkload.quick() if quick else HedgeWorkload())
    fake = FakeProviderServer().start()
    fake.latency = LatencyMix(
        fast_s=workload.fast_s,
        slow_s=workload.slow_s,
        slow_share=workload.slow_share,
        seed=workload.seed,
    )
    environ = {
        "OPENAI_BASE_URL": fake.openai_base_url,
        "OPENAI_API_KEY": FAKE_KEYS["OPENAI_API_KEY"],
    }
    try:
        with tempfile.TemporaryDirectory(prefix="llmmixer-hedge-bench-") as home:
            async with EmbeddedServer(port=free_port(), ui=False, home=Path(home)) as server:
                client = await Client.connect(server.address, data_converter=data_converter())
                settings = WorkerSettings(task_queue=f"hedge-bench-{uuid.uuid4().hex[:8]}")
                async with mixer_worker(client, settings, environ=environ) as worker, worker:
                    figures = await measure(MixerClient(client, settings.task_queue), workload)
    finally:
        fake.stop()
    if progress:
        calls = figures.plain.calls + sum(v.calls for v in figures.hedged)
        print(f"{calls} calls measured", file=sys.stderr)
    if quick:
        figures.command = "python bench/hedge.py --quick"
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run; writes nothing")
    parser.add_argument("--write", action="store_true", help="rewrite the block in README.md")
    parser.add_argument("--runs", type=int, help="runs each way (default 50)")
    parser.add_argument("--width", type=int, help="steps in the stage (default 20)")
    parser.add_argument(
        "--after",
        help="the hedge's delay: p50/p90/p95/p99 (learned) or seconds (default p90)",
    )
    parser.add_argument(
        "--max",
        help="comma list: a hedged configuration per hedge.max (default 1,2; goal on the last)",
    )
    args = parser.parse_args(argv)
    workload = HedgeWorkload.quick() if args.quick else HedgeWorkload()
    changes: dict[str, Any] = {}
    if args.runs:
        changes["runs"] = args.runs
    if args.width:
        changes["width"] = args.width
    if args.after:
        after = args.after
        changes["hedge"] = {"after": after} if after.startswith("p") else {"after_s": float(after)}
    if args.max:
        changes["maxes"] = tuple(int(m) for m in args.max.split(","))
    if changes:
        workload = HedgeWorkload(**{**workload.__dict__, **changes})
    figures = asyncio.run(run_hedge(workload, quick=args.quick))
    # The table says what produced it (--write only writes it).
    shown = [arg for arg in (sys.argv[1:] if argv is None else argv) if arg != "--write"]
    figures.command = " ".join(["python bench/hedge.py", *shown])
    print(figures.report())
    if args.write and not args.quick:
        figures.write()


if __name__ == "__main__":
    main()
