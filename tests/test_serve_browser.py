"""The web page of ``llmmixer serve`` in a real headless Chromium.

Every button a person can click on a run is clicked here, its dialog answered
(and once dismissed, which must send nothing), and each test then checks two
things: what the page shows, and the run's real state read through
``MixerHandle`` (progress, result, events), so a page that only *looks* right
fails. Beyond the buttons: the text of a running LLM step appears while it
streams; an event stream cut in the middle is resumed with ``Last-Event-ID``
and no event is shown twice; a wrong API token is refused and asked for again.

Chromium is Debian's (``apt-get install chromium``), driven by Playwright's
Python package: Playwright's own browser download is never used. Without
``/usr/bin/chromium`` the tests skip on a developer's machine, and fail under
``CI=true``: the page must never lose its coverage silently (``.ci/run``
installs Chromium or stops).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fakes.provider_server import FakeProviderServer, Reply
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Dialog,
    Locator,
    Page,
    Response,
    Route,
    async_playwright,
    expect,
)
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from llmmixer.client.mixer import MixerClient, MixerHandle
from llmmixer.client.setup import register_search_attributes
from llmmixer.runtime.address import free_port
from llmmixer.workflows.records import RunStatus, StepStatus

CHROMIUM = Path("/usr/bin/chromium")
# As this machine's probe runs it: no sandbox (root), and none of Chromium's
# background connections, which a closed network would refuse many at a time.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = f"browser-test-{uuid.uuid4().hex}"
APP_JS = Path(__file__).parent.parent / "client" / "static" / "app.js"
# The machine running these tests may be busy: waits are long, never sleeps.
SLOW = 60_000


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    message = "needs Debian's chromium at /usr/bin/chromium: apt-get install chromium"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One Chromium for the module; each test opens its own context (own sessionStorage)."""
    _require_chromium()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def workflow_cache() -> int:
    return 100  # updates need a cache: see conftest.workflow_cache


@pytest.fixture
def worker_env(provider_server: FakeProviderServer) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        **provider_server.env(),
    }


@pytest.fixture(scope="module")
def serve_url(env: WorkflowEnvironment) -> Iterator[str]:
    """The real ``llmmixer serve`` command with a token, against the session's Temporal.

    The page only reads and acts on runs by id, so one server serves every
    test's runs whatever task queue their worker polls.
    """
    yield from _serve(env, token=TOKEN)


@pytest.fixture(scope="module")
def tokenless_serve_url(env: WorkflowEnvironment) -> Iterator[str]:
    """``llmmixer serve`` as most people start it: loopback, no token."""
    yield from _serve(env, token=None)


