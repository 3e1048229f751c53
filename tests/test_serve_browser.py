"""The web page of ``llmmixer serve`` in a real headless Chromium.

A run waits for a person; the page shows it live, a click on Retry (or, for
a step held by its budget, on Raise budget) unblocks it, and the page follows
the run to its end through the event stream alone (it never polls progress on
a timer).

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
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import ConsoleMessage, Dialog, Page, async_playwright, expect
from temporalio.testing import WorkflowEnvironment

from llmmixer.client.mixer import MixerClient
from llmmixer.runtime.address import free_port
from llmmixer.workflows.records import StepStatus

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


@pytest.fixture(autouse=True)
def _chromium() -> None:
    if CHROMIUM.exists():
        return
    message = "needs Debian's chromium at /usr/bin/chromium: apt-get install chromium"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def workflow_cache() -> int:
    return 100  # updates need a cache: see conftest.workflow_cache


@pytest.fixture
def serve_url(env: WorkflowEnvironment, task_queue: str) -> Iterator[str]:
    """The real ``llmmixer serve`` command, against the test's Temporal and worker."""
    yield from _serve(env, task_queue, token=TOKEN)


@pytest.fixture
def tokenless_serve_url(env: WorkflowEnvironment, task_queue: str) -> Iterator[str]:
    """``llmmixer serve`` as most people start it: loopback, no token."""
    yield from _serve(env, task_queue, token=None)


def _serve(env: WorkflowEnvironment, task_queue: str, token: str | None) -> Iterator[str]:
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if k != "LLMMIXER_API_TOKEN"}
    process = subprocess.Popen(
        [sys.executable, "-m", "llmmixer.client.cli", "serve", "--port", str(port)],
        env={
            **environ,
            "TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
            "TEMPORAL_NAMESPACE": env.client.namespace,
            "LLMMIXER_TASK_QUEUE": task_queue,
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


def waits_until_marker(marker: Path) -> dict[str, object]:
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


@contextlib.asynccontextmanager
async def opened_page(url: str, errors: list[str]) -> AsyncIterator[Page]:
    """A headless Chromium tab on ``url``, token pasted; page errors go to ``errors``."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = await browser.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))

            def console(message: ConsoleMessage) -> None:
                # 401 before the token is pasted is expected; nothing else is.
                if message.type == "error" and "401" not in message.text:
                    errors.append(message.text)

            page.on("console", console)
            await page.goto(url)

            # Without a token the page asks for one; it is pasted once per tab.
            await expect(page.locator("#token-form")).to_be_visible()
            await page.fill("#token-input", TOKEN)
            await page.click("#token-form button[type=submit]")
            yield page
        finally:
            await browser.close()


async def test_page_retries_a_waiting_step_and_follows_the_run(
    serve_url: str, mixer: MixerClient, tmp_path: Path
) -> None:
    marker = tmp_path / "ready"
    handle = await mixer.start(waits_until_marker(marker))
    errors: list[str] = []

    async with opened_page(f"{serve_url}/#/runs/{handle.id}", errors) as page:
        check = page.locator('tr[data-step="check"]')
        await expect(check.locator("td.state")).to_have_text("waiting", timeout=60_000)
        await expect(page.locator("#run-status")).to_have_text("waiting")
        await expect(check.locator("td.output")).to_contain_text("exited")
        await expect(page.locator('tr[data-step="report"] td.state')).to_have_text("pending")
        # DAG order: a step comes after what it needs.
        await expect(page.locator("#steps tbody tr")).to_have_count(2)
        assert await page.locator("#steps tbody tr").first.get_attribute("data-step") == "check"
        await expect(page.locator(f'#runs a[data-run="{handle.id}"]')).to_be_visible()

        marker.write_text("go")
        await check.locator('button[data-action="retry"]').click()

        await expect(page.locator("#run-status")).to_have_text("completed", timeout=60_000)
        await expect(check.locator("td.state")).to_have_text("completed")
        await expect(check.locator("td.attempts")).to_have_text("2")
        await expect(check.locator("td.output")).to_contain_text("marker found")
        report = page.locator('tr[data-step="report"]')
        await expect(report.locator("td.state")).to_have_text("completed")
        await expect(report.locator("td.output")).to_contain_text("report done")
        await expect(page.locator("#connection")).to_have_text("run closed")
        await expect(page.locator("#events")).to_contain_text("workflow_ended")
        # No action buttons remain once the run has ended.
        await expect(page.locator("td.actions button")).to_have_count(0)
        await page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

    result = await handle.result()
    assert result.status == "completed"
    assert errors == []


async def test_page_raises_the_budget_that_holds_a_step(serve_url: str, mixer: MixerClient) -> None:
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
    errors: list[str] = []
    asked: list[str] = []

    async def answer(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.accept("100000")

    async with opened_page(f"{serve_url}/#/runs/{handle.id}", errors) as page:
        second = page.locator('tr[data-step="second"]')
        await expect(second.locator("td.state")).to_have_text("waiting", timeout=60_000)
        await expect(second.locator("td.output")).to_contain_text("budget:")
        # Retrying would only be held again, so the page offers the raise instead.
        await expect(second.locator('button[data-action="retry"]')).to_have_count(0)
        page.on("dialog", answer)
        await second.locator('button[data-action="budget"]').click()

        await expect(page.locator("#run-status")).to_have_text("completed", timeout=60_000)
        await expect(second.locator("td.state")).to_have_text("completed")
        await expect(page.locator("#notice")).to_contain_text("the spec's budget raised")

    assert asked == ["New max_tokens for the spec's budget (now 1):"]
    result = await handle.result()
    assert result.status == "completed"
    assert errors == []


async def test_page_cancels_a_run(serve_url: str, mixer: MixerClient) -> None:
    handle = await mixer.start(dry_chain_with_gate(), dry_run=True)
    errors: list[str] = []
    async with opened_page(f"{serve_url}/#/runs/{handle.id}", errors) as page:
        gate = page.locator('tr[data-step="gate"]')
        await expect(gate.locator("td.state")).to_have_text("waiting", timeout=60_000)
        page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await page.click("#run-cancel")
        await expect(page.locator("#run-status")).to_have_text("cancelled", timeout=60_000)
    assert errors == []


def dry_chain_with_gate() -> dict[str, object]:
    return {
        "name": "gated",
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
        "steps": [
            {"id": "draft", "prompt": "say draft"},
            {"id": "gate", "kind": "approval", "needs": ["draft"]},
        ],
    }


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
    tokenless_serve_url: str, mixer: MixerClient
) -> None:
    handle = await mixer.start(dry_chain_with_gate(), dry_run=True)
    deadline = time.monotonic() + 60
    while (await handle.progress()).steps["gate"].status != StepStatus.WAITING:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
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
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )
            try:
                page = await browser.new_page()
                await page.goto(evil_url)
                await expect(page).to_have_title("sent", timeout=30_000)
                await asyncio.sleep(1.0)  # the form's post lands in the iframe meanwhile
            finally:
                await browser.close()
    progress = await handle.progress()
    assert progress.steps["gate"].status == StepStatus.WAITING, "another origin approved the gate"
    await handle.cancel()
