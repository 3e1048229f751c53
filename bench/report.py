"""Figures from raw timings: overhead per stage, the table, the machine line, README blocks."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import re
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from systems import Shape

from llmmixer.workers.devserver import find_temporal_binary

MARKER = "bench"  # <!-- bench:start --> ... <!-- bench:end -->
RAW = "raw-temporal"
FLOOR = "asyncio"


@dataclass
class Result:
    """Wall times of one system on one shape; the provider's latency is known and fixed."""

    shape: Shape
    system: str
    latency_s: float
    walls_s: list[float] = field(default_factory=list)

    def overheads_ms(self) -> list[float]:
        # Wall time minus the provider latency every stage must wait for,
        # spread over the stages: what the system adds per step (or per stage).
        stages = self.shape.stages
        return [(wall - stages * self.latency_s) / stages * 1000 for wall in self.walls_s]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.overheads_ms())

    @property
    def p90_ms(self) -> float:
        return percentile(self.overheads_ms(), 0.9)

    @property
    def wall_median_ms(self) -> float:
        return statistics.median(self.walls_s) * 1000


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), for small samples."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ratio(value: float, base: Result | None) -> str:
    # A ratio to a floor near zero (or below it: timer noise) says nothing.
    if base is None or base.median_ms <= 0.05:
        return "–"
    return f"{value / base.median_ms:.1f}×"


def _unit(shape: Shape) -> str:
    return "step" if shape.kind == "chain" else "stage"


def table(results: Sequence[Result], *, short: bool = False) -> str:
    """A Markdown table, one row per workload and system; ``short`` for the top-level README."""
    by_key = {(r.shape, r.system): r for r in results}
    if short:
        lines = [
            "| workload | system | overhead (ms, median) | × raw Temporal | × asyncio |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
    else:
        lines = [
            "| workload | system | overhead ms, median | p90 | × raw Temporal "
            "| × asyncio floor | wall ms, median |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
    for result in results:
        raw = by_key.get((result.shape, RAW))
        floor = by_key.get((result.shape, FLOOR))
        workload = f"{result.shape.name} (per {_unit(result.shape)})"
        cells = [workload, result.system, f"{result.median_ms:.1f}"]
        if not short:
            cells.append(f"{result.p90_ms:.1f}")
        cells += [_ratio(result.median_ms, raw), _ratio(result.median_ms, floor)]
        if not short:
            cells.append(f"{result.wall_median_ms:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    """Cores, CPU, Python, Temporal server and the SDK versions the figures depend on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        done = subprocess.run(
            [str(find_temporal_binary()), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        found = re.search(r"Server ([\w.\-]+)", done.stdout)
        server = f"Temporal server {found.group(1)}" if found else done.stdout.strip()
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        server = "Temporal server (version unknown)"
    packages = []
    for name in ("temporalio", "openai", "langgraph", "langgraph-checkpoint-sqlite"):
        try:
            packages.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return (
        f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, {server}, " + ", ".join(packages)
    )


def about(*, reps: int, latency_ms: float, command: str = "python bench/run.py") -> str:
    """The line that says when, how and on what the figures were measured."""
    # Other work on the machine shows up in every figure; say how busy it was.
    load = (
        f", load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    )
    return (
        f"Measured {dt.date.today().isoformat()} by `{command}`: fixed provider latency "
        f"{latency_ms:g} ms per call, {reps} runs per cell after a warm-up, "
        f"on {machine()}{load}."
    )


def block(results: Sequence[Result], *, reps: int, latency_ms: float, short: bool) -> str:
    """What goes between the README markers."""
    return f"{about(reps=reps, latency_ms=latency_ms)}\n\n{table(results, short=short)}"


def write_between_markers(path: Path, body: str, marker: str = MARKER) -> None:
    """Replace what lies between ``<!-- {marker}:start/end -->`` in ``path``, nothing else.

    The top-level README is edited by others too: it is read and written back
    at once, and only the block between the markers changes.
    """
    start_marker, end_marker = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = path.read_text(encoding="utf-8")
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no {start_marker} ... {end_marker} block to fill in")
    head = text[: start + len(start_marker)]
    path.write_text(f"{head}\n{body}\n{text[end:]}", encoding="utf-8")