def _serve(env: WorkflowEnvironment, token: str | None) -> Iterator[str]:
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if k != "LLMMIXER_API_TOKEN"}
    process = subprocess.Popen(
        [sys.executable, "-m", "llmmixer.client.cli", "serve", "--port", str(port)],
        env={
            **environ,
            "TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
            "TEMPORAL_NAMESPACE": env.client.namespace,
            "LLMMIXER_TASK_QUEUE": f"tq-browser-{uuid.uuid4().hex[:8]}",
            **({"LLMMIXER_API_TOKEN": token} if token else {}),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                stderr = process.stderr.read() if process.stderr else ""
                raise AssertionError(f"llmmixer serve did not start: {stderr}")
            time.sleep(0.1)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


# ---- specs ---------------------------------------------------------------------------


def waits_until_marker(marker: Path) -> dict[str, object]:
    """``check`` fails (and waits for a person) until ``marker`` exists; ``report`` needs it."""
    script = (
        "import os, sys\n"
        f"if not os.path.exists({str(marker)!r}): print('no marker yet'); sys.exit(1)\n"
        "print('marker found')\n"
    )
    return {
        "name": "browser",
        "defaults": {"retry": {"max_attempts": 1}, "on_failure": "pause"},
        "steps": [
            {"id": "check", "kind": "pty", "command": [sys.executable, "-c", script]},
            {
                "id": "report",
                "kind": "pty",
                "needs": ["check"],
                "command": [sys.executable, "-c", "print('report done')"],
            },
        ],
    }


def dry_chain_with_gate(on_failure: str = "pause") -> dict[str, object]:
    return {
        "name": "gated",
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini", "on_failure": on_failure},
        "steps": [
            {"id": "draft", "prompt": "say draft"},
            {"id": "gate", "kind": "approval", "needs": ["draft"]},
        ],
    }


# ---- the page ------------------------------------------------------------------------


@dataclass
class Tab:
    """One page in its own browser context, with what it asked and what went wrong."""

    page: Page
    errors: list[str] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)
    # Answers for the next dialogs, in order: a string accepts (prompt text),
    # None dismisses (Cancel).
    answers: list[str | None] = field(default_factory=list)

    def step(self, step_id: str) -> StepRow:
        return StepRow(self.page, step_id)

    def answer(self, *answers: str | None) -> None:
        self.answers.extend(answers)

    async def _dialog(self, dialog: Dialog) -> None:
        self.asked.append(dialog.message)
        if not self.answers:
            self.errors.append(f"unexpected dialog: {dialog.message!r}")
            await dialog.dismiss()
            return
        answer = self.answers.pop(0)
        if answer is None:
            await dialog.dismiss()
        else:
            await dialog.accept(answer)


@dataclass
class StepRow:
    page: Page
    step_id: str

    def __post_init__(self) -> None:
        row = self.page.locator(f'tr[data-step="{self.step_id}"]')
        self.state = row.locator("td.state")
        self.output = row.locator("td.output")
        self.attempts = row.locator("td.attempts")
        self.row = row

    def button(self, action: str) -> Locator:
        return self.row.locator(f'button[data-action="{action}"]')


@contextlib.asynccontextmanager
async def opened_tab(
    browser: Browser, url: str, *, token: str | None = TOKEN, allowed: tuple[str, ...] = ()
) -> AsyncIterator[Tab]:
    """A fresh tab on ``url``; with ``token``, pasted when the page asks for one.

    Console errors fail the test unless they contain one of ``allowed`` (a 401
    before the token is pasted is always expected).
    """
    context = await browser.new_context()
    try:
        page = await context.new_page()
        tab = Tab(page)
        page.on("pageerror", lambda error: tab.errors.append(str(error)))

        def console(message: ConsoleMessage) -> None:
            if message.type == "error" and not any(
                expected in message.text for expected in ("401", *allowed)
            ):
                tab.errors.append(message.text)

        page.on("console", console)
        page.on("dialog", tab._dialog)
        await page.goto(url)
        if token is not None:
            # Without a token the page asks for one; it is pasted once per tab.
            await expect(page.locator("#token-form")).to_be_visible()
            await page.fill("#token-input", token)
            await page.click("#token-form button[type=submit]")
            await expect(page.locator("#token-form")).to_be_hidden()
        yield tab
        assert tab.answers == [], f"dialogs expected but never shown: {tab.answers}"
    finally:
        await context.close()


async def wait_for_step(
    handle: MixerHandle, step: str, status: StepStatus, timeout_s: float = 60
) -> None:
    deadline = time.monotonic() + timeout_s
    while (await handle.progress()).steps[step].status != status:
        assert time.monotonic() < deadline, f"step {step} never became {status}"
        await asyncio.sleep(0.1)


# ---- every intervention --------------------------------------------------------------


async def test_page_retries_a_waiting_step_and_follows_the_run(
    browser: Browser, serve_url: str, mixer: MixerClient, tmp_path: Path
) -> None:
    marker = tmp_path / "ready"
    handle = await mixer.start(waits_until_marker(marker))

    async with opened_tab(browser, f"{serve_url}/#/runs/{handle.id}") as tab:
        page, check = tab.page, tab.step("check")
        await expect(check.state).to_have_text("waiting", timeout=SLOW)
        await expect(page.locator("#run-status")).to_have_text("waiting")
        await expect(check.output).to_contain_text("exited")
        await expect(tab.step("report").state).to_have_text("pending")
        # DAG order: a step comes after what it needs.
        await expect(page.locator("#steps tbody tr")).to_have_count(2)
        assert await page.locator("#steps tbody tr").first.get_attribute("data-step") == "check"
        await expect(page.locator(f'#runs a[data-run="{handle.id}"]')).to_be_visible()
        assert (await handle.progress()).steps["check"].status == StepStatus.WAITING

        marker.write_text("go")
        await check.button("retry").click()

        await expect(page.locator("#run-status")).to_have_text("completed", timeout=SLOW)
        await expect(check.state).to_have_text("completed")
        await expect(check.attempts).to_have_text("2")
        await expect(check.output).to_contain_text("marker found")
        report = tab.step("report")
        await expect(report.state).to_have_text("completed")
        await expect(report.output).to_contain_text("report done")
        await expect(page.locator("#connection")).to_have_text("run closed")
        await expect(page.locator("#events")).to_contain_text("workflow_ended")
        # No action buttons remain once the run has ended.
        await expect(page.locator("td.actions button")).to_have_count(0)
        await page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

    result = await handle.result()
    assert result.status == RunStatus.COMPLETED
    assert result.steps["check"].attempts == 2
    assert "marker found" in (result.steps["check"].output or "")
    assert [i.type for i in result.steps["check"].interventions] == ["retry"]
    assert tab.errors == []


async def test_page_skips_a_waiting_step_with_a_reason(
    browser: Browser, serve_url: str, mixer: MixerClient, tmp_path: Path
) -> None:
    handle = await mixer.start(waits_until_marker(tmp_path / "never"))
    async with opened_tab(browser, f"{serve_url}/#/runs/{handle.id}") as tab:
        page, check = tab.page, tab.step("check")
        await expect(check.state).to_have_text("waiting", timeout=SLOW)

        # Cancel in the dialog sends nothing: the step still waits.
        tab.answer(None)
        await check.button("skip").click()
        await expect(check.state).to_have_text("waiting")
        assert (await handle.progress()).steps["check"].status == StepStatus.WAITING

        tab.answer("flaky check, not needed today")
        await check.button("skip").click()
        await expect(check.state).to_have_text("skipped", timeout=SLOW)
        await expect(check.output).to_have_text("skipped: flaky check, not needed today")
        await expect(page.locator("#notice")).to_contain_text("skip check:")
        # Its dependant goes on with an empty output.
        await expect(page.locator("#run-status")).to_have_text("completed", timeout=SLOW)
        await expect(tab.step("report").state).to_have_text("completed")

    assert tab.asked == ["Why skip step check? (optional)"] * 2
    result = await handle.result()
    assert result.steps["check"].status == StepStatus.SKIPPED
    assert result.steps["check"].skipped_reason == "flaky check, not needed today"
    assert result.steps["report"].status == StepStatus.COMPLETED
    assert tab.errors == []


async def test_page_overrides_a_waiting_steps_output(
    browser: Browser, serve_url: str, mixer: MixerClient, tmp_path: Path
) -> None:
    handle = await mixer.start(waits_until_marker(tmp_path / "never"))
    async with opened_tab(browser, f"{serve_url}/#/runs/{handle.id}") as tab:
        page, check = tab.page, tab.step("check")
        await expect(check.state).to_have_text("waiting", timeout=SLOW)

        tab.answer(None)
        await check.button("override").click()
        await expect(check.state).to_have_text("waiting")
        assert (await handle.progress()).steps["check"].status == StepStatus.WAITING

        tab.answer("written by hand <b>not markup</b>")
        await check.button("override").click()
        await expect(check.state).to_have_text("completed", timeout=SLOW)
        # Shown as text: the page never turns a step's output into markup.
        await expect(check.output).to_have_text("written by hand <b>not markup</b>")
        await expect(check.row.locator("td.output b")).to_have_count(0)
        await expect(page.locator("#run-status")).to_have_text("completed", timeout=SLOW)

    assert tab.asked == ["New output for step check:"] * 2
    result = await handle.result()
    assert result.steps["check"].overridden
    assert result.steps["check"].output == "written by hand <b>not markup</b>"
    assert result.steps["report"].status == StepStatus.COMPLETED
    assert tab.errors == []


async def test_page_approves_a_gate(browser: Browser, serve_url: str, mixer: MixerClient) -> None:
    handle = await mixer.start(dry_chain_with_gate(), dry_run=True)
    async with opened_tab(browser, f"{serve_url}/#/runs/{handle.id}") as tab:
        page, gate = tab.page, tab.step("gate")
        await expect(gate.state).to_have_text("waiting", timeout=SLOW)
        await expect(tab.step("draft").state).to_have_text("completed")
        # An approval step offers approve and reject; a draft that completed offers nothing.
        await expect(gate.button("approve")).to_have_count(1)
        await expect(gate.button("reject")).to_have_count(1)
        await expect(tab.step("draft").row.locator("button")).to_have_count(0)

        await gate.button("approve").click()
        await expect(gate.state).to_have_text("completed", timeout=SLOW)
        await expect(page.locator("#run-status")).to_have_text("completed", timeout=SLOW)
        await expect(page.locator("#notice")).to_contain_text("approve gate: approved")

    result = await handle.result()
    assert result.steps["gate"].status == StepStatus.COMPLETED
    assert [i.type for i in result.steps["gate"].interventions] == ["approve"]
    assert tab.asked == []
    assert tab.errors == []


async def test_page_rejects_a_gate_with_a_reason(
    browser: Browser, serve_url: str, mixer: MixerClient
) -> None:
    # Rejected, the gate fails the run (by default it would wait for a person again).
    handle = await mixer.start(dry_chain_with_gate(on_failure="fail"), dry_run=True)
    async with opened_tab(browser, f"{serve_url}/#/runs/{handle.id}") as tab:
        page, gate = tab.page, tab.step("gate")
        await expect(gate.state).to_have_text("waiting", timeout=SLOW)

        tab.answer(None)
        await gate.button("reject").click()
        await expect(gate.state).to_have_text("waiting")
        assert (await handle.progress()).steps["gate"].status == StepStatus.WAITING

        tab.answer("the draft misses the point")
        await gate.button("reject").click()
        await expect(gate.state).to_have_text("failed", timeout=SLOW)
        await expect(page.locator("#run-status")).to_have_text("failed", timeout=SLOW)
        await expect(gate.output).to_contain_text("the draft misses the point")
        await expect(page.locator("#run-error")).to_contain_text("the draft misses the point")

    assert tab.asked == ["Why reject step gate? (optional)"] * 2
    progress = await handle.progress()
    assert progress.status == RunStatus.FAILED
    assert progress.steps["gate"].status == StepStatus.FAILED
    assert "the draft misses the point" in (progress.steps["gate"].error or "")
    assert tab.errors == []


async def test_page_raises_the_budget_that_holds_a_step(
    browser: Browser, serve_url: str, mixer: MixerClient
) -> None:
    spec = {
        "name": "budgeted",
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
        "budget": {"max_tokens": 1},
        "steps": [
            {"id": "first", "prompt": "say one"},
            {"id": "second", "needs": ["first"], "prompt": "say two"},
        ],
    }
    handle = await mixer.start(spec, dry_run=True)
    async with opened_tab(browser, f"{serve_url}/#/runs/{handle.id}") as tab:
        page, second = tab.page, tab.step("second")
        await expect(second.state).to_have_text("waiting", timeout=SLOW)
        await expect(second.output).to_contain_text("budget:")
        # Retrying would only be held again, so the page offers the raise instead.
        await expect(second.button("retry")).to_have_count(0)
        hold = (await handle.progress()).steps["second"].budget_hold
        assert hold is not None and hold.limit == "max_tokens"

        # A raise that is not a number is refused by the page; nothing is sent.
        tab.answer("lots")
        await second.button("budget").click()
        await expect(page.locator("#notice")).to_contain_text("max_tokens must be a number")
        assert (await handle.progress()).steps["second"].status == StepStatus.WAITING

        tab.answer("100000")
        await second.button("budget").click()
        await expect(page.locator("#run-status")).to_have_text("completed", timeout=SLOW)
        await expect(second.state).to_have_text("completed")
        await expect(page.locator("#notice")).to_contain_text(
            "the spec's budget raised: max_tokens 100000"
        )

    assert tab.asked == ["New max_tokens for the spec's budget (now 1):"] * 2
    result = await handle.result()
    assert result.status == RunStatus.COMPLETED
    assert result.steps["second"].status == StepStatus.COMPLETED
    assert result.steps["second"].budget_hold is None
    assert tab.errors == []


async def test_page_cancels_a_run(browser: Browser, serve_url: str, mixer: MixerClient) -> None:
    handle = await mixer.start(dry_chain_with_gate(), dry_run=True)
    async with opened_tab(browser, f"{serve_url}/#/runs/{handle.id}") as tab:
        page = tab.page
        await expect(tab.step("gate").state).to_have_text("waiting", timeout=SLOW)

        # "Cancel" in the confirmation keeps the run.
        tab.answer(None)
        await page.click("#run-cancel")
        await expect(page.locator("#run-status")).to_have_text("waiting")
        assert (await handle.temporal.describe()).status == WorkflowExecutionStatus.RUNNING

        tab.answer("")
        await page.click("#run-cancel")
        await expect(page.locator("#run-status")).to_have_text("cancelled", timeout=SLOW)
        await expect(page.locator("#run-cancel")).to_be_hidden()
        await expect(page.locator("#connection")).to_have_text("run closed", timeout=SLOW)

    assert tab.asked == [f"Cancel run {handle.id}?"] * 2
    assert (await handle.temporal.describe()).status == WorkflowExecutionStatus.CANCELED
    assert tab.errors == []


# ---- the lists: filters and schedules -------------------------------------------------


async def test_page_filters_runs_lists_schedules_and_pauses_one(
    browser: Browser, serve_url: str, mixer: MixerClient
) -> None:
    # The search attributes the filters use, as `llmmixer setup` registers them.
    await register_search_attributes(mixer.temporal, mixer.temporal.namespace)
    name = f"filtered-{uuid.uuid4().hex[:8]}"
    gated = await mixer.start({**dry_chain_with_gate(), "name": name}, dry_run=True)
    done = await mixer.start(
        {**dry_chain_with_gate(), "name": name, "steps": dry_chain_with_gate()["steps"][:1]},
        dry_run=True,
    )
    other = await mixer.start({**dry_chain_with_gate(), "name": f"{name}-x"}, dry_run=True)
    await done.result()
    await wait_for_step(gated, "gate", StepStatus.WAITING)
    await wait_for_step(other, "gate", StepStatus.WAITING)
    schedule = f"weekly-{uuid.uuid4().hex[:8]}"
    await mixer.create_schedule(
        schedule, {**dry_chain_with_gate(), "name": name}, cron="0 9 * * 1", dry_run=True
    )
    try:
        async with opened_tab(browser, serve_url) as tab:
            page = tab.page
            runs = page.locator("#runs a")
            await page.fill("#runs-spec", name)
            await page.select_option("#runs-state", "waiting")
            # Visibility is eventually consistent: the refresh button asks again.
            for _ in range(60):
                if await runs.count() == 1:
                    break
                await page.click("#runs-refresh")
                await page.wait_for_timeout(500)
            await expect(runs).to_have_count(1)
            await expect(page.locator(f'#runs a[data-run="{gated.id}"]')).to_contain_text("waiting")

            await page.select_option("#runs-state", "completed")
            await expect(page.locator(f'#runs a[data-run="{done.id}"]')).to_contain_text(
                "completed", timeout=SLOW
            )
            await expect(runs).to_have_count(1)

            await page.select_option("#runs-state", "")
            await expect(runs).to_have_count(2, timeout=SLOW)
            await expect(page.locator(f'#runs a[data-run="{other.id}"]')).to_have_count(0)
            await page.fill("#runs-spec", f"{name}-nothing")
            await expect(page.locator("#runs li")).to_have_text(["no such runs"], timeout=SLOW)

            listed = page.locator(f'#schedules li[data-schedule="{schedule}"]')
            for _ in range(60):
                if await listed.count() == 1:
                    break
                await page.click("#runs-refresh")
                await page.wait_for_timeout(500)
            await expect(listed).to_contain_text(f"{schedule} ({name})")
            await expect(listed).to_contain_text("0 9 * * 1 · next ")

            # "Pause" pauses the schedule itself, and the row says so at once.
            await listed.get_by_role("button", name="Pause", exact=True).click()
            await expect(page.locator("#notice")).to_contain_text(f"{schedule}: paused")
            await expect(listed).to_contain_text("paused: paused through llmmixer serve")
            assert (await mixer.describe_schedule(schedule)).paused
            await listed.get_by_role("button", name="Unpause").click()
            await expect(page.locator("#notice")).to_contain_text(f"{schedule}: unpaused")
            await expect(listed).to_contain_text("0 9 * * 1 · next ")
            await expect(listed.get_by_role("button", name="Pause", exact=True)).to_be_visible()
            assert not (await mixer.describe_schedule(schedule)).paused

            # "Trigger now" starts the schedule's run at once, and the list shows it.
            await listed.get_by_role("button", name="Trigger now").click()
            await expect(page.locator("#notice")).to_contain_text(f"{schedule}: triggered")
            triggered = await _scheduled_run(mixer, schedule)
            await page.select_option("#runs-state", "waiting")
            await page.fill("#runs-spec", name)
            started = page.locator(f'#runs a[data-run="{triggered}"]')
            for _ in range(60):
                if await started.count() == 1:
                    break
                await page.click("#runs-refresh")
                await page.wait_for_timeout(500)
            await expect(started).to_contain_text("waiting")
        assert tab.errors == []
    finally:
        for run in await _scheduled_runs(mixer, schedule):
            with contextlib.suppress(Exception):
                await mixer.get_handle(run).cancel()
        await mixer.delete_schedule(schedule)
        await gated.cancel()
        await other.cancel()


async def _scheduled_runs(mixer: MixerClient, schedule: str) -> list[str]:
    with contextlib.suppress(Exception):
        described = await mixer.temporal.get_schedule_handle(schedule).describe()
        return [
            action.action.workflow_id
            for action in described.info.recent_actions
            if hasattr(action.action, "workflow_id")
        ]
    return []


async def _scheduled_run(mixer: MixerClient, schedule: str) -> str:
    """The workflow id of the run the schedule started (it starts a moment after the trigger)."""
    for _ in range(100):
        runs = await _scheduled_runs(mixer, schedule)
        if runs:
            return runs[-1]
        await asyncio.sleep(0.1)
    raise AssertionError(f"schedule {schedule} started no run after its trigger")


def test_every_button_of_the_page_has_a_test_here() -> None:
    """A button added to the page (``ACTION_LABELS`` in app.js) must get a test above."""
    labels = re.search(r"const ACTION_LABELS = \{(.*?)\};", APP_JS.read_text(), re.S)
    assert labels is not None, "app.js has no ACTION_LABELS"
    actions = set(re.findall(r"(\w+):", labels.group(1)))
    tested = {"retry", "skip", "override", "approve", "reject", "budget"}
    assert actions == tested


# ---- live text, a dropped stream, the token ------------------------------------------


async def test_page_shows_an_llm_steps_text_while_it_streams(
    browser: Browser, serve_url: str, mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    words = [f"tok{n:02d} " for n in range(60)]
    # About 24 s of streaming: the page is open long before the last token.
    provider_server.script("openai", Reply(chunks=words, chunk_delay_s=0.4, usage=(3, 60)))
    spec = {
        "name": "live",
        "defaults": {"retry": {"max_attempts": 1}},
        "steps": [{"id": "talk", "provider": "openai", "model": "gpt-4.1-mini", "prompt": "talk"}],
    }
    handle = await mixer.start(spec)
    async with opened_tab(browser, f"{serve_url}/#/runs/{handle.id}") as tab:
        talk = tab.step("talk")
        await expect(talk.output).to_contain_text("tok", timeout=SLOW)
        await expect(talk.state).to_have_text("running")
        # The text grows on the page as it streams: several different texts,
        # each the one before plus more (not one render of what came so far).
        shown: list[str] = []
        deadline = time.monotonic() + 60
        while len(shown) < 4:
            assert time.monotonic() < deadline, f"the page showed only {shown}"
            text = await talk.output.text_content() or ""
            if not shown or text != shown[-1]:
                shown.append(text)
            await asyncio.sleep(0.1)
        # ...while the run says the step is still running and has no output
        # yet: the text came from the stream, not from the step's result.
        running = (await handle.progress()).steps["talk"]
        assert running.status == StepStatus.RUNNING, running
        assert not running.output
        assert all(b.startswith(a) and len(b) > len(a) for a, b in itertools.pairwise(shown))

        await expect(talk.state).to_have_text("completed", timeout=SLOW)
        await expect(talk.output).to_have_text("".join(words))

    result = await handle.result()
    assert result.steps["talk"].output == "".join(words)
    assert all(result.steps["talk"].output.startswith(text) for text in shown)
    assert tab.errors == []


@dataclass
class _Link:
    """One browser connection through the proxy and its connection to ``serve``."""

    browser_side: asyncio.StreamWriter
    server_side: asyncio.StreamWriter
    sent: bytearray = field(default_factory=bytearray)

    @property
    def streaming(self) -> bool:
        """Whether the last request on this (keep-alive) connection asked for events."""
        lines = re.findall(rb"(?:GET|POST|HEAD|OPTIONS) (\S+) HTTP/1\.1\r\n", bytes(self.sent))
        return bool(lines) and lines[-1].endswith(b"/events")

    def abort(self) -> None:
        self.browser_side.transport.abort()
        self.server_side.transport.abort()


class CuttableProxy:
    """A TCP proxy in front of ``serve`` whose event-stream connections the test cuts.

    What a flaky network, a proxy's idle timeout or a laptop's sleep does to a
    long-lived response: the connection is reset in the middle of the stream.
    """

    def __init__(self, upstream_url: str) -> None:
        host, port = upstream_url.removeprefix("http://").split(":")
        self._upstream = (host, int(port))
        self._server: asyncio.Server | None = None
        self._links: list[_Link] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def requests(self) -> bytes:
        """Every byte the browser sent, to read its request headers."""
        return b"".join(bytes(link.sent) for link in self._links)

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for link in self._links:
            link.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut_event_streams(self) -> int:
        """Reset every open connection that carries an event stream; how many were cut."""
        streams = [
            link
            for link in self._links
            if link.streaming and not link.browser_side.transport.is_closing()
        ]
        for link in streams:
            link.abort()
        return len(streams)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._link(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        link = _Link(writer, up_writer)
        self._links.append(link)

        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, log: bytearray | None
        ) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    if log is not None:
                        log.extend(data)
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer, link.sent), pipe(up_reader, writer, None))


