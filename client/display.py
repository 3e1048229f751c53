"""Showing a run on a terminal: a live table on a TTY, plain lines otherwise."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from llmmixer.workflows.records import RunProgress, StepRecord, StepStatus

_STYLE = {
    StepStatus.PENDING: "dim",
    StepStatus.RUNNING: "cyan",
    StepStatus.WAITING: "bold yellow",
    StepStatus.COMPLETED: "green",
    StepStatus.FAILED: "bold red",
    StepStatus.SKIPPED: "magenta",
}


def unblock_hints(workflow_id: str, progress: RunProgress) -> list[str]:
    """The exact commands that move each waiting step on."""
    lines: list[str] = []
    for step_id in progress.waiting:
        record = progress.steps[step_id]
        reason = (record.waiting_reason or "waits for a person").splitlines()[0]
        lines.append(f"step {step_id} waits: {reason}")
        if record.kind == "approval" and not (record.error or "").startswith("rejected"):
            lines.append(f"  llmmixer approve {workflow_id} {step_id}")
            lines.append(f"  llmmixer reject {workflow_id} {step_id}")
        else:
            lines.append(f"  llmmixer retry {workflow_id} {step_id}")
            lines.append(f"  llmmixer skip {workflow_id} {step_id}")
            lines.append(f"  llmmixer override {workflow_id} {step_id} --output TEXT")
    return lines


def _elapsed(record: StepRecord, now: datetime) -> str:
    if record.started_at is None:
        return ""
    end = record.ended_at or now
    seconds = max(0.0, (end - record.started_at).total_seconds())
    return f"{seconds:.1f}s"


def _cost(record: StepRecord) -> str:
    if record.dry_run:
        return "dry-run"
    if record.cost_usd is None:
        return "unknown"
    return f"${record.cost_usd:.4f}" if record.cost_usd else ""


def progress_table(workflow_id: str, progress: RunProgress) -> Table:
    now = datetime.now(UTC)
    title = f"{progress.name} · {workflow_id} · {progress.status.value}"
    if progress.dry_run:
        title += " · DRY RUN (offline responder, no provider called)"
    table = Table(title=title, title_justify="left", expand=False)
    for column in ("step", "kind", "state", "provider/model", "attempts", "time", "tokens", "cost"):
        table.add_column(column)
    for step_id, record in progress.steps.items():
        model = f"{record.provider}/{record.model}" if record.provider else ""
        tokens = record.usage.input_tokens + record.usage.output_tokens
        table.add_row(
            step_id,
            record.kind,
            Text(record.status.value, style=_STYLE[record.status]),
            model,
            str(record.attempts or ""),
            _elapsed(record, now),
            str(tokens or ""),
            _cost(record),
        )
    usage = progress.usage
    total = f"${usage.cost_usd:.4f}" + ("" if usage.cost_complete else " + unknown")
    table.caption = f"tokens in {usage.input_tokens} · out {usage.output_tokens} · cost {total}"
    return table


class ProgressView:
    """Live view of one run; ``update`` with each new progress answer."""

    def __init__(self, workflow_id: str, stream: TextIO | None = None) -> None:
        self.workflow_id = workflow_id
        # Progress goes to stderr so stdout carries only the run's output.
        self.stream = stream or sys.stderr
        self.console = Console(file=self.stream)
        self.live: Live | None = None
        self._seen: dict[str, tuple[StepStatus, int]] = {}

    def __enter__(self) -> ProgressView:
        if self.console.is_terminal:
            self.live = Live(console=self.console, refresh_per_second=8, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)
            self.live = None

    def update(self, progress: RunProgress) -> None:
        if self.live is not None:
            self.live.update(progress_table(self.workflow_id, progress))
            return
        for step_id, record in progress.steps.items():
            state = (record.status, record.attempts)
            if self._seen.get(step_id) == state:
                continue
            self._seen[step_id] = state
            if record.status == StepStatus.PENDING:
                continue
            detail = ""
            if record.provider:
                detail = f" {record.provider}/{record.model}"
            if record.status == StepStatus.COMPLETED:
                tokens = record.usage.input_tokens + record.usage.output_tokens
                detail += f" tokens={tokens} cost={_cost(record) or '$0'}"
            if record.error and record.status != StepStatus.COMPLETED:
                detail += f" error: {record.error.splitlines()[0][:200]}"
            print(f"[{record.status.value}] {step_id}{detail}", file=self.stream, flush=True)
