"""Showing a run on a terminal: a live view on a TTY, plain lines otherwise.

``ProgressView`` is fed two things: the run's events (``event``), in offset
order, and fresh ``progress`` answers (``update``), which the caller fetches
when a step-level event arrives. On a TTY it keeps a rich ``Live`` view on
stderr: the steps' table and, under it, the last few lines of text each
running step is streaming. Elsewhere (a pipe, a CI log) it prints one line
per state change and the streamed text as ``  <step>| text`` lines.

Everything a model, a command or a spec wrote passes :func:`terminal_safe`
before it reaches the terminal, and reaches rich only as ``Text`` (never as a
markup string): a step's output must not be able to write the clipboard
(OSC 52), plant links (OSC 8 or ``[link=...]``), move the cursor over earlier
lines or retitle the window.
"""

from __future__ import annotations

import re
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.table import Table
from rich.text import Text

from llmmixer.core.contracts import EventType, MixerEvent
from llmmixer.workflows.records import RunProgress, StepRecord, StepStatus

_STYLE = {
    StepStatus.PENDING: "dim",
    StepStatus.RUNNING: "cyan",
    StepStatus.WAITING: "bold yellow",
    StepStatus.COMPLETED: "green",
    StepStatus.FAILED: "bold red",
    StepStatus.SKIPPED: "magenta",
}


# ECMA-48 control functions, each removed whole:
#   CSI (ESC [ or C1 0x9B) parameters, intermediates, final byte (cursor moves, erase);
#   OSC (ESC ] or 0x9D) up to BEL or ST (clipboard, hyperlinks, window title), and
#   DCS, SOS, PM, APC (ESC P X ^ _ or 0x90 0x98 0x9E 0x9F) up to ST; an unterminated
#   string runs to the end of the text, as a terminal would swallow it;
#   any other ESC sequence (ESC c resets the terminal, ESC ( B switches charsets);
#   then every remaining C0 control except newline and tab, DEL and the C1 range.
_TERMINAL_CONTROLS = re.compile(
    r"(?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?"
    r"|(?:\x1b[\]PX^_]|[\x9d\x90\x98\x9e\x9f]).*?(?:\x07|\x1b\\|\x9c|\Z)"
    r"|\x1b[\x20-\x2f]*[\x30-\x7e]?"
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]",
    re.DOTALL,
)


def terminal_safe(text: str) -> str:
    """``text`` without terminal control sequences: what is left only prints characters.

    Keeps newlines and tabs; removes CSI, OSC, DCS, SOS, PM and APC sequences
    (7-bit and C1 forms), lone ESC, every other C0 control, DEL and C1 controls.
    Carriage returns go too (they would let text overwrite what is on screen).
    """
    return _TERMINAL_CONTROLS.sub("", text)


def unblock_hints(workflow_id: str, progress: RunProgress) -> list[str]:
    """The exact commands that move each waiting step on."""
    lines: list[str] = []
    for step_id in progress.waiting:
        record = progress.steps[step_id]
        reason = terminal_safe((record.waiting_reason or "waits for a person").splitlines()[0])
        lines.append(f"step {step_id} waits: {reason}")
        if (hold := record.budget_hold) is not None:
            option = "--max-tokens" if hold.limit == "max_tokens" else "--max-cost-usd"
            where = f" --step {hold.step}" if hold.step else ""
            lines.append(f"  llmmixer raise-budget {workflow_id}{where} {option} NEW_LIMIT")
            lines.append(f"  llmmixer skip {workflow_id} {step_id}")
        elif record.tool_approval is not None:
            lines.append(f"  llmmixer approve {workflow_id} {step_id}")
            lines.append(f"  llmmixer reject {workflow_id} {step_id} --reason WHY")
        elif record.kind == "approval" and not (record.error or "").startswith("rejected"):
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
    # Every cell is a Text: a plain string would be parsed as rich markup, and a
    # spec's names would then be able to plant [link=...] hyperlinks.
    table = Table(title=_plain(title), title_justify="left", expand=False)
    for column in ("step", "kind", "state", "provider/model", "attempts", "time", "tokens", "cost"):
        table.add_column(column)
    for step_id, record in progress.steps.items():
        model = f"{record.provider}/{record.model}" if record.provider else ""
        tokens = record.usage.input_tokens + record.usage.output_tokens
        table.add_row(
            _plain(step_id),
            _plain(record.kind),
            Text(record.status.value, style=_STYLE[record.status]),
            _plain(model),
            str(record.attempts or ""),
            _elapsed(record, now),
            str(tokens or ""),
            _cost(record),
        )
    usage = progress.usage
    total = f"${usage.cost_usd:.4f}" + ("" if usage.cost_complete else " + unknown")
    table.caption = f"tokens in {usage.input_tokens} · out {usage.output_tokens} · cost {total}"
    return table