async def test_page_resumes_a_cut_event_stream_without_repeating_events(
    browser: Browser, serve_url: str, mixer: MixerClient
) -> None:
    handle = await mixer.start(dry_chain_with_gate(), dry_run=True)
    proxy = CuttableProxy(serve_url)
    async with proxy as proxied:
        # Chromium reports the reset stream in the console; nothing else may go wrong.
        async with opened_tab(
            browser, f"{proxied}/#/runs/{handle.id}", allowed=("net::ERR_",)
        ) as tab:
            page, gate = tab.page, tab.step("gate")
            await expect(gate.state).to_have_text("waiting", timeout=SLOW)
            await expect(page.locator("#connection")).to_have_text("live")
            await expect(page.locator("#events")).to_contain_text("step_waiting")
            seen = await page.locator("#events li").count()

            assert proxy.cut_event_streams() == 1
            await expect(page.locator("#connection")).to_contain_text("reconnecting", timeout=SLOW)
            await expect(page.locator("#connection")).to_have_text("live", timeout=SLOW)
            # It asked to resume after the last event it had, not from the start.
            assert f"Last-Event-ID: {seen - 1}".encode() in proxy.requests

            # Events after the cut arrive on the new stream.
            await gate.button("approve").click()
            await expect(page.locator("#run-status")).to_have_text("completed", timeout=SLOW)
            await expect(page.locator("#connection")).to_have_text("run closed", timeout=SLOW)
            await expect(page.locator("#events")).to_contain_text("workflow_ended")
            shown = await page.locator("#events li").evaluate_all(
                "items => items.map(li => [li.value, li.textContent.split(' ')[0]])"
            )

    events = [(event.offset, event.type.value) async for event in handle.events()]
    # Every event of the run on the page, once each, in order.
    assert [tuple(item) for item in shown] == events
    assert len(events) > seen
    assert (await handle.progress()).steps["gate"].status == StepStatus.COMPLETED
    assert tab.errors == []


