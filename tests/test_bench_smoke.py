"""`python bench/run.py --quick` runs end to end and prints its table.

Only that it runs: timings on a shared CI machine assert nothing, so none are
checked here. A quick run never rewrites the READMEs (``run.py`` skips that).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_benchmark_prints_the_table(tmp_path: Path) -> None:
    raw = tmp_path / "raw.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--json", str(raw)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        # Many workloads, each with worker processes of its own: minutes on a busy CI box.
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| workload | system |" in done.stdout
    for row in ("llmmixer", "raw-temporal", "asyncio"):
        for workload in ("chain-10", "fanout-20"):
            assert f"| {workload} (per " in done.stdout
            assert any(
                line.startswith(f"| {workload}") and f"| {row} |" in line
                for line in done.stdout.splitlines()
            ), done.stdout
    # scale.py's workloads, side by side (their figures are not checked either).
    assert "| scale workload | llmmixer | raw-temporal | asyncio (floor) |" in done.stdout
    for label in (
        "| throughput: ",
        "| memory: RSS ",
        "| memory: growth per run held by a budget",
        "| waking a 50-step run",
        "| SIGKILL → step resumed ",
        "| llmmixer worker processes |",
    ):
        assert label in done.stdout, done.stdout
    # Raw Temporal beside llmmixer in the throughput table, with the CPU split.
    assert "| worker CPU ms/step | server CPU ms/step |" in done.stdout
    for row in ("| llmmixer |", "| raw-temporal |"):
        assert any(
            line.startswith(row) and line.count("|") == 8 for line in done.stdout.splitlines()
        ), done.stdout
    assert raw.exists()