def _plain(text: str, style: str = "") -> Text:
    """Text shown as written (no markup), without terminal controls."""
    return Text(terminal_safe(text), style=style)


_TAIL_CHARS = 4000
#: Plain mode: a streamed line longer than this is broken (at a space when possible).
_PLAIN_WIDTH = 100
#: Events that end a step's current stretch of streamed text.
_STEP_ENDS = {
    EventType.STEP_COMPLETED,
    EventType.STEP_FAILED,
    EventType.STEP_WAITING,
    EventType.STEP_SKIPPED,
    EventType.STEP_OVERRIDDEN,
}


@dataclass
class _StepText:
    """What one step has streamed in its current attempt."""

    attempt: int | None = None
    tail: str = ""  # the last _TAIL_CHARS characters, for the live view
    partial: str = ""  # plain mode: the line not yet printed


def _first_line(text: object, limit: int = 200) -> str:
    lines = str(text or "").strip().splitlines()
    return lines[0][:limit] if lines else ""


class ProgressView:
    """Live view of one run: ``event`` with each event, ``update`` with each progress answer."""

    def __init__(
        self,
        workflow_id: str,
        stream: TextIO | None = None,
        *,
        tail_lines: int = 4,
        force_terminal: bool | None = None,
    ) -> None:
        self.workflow_id = workflow_id
        # Progress goes to stderr so stdout carries only the run's output.
        self.stream = stream or sys.stderr
        self.console = Console(file=self.stream, force_terminal=force_terminal)
        self.tail_lines = tail_lines
        self.live: Live | None = None
        self.progress: RunProgress | None = None
        self._texts: dict[str, _StepText] = {}
        # The live view renders from rich's refresh thread; the event loop writes.
        self._lock = threading.Lock()

    @property
    def is_live(self) -> bool:
        return self.live is not None

    def __enter__(self) -> ProgressView:
        if self.console.is_terminal:
            self.live = Live(
                self,
                console=self.console,
                refresh_per_second=4,
                transient=False,
                redirect_stdout=False,  # stdout is the run's output, never the view
            )
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)
            self.live = None

    # ---- input --------------------------------------------------------------

    def update(self, progress: RunProgress) -> None:
        with self._lock:
            self.progress = progress
        if self.live is not None:
            self.live.refresh()

    def event(self, event: MixerEvent) -> None:
        """Take one event, in offset order: streamed text, or a step's change of state."""
        step = event.step
        if event.type == EventType.STEP_DELTA and step:
            self._delta(step, event.attempt, str(event.data.get("text") or ""))
        elif event.type == EventType.STEP_STARTED and step:
            self._end_text(step)
            with self._lock:
                self._texts.pop(step, None)
        elif event.type in _STEP_ENDS and step:
            self._end_text(step)
        if self.live is not None:
            self.live.refresh()
            return
        line = self._state_line(event)
        if line:
            self._print(line)

    def note(self, message: str) -> None:
        """A line for the person watching (above the live view on a TTY)."""
        if self.live is not None:
            self.live.console.print(_plain(message))
        else:
            self._print(message)

    def summary(self, progress: RunProgress) -> None:
        """Show a run that had already ended: its table, or one line per step."""
        self.update(progress)
        if self.live is not None:
            return
        for step_id, record in progress.steps.items():
            if record.status != StepStatus.PENDING:
                self._print(f"[{record.status.value}] {step_id}{self._detail(step_id)}")

    # ---- streamed text ------------------------------------------------------

    def _delta(self, step: str, attempt: int | None, text: str) -> None:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        with self._lock:
            buffer = self._texts.setdefault(step, _StepText())
            starts_over = (
                buffer.attempt is not None and attempt is not None and attempt != buffer.attempt
            )
        if starts_over:
            # A retried call streams its answer again from the start.
            self._end_text(step)
            if self.live is None:
                self._print(f"  {step}| (attempt {attempt} starts over)")
            with self._lock:
                buffer = self._texts[step] = _StepText()
        with self._lock:
            buffer.attempt = attempt
            buffer.tail = (buffer.tail + text)[-_TAIL_CHARS:]
        if self.live is not None:
            return
        buffer.partial += text
        *lines, buffer.partial = buffer.partial.split("\n")
        while len(buffer.partial) > _PLAIN_WIDTH:
            cut = buffer.partial.rfind(" ", 0, _PLAIN_WIDTH + 1)
            cut = cut + 1 if cut > 0 else _PLAIN_WIDTH
            lines.append(buffer.partial[:cut].rstrip(" "))
            buffer.partial = buffer.partial[cut:]
        for line in lines:
            self._print(f"  {step}| {line}")

    def _end_text(self, step: str) -> None:
        """Print what is left of a step's streamed text (plain mode)."""
        buffer = self._texts.get(step)
        if buffer is None or self.live is not None:
            return
        if buffer.partial:
            self._print(f"  {step}| {buffer.partial}")
            buffer.partial = ""

    # ---- plain lines --------------------------------------------------------

    def _record(self, step: str) -> StepRecord | None:
        return self.progress.steps.get(step) if self.progress is not None else None

    def _detail(self, step: str) -> str:
        record = self._record(step)
        if record is None:
            return ""
        detail = f" {record.provider}/{record.model}" if record.provider else ""
        if record.status == StepStatus.COMPLETED:
            tokens = record.usage.input_tokens + record.usage.output_tokens
            detail += f" tokens={tokens} cost={_cost(record) or '$0'}"
        elif record.error:
            detail += f" error: {_first_line(record.error)}"
        return detail

    def _state_line(self, event: MixerEvent) -> str | None:
        step, data = event.step or "", event.data
        if event.type == EventType.STEP_STARTED:
            again = f" (attempt {event.attempt})" if (event.attempt or 1) > 1 else ""
            return f"[running] {step}{again}"
        if event.type == EventType.STEP_COMPLETED:
            detail = self._detail(step)
            if not detail and data.get("provider"):
                detail = f" {data['provider']}/{data.get('model')}"
            return f"[completed] {step}{detail}"
        if event.type == EventType.STEP_FAILED:
            return f"[failed] {step} error: {_first_line(data.get('error'))}"
        if event.type == EventType.STEP_WAITING:
            reason = data.get("approval") or data.get("error") or "waits for a person"
            label = "approval" if "approval" in data else "failed"
            return f"[waiting] {step} {label}: {_first_line(reason)}"
        if event.type == EventType.STEP_SKIPPED:
            reason = data.get("reason") or data.get("error")
            return f"[skipped] {step}" + (f": {_first_line(reason)}" if reason else "")
        if event.type == EventType.STEP_OVERRIDDEN:
            return f"[completed] {step} (output given by a person)"
        if event.type == EventType.INTERVENTION_ACCEPTED:
            return f"[{data.get('action', 'intervention')}] {step}: accepted"
        if event.type == EventType.INTERVENTION_REJECTED:
            action = data.get("action", "intervention")
            return f"[{action}] {step}: refused: {_first_line(data.get('reason'))}"
        return None

    def _print(self, line: str) -> None:
        # The one way out in plain mode: every line, whatever it quotes, is made safe.
        print(terminal_safe(line), file=self.stream, flush=True)

    # ---- live view ----------------------------------------------------------

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        with self._lock:
            progress = self.progress
            texts = {step: buffer.tail for step, buffer in self._texts.items() if buffer.tail}
        if progress is None:
            yield _plain(f"{self.workflow_id}: waiting for the first progress answer", "dim")
            return
        parts: list[RenderableType] = [progress_table(self.workflow_id, progress)]
        width = max(20, options.max_width - 4)
        for step, tail in texts.items():
            record = progress.steps.get(step)
            if record is not None and record.status != StepStatus.RUNNING:
                continue  # finished: its output is in the result, not on screen
            # What runs it: the model for an LLM step, the kind (pty, agent) otherwise.
            source = ""
            if record is not None:
                source = f" · {record.provider}/{record.model}" if record.provider else ""
                source = source or (f" · {record.kind}" if record.kind != "llm" else "")
            parts.append(_plain(f"── {step}{source} ", "cyan"))
            lines = _plain(tail.rstrip("\n")).wrap(console, width)
            for line in list(lines)[-self.tail_lines :]:
                parts.append(Text("  ") + line)
        yield Group(*parts)
