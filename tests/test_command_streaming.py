"""A running command's output reaches watchers while it runs, like a model's text.

A real worker (``mixer_worker``, as ``llmmixer dev``/``worker`` build it) runs
``kind: pty`` steps whose programs wait for the test: the test only lets a
command finish once its first line has arrived as a ``step_delta`` on the
run's event stream, so the line cannot have come from the step's result.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from llmmixer.activities.commands import DELTA_BATCH_CHARS
from llmmixer.client.cli import EXIT_OK, _follow
from llmmixer.client.display import ProgressView
from llmmixer.client.mixer import MixerClient
from llmmixer.core.contracts import EventType, MixerEvent
from llmmixer.workflows.records import RunProgress, RunStatus, StepRecord, StepStatus

pytestmark = pytest.mark.timeout(120)

SECRET = "acme-streamed-3f9c1d7e5b2a4c6d8e0f"


@pytest.fixture
def workflow_cache() -> int:
    return 100  # watchers poll through updates: see conftest.workflow_cache


@pytest.fixture
def worker_env() -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        # A worker secret: what a command prints of it must not stream out.
        "ACME_API_TOKEN": SECRET,
    }


def waits_for(marker: Path, first: str, then: str) -> list[str]:
    """A command printing ``first``, then ``then`` once ``marker`` exists."""
    script = (
        "import os, sys, time\n"
        f"print({first!r}, flush=True)\n"
        "deadline = time.monotonic() + 60\n"
        f"while not os.path.exists({str(marker)!r}) and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        f"print({then!r}, flush=True)\n"
    )
    return [sys.executable, "-c", script]


def spec_of(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"name": "streaming", "defaults": {"retry": {"max_attempts": 1}}, "steps": list(steps)}


async def first_event(
    events: Any, seen: list[MixerEvent], matches: Any, within_s: float = 30
) -> MixerEvent:
    async def find() -> MixerEvent:
        async for event in events:
            seen.append(event)
            if matches(event):
                return event
        raise AssertionError(f"the stream ended first: {[e.type.value for e in seen]}")

    try:
        return await asyncio.wait_for(find(), within_s)
    except TimeoutError:
        raise AssertionError(
            f"no such event within {within_s:g}s; saw {[(e.type.value, e.data) for e in seen]}"
        ) from None


async def test_a_commands_first_line_streams_before_the_step_completes(
    mixer: MixerClient, tmp_path: Path
) -> None:
    found = tmp_path / "found.txt"
    found.write_text(f"token = {SECRET}\n")
    marker = tmp_path / "go"
    script = waits_for(marker, "\x1b[32mfirst line\x1b[0m with token", "second line")
    # The command also prints a key it found elsewhere, before it waits.
    script[2] = f"print(open({str(found)!r}).read(), end='', flush=True)\n" + script[2]
    handle = await mixer.start(spec_of({"id": "build", "kind": "pty", "command": script}))
    seen: list[MixerEvent] = []
    events = handle.events()
    delta = await first_event(
        events,
        seen,
        lambda e: e.type == EventType.STEP_DELTA and "first line" in e.data.get("text", ""),
    )
    # The command is still waiting for the marker: nothing has completed it.
    assert not any(e.type == EventType.STEP_COMPLETED for e in seen)
    assert delta.step == "build" and delta.attempt == 1
    marker.write_text("go")
    completed = await first_event(events, seen, lambda e: e.type == EventType.STEP_COMPLETED)
    async for event in events:
        seen.append(event)
    assert delta.offset < completed.offset
    streamed = "".join(
        e.data["text"] for e in seen if e.type == EventType.STEP_DELTA and e.step == "build"
    )
    # Cleaned and redacted like the result, and complete: the command ran
    # longer than one interval, so its last line followed before it ended.
    assert streamed == "token = [REDACTED]\nfirst line with token\nsecond line\n"
    result = await handle.result()
    assert result.steps["build"].output == streamed
    # Resuming after the first delta hands on what followed, once each.
    again = [e async for e in handle.events(delta.offset + 1)]
    assert [e.offset for e in again] == [e.offset for e in seen if e.offset > delta.offset]
    history = await handle.temporal.fetch_history()
    assert SECRET not in history.to_json()


async def test_a_quick_command_adds_no_event_and_a_flood_is_cut_per_batch(
    mixer: MixerClient, tmp_path: Path
) -> None:
    marker = tmp_path / "go"
    flood = [
        sys.executable,
        "-c",
        "import os, sys, time\n"
        "for i in range(3000): print(f'flood line {i:05d} ' + 'x' * 40)\n"
        "sys.stdout.flush()\n"
        f"while not os.path.exists({str(marker)!r}): time.sleep(0.05)\n"
        "print('the end')\n",
    ]
    handle = await mixer.start(
        spec_of(
            {"id": "quick", "kind": "pty", "command": [sys.executable, "-c", "print('hi')"]},
            {"id": "flood", "kind": "pty", "command": flood, "needs": ["quick"]},
        )
    )
    seen: list[MixerEvent] = []
    events = handle.events()
    await first_event(events, seen, lambda e: e.type == EventType.STEP_DELTA and e.step == "flood")
    marker.write_text("go")
    async for event in events:
        seen.append(event)
    deltas = [e for e in seen if e.type == EventType.STEP_DELTA]
    # A command done within the first interval: its output is in the result only.
    assert not [e for e in deltas if e.step == "quick"]
    texts = [e.data["text"] for e in deltas if e.step == "flood"]
    # Each batch carries the latest lines, not the whole flood, into history.
    assert all(len(text) <= DELTA_BATCH_CHARS + 60 for text in texts), [len(t) for t in texts]
    assert "characters not streamed ...]\nflood line" in texts[0]
    assert "flood line 02999" in texts[0]
    assert texts[-1].endswith("the end\n")
    result = await handle.result()
    assert result.steps["quick"].output == "hi\n"
    assert result.steps["flood"].output.startswith("flood line 00000")


async def test_watch_shows_a_running_commands_lines_as_they_come(
    mixer: MixerClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "go"
    handle = await mixer.start(
        spec_of({"id": "build", "kind": "pty", "command": waits_for(marker, "one", "two")})
    )
    stream = io.StringIO()
    follow = asyncio.create_task(_follow(handle, stop_when_waiting=True, stream=stream))
    deadline = time.monotonic() + 30
    while "  build| one" not in stream.getvalue():
        assert time.monotonic() < deadline, stream.getvalue()
        assert not follow.done(), stream.getvalue()
        await asyncio.sleep(0.05)
    assert "[completed] build" not in stream.getvalue()
    marker.write_text("go")
    assert await asyncio.wait_for(follow, 30) == EXIT_OK
    lines = stream.getvalue().splitlines()
    assert lines.index("  build| one") < lines.index("  build| two")
    assert lines.index("  build| two") < next(
        i for i, line in enumerate(lines) if line.startswith("[completed] build")
    )
    assert capsys.readouterr().out == "one\ntwo\n\n"


def test_the_live_view_shows_a_running_commands_last_lines() -> None:
    view = ProgressView("run-1", io.StringIO(), tail_lines=2, force_terminal=True)
    progress = RunProgress(
        name="demo",
        steps={"build": StepRecord(kind="pty", status=StepStatus.RUNNING)},
        running=["build"],
        status=RunStatus.RUNNING,
    )
    view.update(progress)  # not entered: rendered by hand, no refresh thread
    text = "".join(f"collected {i}\n" for i in range(5))
    view.event(MixerEvent(type=EventType.STEP_DELTA, step="build", attempt=1, data={"text": text}))
    screen = io.StringIO()
    Console(file=screen, width=80, force_terminal=False).print(view)
    shown = screen.getvalue()
    assert "── build · pty" in shown
    assert "collected 3" in shown and "collected 4" in shown and "collected 2" not in shown