async def test_page_asks_again_for_a_wrong_token(
    browser: Browser, serve_url: str, mixer: MixerClient
) -> None:
    handle = await mixer.start(dry_chain_with_gate(), dry_run=True)
    await wait_for_step(handle, "gate", StepStatus.WAITING)
    wrong = "wrong-token-0123456789abcdef"
    answers: list[tuple[str, int, str]] = []
    held: list[Route] = []

    def answered(response: Response) -> None:
        if "/workflows" in response.url:
            auth = response.request.headers.get("authorization", "")
            answers.append((auth, response.status, response.url))

    async def hold_wrong(route: Route) -> None:
        # The wrong token's read of the spec is answered only after the right
        # token was pasted: that late 401 must not throw the right token away.
        if route.request.headers.get("authorization") == f"Bearer {wrong}":
            held.append(route)
        else:
            await route.continue_()

    async with opened_tab(browser, f"{serve_url}/#/runs/{handle.id}", token=None) as tab:
        page = tab.page
        page.on("response", answered)
        form, notice = page.locator("#token-form"), page.locator("#notice")
        # Asked at once; nothing of the run is shown without the token.
        await expect(form).to_be_visible(timeout=SLOW)
        await expect(notice).to_contain_text("wants an API token")
        await expect(page.locator("#steps tbody tr")).to_have_count(0)
        await page.route("**/spec", hold_wrong)

        await page.fill("#token-input", wrong)
        await page.click("#token-form button[type=submit]")
        await expect(notice).to_contain_text("refused that API token", timeout=SLOW)
        await expect(form).to_be_visible()
        await expect(page.locator("#token-input")).to_have_value("")
        await expect(page.locator("#steps tbody tr")).to_have_count(0)
        assert (f"Bearer {wrong}", 401) in [(auth, status) for auth, status, _ in answers]
        # The refused token is not kept: later requests do not send it again.
        assert await page.evaluate("sessionStorage.getItem('llmmixer-token')") is None

        await page.fill("#token-input", TOKEN)
        await page.click("#token-form button[type=submit]")
        await expect(form).to_be_hidden()
        await expect(notice).to_be_hidden()
        gate = tab.step("gate")
        await expect(gate.state).to_have_text("waiting", timeout=SLOW)
        await expect(page.locator("#connection")).to_have_text("live", timeout=SLOW)

        # Now the wrong token's late answer arrives: a 401 about a token no longer used.
        assert len(held) == 1, held
        await held[0].continue_()
        deadline = time.monotonic() + 30
        while not any(url.endswith("/spec") and status == 401 for _, status, url in answers):
            assert time.monotonic() < deadline, answers
            await asyncio.sleep(0.1)
        await expect(form).to_be_hidden()
        assert await page.evaluate("sessionStorage.getItem('llmmixer-token')") == TOKEN

        # The right token acts, too.
        await gate.button("approve").click()
        await expect(page.locator("#run-status")).to_have_text("completed", timeout=SLOW)
        await expect(page.locator("#connection")).to_have_text("run closed", timeout=SLOW)
        shown = await page.locator("#events li").evaluate_all(
            "items => items.map(li => [li.value, li.textContent.split(' ')[0]])"
        )

    assert all(status != 401 for auth, status, _ in answers if auth == f"Bearer {TOKEN}")
    assert (await handle.result()).steps["gate"].status == StepStatus.COMPLETED
    # One event stream: the page opened before the token was right follows none.
    events = [(event.offset, event.type.value) async for event in handle.events()]
    assert [tuple(item) for item in shown] == events
    assert tab.errors == []


