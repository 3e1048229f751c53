"""`llmmixer watch` / `run`: the live view driven by the run's event stream.

A slow streaming LLM step (the fake provider server) is followed through the
CLI's follow function with a plain (non-TTY) stream: its text shows line by
line while the step runs, and a connection dropped mid-stream is picked up
again from the next offset, so every delta shows exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fakes.provider_server import FakeProviderServer, Reply
from rich.console import Console
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RetryConfig, RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from llmmixer.client.cli import EXIT_OK, _follow
from llmmixer.client.display import ProgressView
from llmmixer.client.mixer import MixerClient, MixerHandle
from llmmixer.client.watch import resumable_events
from llmmixer.core.contracts import EventType, MixerEvent
from llmmixer.runtime.address import free_port
from llmmixer.workflows.records import RunProgress, RunStatus, StepRecord, StepStatus

LINES = [f"line {i} of the answer\n" for i in range(12)]
WHOLE = "".join(LINES)


@pytest.fixture
def worker_env(provider_server: FakeProviderServer) -> dict[str, str]:
    return provider_server.env()


@pytest.fixture
def workflow_cache() -> int:
    # Watching queries the run while its stream's updates arrive; with no
    # cache every query replays, and the SDK (sdk-python#848) can hand an
    # update to a replay that has not caught up. A cache is how workers run.
    return 100


def slow_spec() -> dict[str, Any]:
    step = {"id": "talk", "provider": "openai", "model": "gpt-4.1-mini", "prompt": "talk"}
    return {"name": "watch", "defaults": {"max_tokens": 200}, "steps": [step]}


class TimedStream(io.StringIO):
    """A non-TTY stream that remembers when each line was written."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line:
                self.lines.append((time.monotonic(), line))
        return super().write(text)


def shown_text(stream: TimedStream, step: str) -> list[str]:
    prefix = f"  {step}| "
    return [line[len(prefix) :] for _, line in stream.lines if line.startswith(prefix)]


async def test_streamed_text_shows_line_by_line_before_the_step_completes(
    mixer: MixerClient, provider_server: FakeProviderServer, capsys: pytest.CaptureFixture[str]
) -> None:
    provider_server.script("openai", Reply(chunks=LINES, chunk_delay_s=0.25))
    handle = await mixer.start(slow_spec())
    stream = TimedStream()

    code = await _follow(handle, stop_when_waiting=True, stream=stream)

    assert code == EXIT_OK
    assert capsys.readouterr().out == WHOLE + "\n"  # stdout: the run's output alone
    assert shown_text(stream, "talk") == [line.rstrip("\n") for line in LINES]
    written = [line for _, line in stream.lines]
    completed = next(i for i, line in enumerate(written) if line.startswith("[completed] talk"))
    first_text = written.index("  talk| line 0 of the answer")
    assert written.index("[running] talk") < first_text < completed
    assert "tokens=" in written[completed]
    # Live, not replayed at the end: the first line showed while the answer still streamed.
    shown_at = {line: at for at, line in stream.lines}
    gap = shown_at[written[completed]] - shown_at["  talk| line 0 of the answer"]
    assert gap > 1.0, f"text appeared only {gap:.2f}s before the step completed"


HOSTILE = [
    "answer \x1b]52;c;ZWNobyBwd25lZA==",  # OSC 52 (the clipboard), split over two chunks
    "\x07done\x1b[2A\n",  # cursor up: overwrite what the screen showed
    "\x1b]8;;https://evil.example\x1b\\click\x1b]8;;\x1b\\\n",  # a disguised link
    "\x9b2J\x1b]0;pwned\x07last\n",  # C1 CSI erase, the window title
]


