"""``llmmixer serve`` against the web pages its user opens, and beyond its own runs.

Each test plays the attacker over real HTTP against a real uvicorn serving the
app, over a real Temporal dev server and worker: a form on another site that
approves a gate, a DNS-rebound page (``Host: evil.example``), a request aimed
at a workflow that is not an llmmixer run, a slow document that would freeze
every other request.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus
from test_serve import dry_chain, serve_in_process

from llmmixer.client.http import CONTENT_SECURITY_POLICY, ServeSettings, create_app
from llmmixer.client.http import routes as server_module
from llmmixer.client.mixer import MixerClient
from llmmixer.runtime.http_guard import TokenError
from llmmixer.workflows.records import StepStatus

TOKEN = f"security-test-{uuid.uuid4().hex}"
EVIL = "https://evil.example"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def workflow_cache() -> int:
    return 100  # updates need a cache: see conftest.workflow_cache


@pytest.fixture
async def open_server(mixer: MixerClient) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """`serve` as a user starts it on their machine: loopback, no token."""
    app = create_app(mixer, ServeSettings(token=None))
    async with serve_in_process(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        yield url, http


async def _gate_waiting(mixer: MixerClient) -> str:
    handle = await mixer.start(dry_chain("g", 1, gate_after=1), dry_run=True)
    deadline = time.monotonic() + 60
    while (await handle.progress()).steps["ggate"].status != StepStatus.WAITING:
        assert time.monotonic() < deadline, "the gate never waited"
        await asyncio.sleep(0.1)
    return handle.id


# ---- cross-site requests ---------------------------------------------------------------------


async def test_a_form_on_another_site_cannot_approve_a_gate(
    open_server: tuple[str, httpx.AsyncClient], mixer: MixerClient
) -> None:
    url, http = open_server
    workflow_id = await _gate_waiting(mixer)
    approve = f"/workflows/{workflow_id}/steps/ggate/approve"
    host = url.removeprefix("http://")
    # What a browser sends for <form method=post action=http://127.0.0.1:PORT/...>
    # on https://evil.example: no CORS preflight is asked for these.
    attacks: list[dict[str, str]] = [
        {"Content-Type": "text/plain", "Origin": EVIL, "Sec-Fetch-Site": "cross-site"},
        {"Content-Type": "application/x-www-form-urlencoded", "Origin": EVIL},
        {"Content-Type": "multipart/form-data; boundary=x", "Sec-Fetch-Site": "cross-site"},
        # fetch(..., {mode: "no-cors"}) from another port of localhost
        {"Content-Type": "text/plain", "Origin": "http://localhost:3000"},
        # a sandboxed iframe or a redirect: the origin is opaque
        {"Content-Type": "text/plain", "Origin": "null"},
        # even a JSON body (a preflighted fetch) is refused from another origin
        {**JSON, "Origin": EVIL},
        {**JSON, "Sec-Fetch-Site": "same-site"},
    ]
    for headers in attacks:
        response = await http.post(approve, content=b"", headers=headers)
        assert response.status_code == 403, (headers, response.text)
        message = response.json()["errors"][0]
        assert "another" in message and "curl" in message, message
    # No Origin at all (an old browser, a plugin) but not JSON: still refused.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        response = await http.post(approve, content=b"", headers=headers)
        assert response.status_code == 415, (content_type, response.text)
        assert "Content-Type: application/json" in response.json()["errors"][0]

    progress = (await http.get(f"/workflows/{workflow_id}")).json()
    assert progress["steps"]["ggate"]["status"] == "waiting", "a refused request approved"

    # The page itself (same origin) and a local script (no Origin) still work.
    page = {**JSON, "Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"}
    skipped = await http.post(f"/workflows/{workflow_id}/steps/nothere/skip", json={}, headers=page)
    assert skipped.status_code == 409, skipped.text  # reached the workflow, which refused
    approved = await http.post(approve, json={"comment": "from curl"})
    assert approved.status_code == 200, approved.text
    assert approved.json()["action"] == "approve"


async def test_a_cross_site_post_cannot_start_a_run(
    open_server: tuple[str, httpx.AsyncClient], mixer: MixerClient
) -> None:
    _, http = open_server
    wanted = f"csrf-{uuid.uuid4().hex[:8]}"
    body = {"spec": dry_chain("c", 1), "workflow_id": wanted, "dry_run": True}
    refused = await http.post(
        "/workflows", json=body, headers={"Origin": EVIL, "Sec-Fetch-Site": "cross-site"}
    )
    assert refused.status_code == 403
    as_text = await http.post(
        "/workflows",
        content=httpx.Request("POST", "/", json=body).content,
        headers={"Content-Type": "text/plain"},
    )
    assert as_text.status_code == 415
    missing = await http.get(f"/workflows/{wanted}")
    assert missing.status_code == 404, "a refused request started a run"
    started = await http.post("/workflows", json=body)
    assert started.status_code == 201, started.text


# Every route that changes something, with a concrete path and a body it would
# accept. A new POST (PUT, PATCH, DELETE) route fails the test below until it is
# added here, so no state-changing route escapes these attacks.
STATE_CHANGING: dict[str, tuple[str, dict[str, Any]]] = {
    "/workflows": ("/workflows", {"spec": dry_chain("x", 1), "dry_run": True}),
    "/workflows/{workflow_id}/steps/{step}/{action}": (
        "/workflows/{run}/steps/ggate/approve",
        {"comment": "forged"},
    ),
    "/workflows/{workflow_id}/budget": ("/workflows/{run}/budget", {"max_tokens": 10**9}),
    "/workflows/{workflow_id}/cancel": ("/workflows/{run}/cancel", {}),
    "/workflows/{workflow_id}/rerun": ("/workflows/{run}/rerun", {}),
    "/schedules/{schedule_id}/trigger": ("/schedules/{schedule}/trigger", {}),
    "/schedules/{schedule_id}/pause": ("/schedules/{schedule}/pause", {"note": "forged"}),
    "/schedules/{schedule_id}/unpause": ("/schedules/{schedule}/unpause", {}),
}


async def test_every_state_changing_route_refuses_other_origins_and_host_names(
    open_server: tuple[str, httpx.AsyncClient], mixer: MixerClient
) -> None:
    url, http = open_server
    port = url.rsplit(":", 1)[1]
    routes = {
        path
        for path, methods in (await http.get("/openapi.json")).json()["paths"].items()
        if set(methods) - {"get", "head", "options"}
    }
    assert routes == set(STATE_CHANGING), "add the new route to STATE_CHANGING"
    workflow_id = await _gate_waiting(mixer)
    schedule = f"csrf-{uuid.uuid4().hex[:8]}"
    await mixer.create_schedule(schedule, dry_chain("s", 1), cron="0 3 * * *", dry_run=True)
    try:
        attacks: list[dict[str, str]] = [
            {**JSON, "Origin": EVIL},
            {**JSON, "Sec-Fetch-Site": "cross-site"},
            {**JSON, "Origin": "null"},
            {"Content-Type": "text/plain"},
            {**JSON, "Host": f"evil.example:{port}"},
        ]
        for template, body in STATE_CHANGING.values():
            path = template.format(run=workflow_id, schedule=schedule)
            for headers in attacks:
                response = await http.post(
                    path, content=httpx.Request("POST", "/", json=body).content, headers=headers
                )
                assert response.status_code in (403, 415), (path, headers, response.text)
        progress = (await http.get(f"/workflows/{workflow_id}")).json()
        assert progress["steps"]["ggate"]["status"] == "waiting", "a refused request acted"
        described = await mixer.describe_schedule(schedule)
        assert described.runs_started == 0, "a refused request triggered the schedule"
        assert not described.paused, "a refused request paused the schedule"
        # The same requests from a local script (JSON, no Origin) are answered.
        triggered = await http.post(f"/schedules/{schedule}/trigger", json={})
        assert triggered.status_code == 202, triggered.text
    finally:
        await mixer.delete_schedule(schedule)


# ---- DNS rebinding ------------------------------------------------------------------------------


async def test_without_a_token_only_loopback_host_names_are_answered(
    open_server: tuple[str, httpx.AsyncClient], mixer: MixerClient
) -> None:
    url, http = open_server
    port = url.rsplit(":", 1)[1]
    workflow_id = await _gate_waiting(mixer)
    # evil.example resolves to 127.0.0.1 for a moment: the page on it is then
    # same-origin with the server, and the browser lets it read and send anything.
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.nip.io:{port}", "[::1"):
        for method, path, body in (
            ("GET", "/workflows", None),
            ("GET", f"/workflows/{workflow_id}", None),
            ("GET", "/", None),
            ("POST", f"/workflows/{workflow_id}/steps/ggate/approve", {}),
        ):
            response = await http.request(method, path, json=body, headers={"Host": host})
            assert response.status_code == 403, (host, path, response.text)
            message = response.json()["errors"][0]
            assert "LLMMIXER_API_TOKEN" in message and "127.0.0.1" in message, message
    progress = (await http.get(f"/workflows/{workflow_id}")).json()
    assert progress["steps"]["ggate"]["status"] == "waiting"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
        response = await http.get("/workflows", headers={"Host": host})
        assert response.status_code == 200, (host, response.text)


async def test_with_a_token_any_host_name_is_answered(mixer: MixerClient) -> None:
    app = create_app(mixer, ServeSettings(token=TOKEN))
    async with serve_in_process(app) as url, httpx.AsyncClient(base_url=url) as http:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        named = await http.get("/workflows", headers={**auth, "Host": "mixer.example.com"})
        assert named.status_code == 200, named.text
        # ... but the token is then what keeps others out
        anonymous = await http.get("/workflows", headers={"Host": "mixer.example.com"})
        assert anonymous.status_code == 401


# ---- only llmmixer's runs ---------------------------------------------------------------------


async def test_routes_never_touch_a_workflow_that_is_not_a_run(
    open_server: tuple[str, httpx.AsyncClient], client: Client
) -> None:
    _, http = open_server
    # Another application's workflow in the same namespace; no worker polls its queue.
    other = await client.start_workflow(
        "PayrollWorkflow",
        {"salary": 1},
        id=f"payroll-{uuid.uuid4().hex[:8]}",
        task_queue=f"nobody-{uuid.uuid4().hex[:8]}",
    )
    base = f"/workflows/{other.id}"
    for method, path in (
        ("GET", base),
        ("GET", f"{base}/spec"),
        ("GET", f"{base}/events"),
        ("POST", f"{base}/steps/any/approve"),
        ("POST", f"{base}/steps/any/reject"),
        ("POST", f"{base}/steps/any/override"),
        ("POST", f"{base}/budget"),
        ("POST", f"{base}/cancel"),
    ):
        body: dict[str, Any] | None = None
        if method == "POST":
            body = {"output": "x"} if path.endswith("override") else {}
            if path.endswith("budget"):
                body = {"max_tokens": 10}
        response = await http.request(method, path, json=body)
        assert response.status_code == 404, (path, response.text)
        message = response.json()["errors"][0]
        assert "not an llmmixer run" in message and "GET /workflows" in message, message
        assert "salary" not in response.text
    description = await other.describe()
    assert description.status == WorkflowExecutionStatus.RUNNING
    touched = [
        event.event_type
        async for event in other.fetch_history_events()
        if event.event_type
        in (
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED,
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ADMITTED,
        )
    ]
    assert touched == [], "serve acted on a workflow that is not an llmmixer run"
    await other.terminate("test over")


# ---- the token ---------------------------------------------------------------------------------


async def test_a_non_ascii_authorization_header_is_a_wrong_token(mixer: MixerClient) -> None:
    app = create_app(mixer, ServeSettings(token=TOKEN))
    async with serve_in_process(app) as url, httpx.AsyncClient(base_url=url) as http:
        for value in ("Bearer tökén".encode(), b"Bearer \xff\xfe", f"Bearer {TOKEN}é".encode()):
            response = await http.get("/workflows", headers={"Authorization": value})
            assert response.status_code == 401, (value, response.text)


def test_a_short_token_is_refused_at_start() -> None:
    with pytest.raises(TokenError, match="LLMMIXER_API_TOKEN"):
        ServeSettings(token="hunter2")
    env = {**os.environ, "LLMMIXER_API_TOKEN": "hunter2", "TEMPORAL_ADDRESS": "127.0.0.1:1"}
    done = subprocess.run(
        [sys.executable, "-m", "llmmixer.client.cli", "serve"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "LLMMIXER_API_TOKEN" in done.stderr and "at least 16" in done.stderr
    assert "hunter2" not in done.stderr


# ---- what the browser is told -----------------------------------------------------------------


async def test_every_answer_forbids_framing_sniffing_and_foreign_scripts(
    open_server: tuple[str, httpx.AsyncClient],
) -> None:
    _, http = open_server
    page = await http.get("/")
    assert page.status_code == 200
    # The page loads its script from a file, so the policy needs no inline script.
    assert '<script src="/static/app.js"' in page.text
    assert "<script>" not in page.text and " style=" not in page.text
    answers = [
        page,
        await http.get("/static/app.js"),
        await http.get("/workflows"),
        await http.get("/workflows/nope"),
        await http.post("/workflows", content=b"{}", headers={"Content-Type": "text/plain"}),
        await http.get("/workflows", headers={"Host": "evil.example"}),
    ]
    for answer in answers:
        headers = answer.headers
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY, answer.url
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
    assert "script-src 'self';" in CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY


# ---- a slow document -------------------------------------------------------------------------


async def test_a_slow_spec_does_not_freeze_other_requests(
    open_server: tuple[str, httpx.AsyncClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, http = open_server
    # A document that takes reading and validating 2 s (how long a real one
    # takes depends on the machine and the parser, so the slowness is made
    # here): while it is read, other requests must still be answered.
    real_prepare = server_module.prepare_spec

    def slow_prepare(*args: Any, **kwargs: Any) -> Any:
        time.sleep(2.0)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(server_module, "prepare_spec", slow_prepare)
    stop = threading.Event()

    def poll_health() -> list[float]:
        # From another thread: the server shares this test's event loop.
        latencies: list[float] = []
        with httpx.Client(base_url=url, timeout=120) as other_user:
            while not stop.is_set():
                began = time.monotonic()
                assert other_user.get("/healthz").status_code == 200
                latencies.append(time.monotonic() - began)
                time.sleep(0.05)
        return latencies

    poller = asyncio.ensure_future(asyncio.to_thread(poll_health))
    try:
        response = await http.post("/workflows", json={"spec": "name: slow\nsteps: []\n"})
    finally:
        stop.set()
        latencies = await poller
    assert response.status_code == 422  # invalid after all, once read
    assert response.elapsed.total_seconds() >= 2.0
    assert len(latencies) >= 3
    # On the event loop, /healthz would have waited the whole 2 s.
    assert max(latencies) < 1.0, latencies