# ---- another origin ------------------------------------------------------------------


class _EvilSite:
    """Another origin on this machine, serving one page (``http://127.0.0.1:<other port>``)."""

    def __init__(self, page: str) -> None:
        body = page.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_a_page_on_another_origin_cannot_approve_a_gate(
    browser: Browser, tokenless_serve_url: str, mixer: MixerClient
) -> None:
    handle = await mixer.start(dry_chain_with_gate(), dry_run=True)
    await wait_for_step(handle, "gate", StepStatus.WAITING)
    target = f"{tokenless_serve_url}/workflows/{handle.id}/steps/gate/approve"
    # What a hostile page does with no permission from the server: a form post
    # (text/plain, so no CORS preflight), then no-cors fetches of every simple kind.
    attack = f"""<!doctype html><html><body>
<iframe name="sink"></iframe>
<form id="f" method="post" enctype="text/plain" action="{target}" target="sink"></form>
<script>
  document.getElementById("f").submit();
  const simple = [
    {{method: "POST", mode: "no-cors", body: new Blob(["{{}}"])}},
    {{method: "POST", mode: "no-cors", body: "{{}}", headers: {{"Content-Type": "text/plain"}}}},
    {{method: "POST", mode: "no-cors", body: new URLSearchParams("comment=x")}},
  ];
  Promise.allSettled(simple.map((init) => fetch("{target}", init)))
    .then(() => {{ document.title = "sent"; }});
</script></body></html>"""
    with _EvilSite(attack) as evil_url:
        context = await browser.new_context()
        try:
            page = await context.new_page()
            await page.goto(evil_url)
            await expect(page).to_have_title("sent", timeout=30_000)
            await asyncio.sleep(1.0)  # the form's post lands in the iframe meanwhile
        finally:
            await context.close()
    progress = await handle.progress()
    assert progress.status == RunStatus.WAITING
    assert progress.steps["gate"].status == StepStatus.WAITING, "another origin approved the gate"
    assert progress.steps["gate"].interventions == []
    await handle.cancel()