async def test_model_text_reaches_the_terminal_without_control_sequences(
    mixer: MixerClient,
    provider_server: FakeProviderServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    provider_server.script("openai", Reply(chunks=HOSTILE))
    handle = await mixer.start(slow_spec())
    stream = TimedStream()

    assert await _follow(handle, stop_when_waiting=True, stream=stream) == EXIT_OK

    shown = stream.getvalue()
    assert not {"\x1b", "\x9b", "\x07", "\r"} & set(shown), repr(shown)
    assert shown_text(stream, "talk") == ["answer done", "click", "last"]
    # stdout into a pipe or a file is the run's output, byte for byte ...
    assert capsys.readouterr().out == "".join(HOSTILE) + "\n"
    # ... and on a terminal, the same without its control sequences.
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert await _follow(handle, stop_when_waiting=True, stream=TimedStream()) == EXIT_OK
    assert capsys.readouterr().out == "answer done\nclick\nlast\n\n"


async def test_events_resume_from_the_saved_offset_without_loss_or_repeat(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script("openai", Reply(chunks=LINES, chunk_delay_s=0.25))
    handle = await mixer.start(slow_spec())
    texts: list[str] = []
    last_offset = -1
    stream = handle.events()
    async for event in stream:
        last_offset = event.offset
        if event.type == EventType.STEP_DELTA:
            texts.append(event.data["text"])
            break  # the watcher goes away mid-answer
    await stream.aclose()  # type: ignore[attr-defined]
    assert texts and "".join(texts) != WHOLE, "the test must disconnect mid-stream"
    progress = await handle.progress()
    assert progress.steps["talk"].status == StepStatus.RUNNING

    async for event in handle.events(last_offset + 1):
        assert event.offset > last_offset
        last_offset = event.offset
        if event.type == EventType.STEP_DELTA:
            texts.append(event.data["text"])
    assert "".join(texts) == WHOLE


class DroppingHandle(MixerHandle):
    """A handle whose first event stream loses its connection after the first delta."""

    def __init__(self, handle: MixerHandle) -> None:
        super().__init__(handle.mixer, handle.id)
        self.subscribed_from: list[int] = []

    async def events(self, from_offset: int = 0) -> AsyncIterator[MixerEvent]:
        self.subscribed_from.append(from_offset)
        drop = len(self.subscribed_from) == 1
        async for event in super().events(from_offset):
            yield event
            if drop and event.type == EventType.STEP_DELTA:
                raise RPCError("connection reset by peer", RPCStatusCode.UNAVAILABLE, b"")


async def test_follow_reconnects_after_a_dropped_connection_and_shows_each_delta_once(
    mixer: MixerClient, provider_server: FakeProviderServer, capsys: pytest.CaptureFixture[str]
) -> None:
    provider_server.script("openai", Reply(chunks=LINES, chunk_delay_s=0.25))
    handle = DroppingHandle(await mixer.start(slow_spec()))
    stream = TimedStream()

    code = await _follow(handle, stop_when_waiting=True, stream=stream)

    assert code == EXIT_OK
    assert capsys.readouterr().out == WHOLE + "\n"
    assert shown_text(stream, "talk") == [line.rstrip("\n") for line in LINES]
    notes = [line for _, line in stream.lines if line.startswith("lost Temporal")]
    assert notes == ["lost Temporal (connection reset by peer); reconnecting"]
    first, second = handle.subscribed_from
    assert first == 0 and second > 1  # resumed after the last event seen, not from the start


class CuttableProxy:
    """A TCP proxy to the Temporal server whose connections can be cut and refused."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._pipes: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Drop every connection and refuse new ones until ``open``."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, upstream_writer]
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.close()


async def test_a_real_dropped_connection_is_resumed_from_the_next_offset(
    env: WorkflowEnvironment,
    mixer: MixerClient,
    provider_server: FakeProviderServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    provider_server.script("openai", Reply(chunks=LINES, chunk_delay_s=0.25))
    proxy = CuttableProxy(env.client.service_client.config.target_host)
    await proxy.open()
    # The SDK's own retries would ride out a short outage unseen; give up fast
    # so the outage reaches the watcher, as a long one would.
    client = await Client.connect(
        f"127.0.0.1:{proxy.port}",
        data_converter=pydantic_data_converter,
        retry_config=RetryConfig(max_retries=1, max_elapsed_time_millis=300),
    )
    started = await mixer.start(slow_spec())
    handle = MixerClient(client, mixer.task_queue).get_handle(started.id)
    stream = TimedStream()
    watching = asyncio.create_task(_follow(handle, stop_when_waiting=True, stream=stream))
    try:
        for _ in range(200):
            if shown_text(stream, "talk"):
                break
            await asyncio.sleep(0.05)
        await proxy.cut()
        await asyncio.sleep(2.0)  # the answer goes on streaming meanwhile
        await proxy.open()
        assert await asyncio.wait_for(watching, 60) == EXIT_OK
    finally:
        watching.cancel()
        await proxy.cut()
    assert capsys.readouterr().out == WHOLE + "\n"
    assert shown_text(stream, "talk") == [line.rstrip("\n") for line in LINES]
    notes = [line for _, line in stream.lines if line.startswith("lost Temporal")]
    assert len(notes) == 1, notes


async def test_resumable_events_hands_on_every_event_once_across_drops(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script("openai", Reply(chunks=LINES, chunk_delay_s=0.25))
    handle = DroppingHandle(await mixer.start(slow_spec()))
    retries: list[float] = []
    events = [e async for e in resumable_events(handle, on_retry=lambda _, d, n: retries.append(d))]
    offsets = [e.offset for e in events]
    assert offsets == list(range(len(offsets)))
    deltas = "".join(e.data["text"] for e in events if e.type == EventType.STEP_DELTA)
    assert deltas == WHOLE
    assert len(retries) == 1 and events[-1].type == EventType.WORKFLOW_ENDED


async def test_watch_keeps_watching_while_a_person_approves(mixer: MixerClient) -> None:
    spec = {"name": "gate", "steps": [{"id": "ok", "kind": "approval", "prompt": "Ship?"}]}
    handle = await mixer.start(spec)
    stream = TimedStream()
    watching = asyncio.create_task(_follow(handle, stop_when_waiting=False, stream=stream))
    for _ in range(200):
        if any(f"llmmixer approve {handle.id} ok" in line for _, line in stream.lines):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the watcher never said how to unblock the run")
    assert not watching.done()
    await handle.approve("ok", comment="go")
    assert await asyncio.wait_for(watching, 30) == EXIT_OK
    written = [line for _, line in stream.lines]
    assert "[waiting] ok approval: Ship?" in written
    assert "[approve] ok: accepted" in written
    assert any(line.startswith("[completed] ok") for line in written)


# ---- the view alone ---------------------------------------------------------------


def _event(kind: EventType, step: str = "a", attempt: int = 1, **data: Any) -> MixerEvent:
    return MixerEvent(type=kind, step=step, attempt=attempt, data=data)


def test_plain_view_breaks_long_lines_flushes_at_the_end_and_marks_a_restart() -> None:
    out = io.StringIO()
    view = ProgressView("run-1", out)
    with view:
        view.event(_event(EventType.STEP_STARTED))
        view.event(_event(EventType.STEP_DELTA, text="half a line"))
        assert out.getvalue() == "[running] a\n"  # a partial line waits for its end
        view.event(_event(EventType.STEP_DELTA, attempt=2, text="again " + "word " * 30))
        view.event(_event(EventType.STEP_FAILED, error="boom\nmore"))
    lines = out.getvalue().splitlines()
    assert lines[1:3] == ["  a| half a line", "  a| (attempt 2 starts over)"]
    body = [line.removeprefix("  a| ") for line in lines[3:-1]]
    assert all(len(line) <= 100 for line in body) and len(body) == 2
    assert " ".join(body).split() == ("again " + "word " * 30).split()
    assert lines[-1] == "[failed] a error: boom"


def test_live_view_shows_the_tail_of_each_running_step() -> None:
    view = ProgressView("run-1", io.StringIO(), tail_lines=3, force_terminal=True)
    progress = RunProgress(
        name="demo",
        steps={
            "a": StepRecord(status=StepStatus.RUNNING),
            "b": StepRecord(status=StepStatus.COMPLETED, provider="openai", model="m"),
        },
        running=["a"],
        status=RunStatus.RUNNING,
    )
    view.update(progress)  # not entered: render by hand, no refresh thread
    view.event(_event(EventType.STEP_DELTA, text="".join(f"a{i}\n" for i in range(10))))
    view.event(_event(EventType.STEP_DELTA, step="b", text="finished text"))
    screen = io.StringIO()
    Console(file=screen, width=80, force_terminal=False).print(view)
    shown = screen.getvalue()
    assert "demo · run-1 · running" in shown
    assert "── a" in shown and all(f"a{i}" in shown for i in (7, 8, 9))
    assert "a6" not in shown
    assert "finished text" not in shown  # a finished step's text leaves the screen
