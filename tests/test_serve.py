"""``llmmixer serve``: the HTTP API, the SSE stream, auth and limits (docs/api.md).

Every test talks HTTP to a real uvicorn server over a real Temporal dev server
and worker: in this process where the app can be inspected, or as the
``llmmixer serve`` command in a subprocess where its memory is measured.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from fastapi import FastAPI
from temporalio.testing import WorkflowEnvironment

from llmmixer.client.http import ServeSettings, create_app
from llmmixer.client.http.events import event_response, event_stream
from llmmixer.client.mixer import MixerClient
from llmmixer.runtime.address import free_port
from llmmixer.workflows.records import InterventionRequest

TOKEN = f"serve-test-{uuid.uuid4().hex}"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLOSED = {"completed", "failed", "cancelled"}


@pytest.fixture
def workflow_cache() -> int:
    return 100  # updates need a cache: see conftest.workflow_cache


@dataclass
class Served:
    url: str
    app: FastAPI
    http: httpx.AsyncClient


@pytest.fixture
async def served(mixer: MixerClient) -> AsyncIterator[Served]:
    """The app under a real uvicorn in this process, with a token, and a client for it."""
    app = create_app(mixer, ServeSettings(token=TOKEN, keepalive_s=1.0))
    async with serve_in_process(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        yield Served(url, app, http)


class serve_in_process:
    def __init__(self, app: FastAPI) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> str:
        self.task = asyncio.create_task(self.server.serve())
        deadline = time.monotonic() + 10
        while not self.server.started:
            if self.task.done() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            await asyncio.sleep(0.02)
        return self.url

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        assert self.task is not None
        await self.task


# ---- specs and helpers -------------------------------------------------------------------


def dry_chain(prefix: str, count: int, gate_after: int | None = None) -> dict[str, Any]:
    """``count`` dry-run LLM steps in a chain, with an approval gate after step ``gate_after``."""
    steps: list[dict[str, Any]] = []
    previous: str | None = None
    for number in range(1, count + 1):
        step_id = f"{prefix}{number}"
        steps.append(
            {
                "id": step_id,
                "prompt": f"say {step_id}",
                **({"needs": [previous]} if previous else {}),
            }
        )
        previous = step_id
        if gate_after == number:
            steps.append({"id": f"{prefix}gate", "kind": "approval", "needs": [previous]})
            previous = f"{prefix}gate"
    return {
        "name": f"chain-{prefix}",
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
        "steps": steps,
    }


def flaky(marker: Path) -> dict[str, Any]:
    """`flaky` fails until ``marker`` exists and then waits for a person; `after` follows it."""
    script = (
        "import os, sys\n"
        f"if not os.path.exists({str(marker)!r}): print('not yet'); sys.exit(1)\n"
        "print('flaky ok')\n"
    )
    return {
        "name": "flaky",
        "defaults": {"retry": {"max_attempts": 1}, "on_failure": "pause"},
        "steps": [
            {"id": "flaky", "kind": "pty", "command": [sys.executable, "-c", script]},
            {
                "id": "after",
                "kind": "pty",
                "needs": ["flaky"],
                "command": [sys.executable, "-c", "print('after ok')"],
            },
        ],
    }


async def start(served: Served, spec: Any, **extra: Any) -> str:
    response = await served.http.post("/workflows", json={"spec": spec, **extra}, headers=AUTH)
    assert response.status_code == 201, response.text
    workflow_id: str = response.json()["workflow_id"]
    return workflow_id


async def progress_when(
    served: Served, workflow_id: str, predicate: Any, within_s: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    while True:
        response = await served.http.get(f"/workflows/{workflow_id}", headers=AUTH)
        assert response.status_code == 200, response.text
        progress: dict[str, Any] = response.json()
        if predicate(progress):
            return progress
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached; last progress: {progress}")
        await asyncio.sleep(0.1)


@dataclass
class Sse:
    id: int
    type: str
    data: dict[str, Any]


def parse_sse_block(block: str) -> Sse | None:
    fields: dict[str, str] = {}
    for line in block.split("\n"):
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        fields[name] = value.removeprefix(" ")
    if "data" not in fields:
        return None
    return Sse(int(fields["id"]), fields["event"], json.loads(fields["data"]))


async def read_sse(
    served: Served,
    workflow_id: str,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    until: Any = None,
) -> tuple[list[Sse], bool]:
    """Events until the stream ends (True) or ``until(event)`` holds (False: disconnected)."""
    events: list[Sse] = []
    async with served.http.stream(
        "GET",
        f"/workflows/{workflow_id}/events",
        headers={**AUTH, **(headers or {})},
        params=params,
    ) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        buffer = ""
        async for chunk in response.aiter_text():
            buffer += chunk
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                event = parse_sse_block(block)
                if event is None:
                    continue
                events.append(event)
                if until is not None and until(event):
                    return events, False
    return events, True


def assert_contiguous(events: list[Sse], start: int = 0) -> None:
    offsets = [event.id for event in events]
    assert offsets == list(range(start, start + len(events))), offsets
    assert all(event.data["offset"] == event.id for event in events)
    assert all(event.data["type"] == event.type for event in events)


# ---- starting and reading runs -------------------------------------------------------------


async def test_start_then_progress_spec_and_list(served: Served) -> None:
    workflow_id = await start(served, dry_chain("s", 3), inputs={"x": "1"}, dry_run=True)
    progress = await progress_when(served, workflow_id, lambda p: p["status"] in CLOSED)
    assert progress["status"] == "completed"
    assert list(progress["steps"]) == ["s1", "s2", "s3"]
    assert progress["steps"]["s3"]["output"].startswith("[dry-run]")
    assert progress["usage"]["input_tokens"] > 0

    spec = (await served.http.get(f"/workflows/{workflow_id}/spec", headers=AUTH)).json()
    assert spec["spec"]["steps"][1]["needs"] == ["s1"]
    assert spec["spec"]["inputs"] == {"x": "1"}

    deadline = time.monotonic() + 30
    while True:  # the visibility store lags a little behind the run
        runs = (await served.http.get("/workflows", headers=AUTH)).json()["runs"]
        if any(run["workflow_id"] == workflow_id for run in runs):
            break
        assert time.monotonic() < deadline, runs
        await asyncio.sleep(0.2)
    mine = next(run for run in runs if run["workflow_id"] == workflow_id)
    assert mine["status"] == "completed"


async def test_yaml_text_spec_and_chosen_id(served: Served) -> None:
    text = yaml.safe_dump(dry_chain("y", 1))
    wanted = f"yaml-{uuid.uuid4().hex[:6]}"
    assert await start(served, text, workflow_id=wanted, dry_run=True) == wanted
    again = await served.http.post(
        "/workflows", json={"spec": text, "workflow_id": wanted}, headers=AUTH
    )
    assert again.status_code == 409
    assert "choose another workflow_id" in again.json()["errors"][0]


async def test_unknown_run_is_404(served: Served) -> None:
    for method, path in (
        ("GET", "/workflows/nope-404"),
        ("GET", "/workflows/nope-404/spec"),
        ("GET", "/workflows/nope-404/events"),
        ("POST", "/workflows/nope-404/cancel"),
    ):
        body = {} if method == "POST" else None
        response = await served.http.request(method, path, json=body, headers=AUTH)
        assert response.status_code == 404, (path, response.text)
        assert "GET /workflows" in response.json()["errors"][0]


async def test_openapi_document_describes_the_api(served: Served) -> None:
    document = (await served.http.get("/openapi.json")).json()
    paths = document["paths"]
    for path in (
        "/workflows",
        "/workflows/{workflow_id}",
        "/workflows/{workflow_id}/steps/{step}/{action}",
        "/workflows/{workflow_id}/cancel",
        "/workflows/{workflow_id}/events",
    ):
        assert path in paths, sorted(paths)
    assert (
        "text/event-stream"
        in paths["/workflows/{workflow_id}/events"]["get"]["responses"]["200"]["content"]
    )
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


# ---- validation and limits ------------------------------------------------------------------


async def test_invalid_spec_gets_the_cli_messages(served: Served, tmp_path: Path) -> None:
    spec = {
        "name": "bad",
        "steps": [
            {"id": "a", "provider": "nosuch", "model": "m", "prompt": "hi"},
            {"id": "b", "prompt": "{{steps.c.output}}", "needs": ["zz"]},
        ],
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    cli = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "llmmixer.client.cli", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cli.returncode == 2
    expected = cli.stderr.strip().splitlines()
    assert any(line.startswith("step a: provider:") for line in expected), expected

    for body in (spec, path.read_text()):
        response = await served.http.post("/workflows", json={"spec": body}, headers=AUTH)
        assert response.status_code == 422
        assert response.json() == {"errors": expected}


async def test_spec_text_is_never_read_as_a_server_file(served: Served, tmp_path: Path) -> None:
    # `llmmixer run` reads a path; over HTTP a path would leak server files.
    path = tmp_path / "valid.yaml"
    path.write_text(yaml.safe_dump(dry_chain("p", 1)))
    response = await served.http.post("/workflows", json={"spec": str(path)}, headers=AUTH)
    assert response.status_code == 422
    assert response.json()["errors"] == [
        "spec: (document): the spec must be a mapping with `steps`"
    ]


async def test_malformed_bodies_get_errors_lists(served: Served) -> None:
    cases: list[tuple[Any, str]] = [
        ({"spec": dry_chain("m", 1), "inputs": "x=1"}, "body.inputs"),
        ({"spec": dry_chain("m", 1), "dryrun": True}, "body.dryrun"),
        ({}, "body.spec"),
    ]
    for body, where in cases:
        response = await served.http.post("/workflows", json=body, headers=AUTH)
        assert response.status_code == 422
        assert any(error.startswith(where) for error in response.json()["errors"]), response.text
    broken = await served.http.post(
        "/workflows", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert broken.status_code == 422 and broken.json()["errors"]
    yaml_error = await served.http.post(
        "/workflows", json={"spec": "steps: [\n  - id: a\n    prompt: {"}, headers=AUTH
    )
    assert yaml_error.status_code == 422
    assert "not valid YAML or JSON at line" in yaml_error.json()["errors"][0]


async def test_body_over_the_limit_is_413(served: Served) -> None:
    big = {"spec": dry_chain("b", 1), "inputs": {"blob": "x" * (1024 * 1024)}}
    response = await served.http.post("/workflows", json=big, headers=AUTH)
    assert response.status_code == 413
    assert "over 1048576 bytes" in response.json()["errors"][0]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"spec": {"name": "x", "steps": []}, "inputs": {"blob": "'
        for _ in range(20):
            yield b"y" * 65536
        yield b'"}}'

    chunked = await served.http.post(
        "/workflows", content=chunks(), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert chunked.status_code == 413


# ---- auth -------------------------------------------------------------------------------------


async def test_api_needs_the_token(served: Served) -> None:
    workflow_id = await start(served, dry_chain("t", 1), dry_run=True)
    api_requests = [
        ("GET", "/workflows"),
        ("GET", f"/workflows/{workflow_id}"),
        ("GET", f"/workflows/{workflow_id}/events"),
        ("POST", f"/workflows/{workflow_id}/cancel"),
        ("POST", f"/workflows/{workflow_id}/steps/t1/skip"),
    ]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for method, path in api_requests:
            body = {} if method == "POST" else None
            response = await served.http.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (headers, path)
            assert response.headers["www-authenticate"] == "Bearer"
            assert "LLMMIXER_API_TOKEN" in response.json()["errors"][0]
            assert TOKEN not in response.text
    posted = await served.http.post("/workflows", json={"spec": dry_chain("t", 1)})
    assert posted.status_code == 401
    # The token is taken from the header only: a query string would end up in logs.
    in_query = await served.http.get(f"/workflows/{workflow_id}/events?token={TOKEN}")
    assert in_query.status_code == 401

    assert (await served.http.get("/workflows", headers=AUTH)).status_code == 200
    for public in ("/", "/static/app.js", "/static/style.css", "/healthz", "/openapi.json"):
        assert (await served.http.get(public)).status_code == 200, public


async def test_without_a_token_configured_the_api_is_open(mixer: MixerClient) -> None:
    app = create_app(mixer, ServeSettings(token=None))
    async with serve_in_process(app) as url, httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/workflows")).status_code == 200


def test_serve_refuses_a_public_host_without_a_token() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LLMMIXER_API_TOKEN"}
    env["TEMPORAL_ADDRESS"] = "127.0.0.1:1"  # never reached: the check comes first
    for host in ("0.0.0.0", "example.com"):
        done = subprocess.run(
            [sys.executable, "-m", "llmmixer.client.cli", "serve", "--host", host],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert "Set LLMMIXER_API_TOKEN" in done.stderr
        assert "127.0.0.1" in done.stderr


# ---- interventions -----------------------------------------------------------------------------


async def test_interventions_and_refusals(served: Served, tmp_path: Path) -> None:
    marker = tmp_path / "ready"
    workflow_id = await start(served, flaky(marker))
    await progress_when(served, workflow_id, lambda p: p["steps"]["flaky"]["status"] == "waiting")
    steps = f"/workflows/{workflow_id}/steps"

    refused = await served.http.post(f"{steps}/flaky/approve", json={}, headers=AUTH)
    assert refused.status_code == 409
    assert refused.json()["errors"] == [
        "step 'flaky' is a pty step, not an approval: use retry, skip or override"
    ]
    unknown = await served.http.post(f"{steps}/ghost/retry", json={}, headers=AUTH)
    assert unknown.status_code == 409
    assert "there is no step 'ghost'" in unknown.json()["errors"][0]
    wrong_state = await served.http.post(f"{steps}/after/retry", json={}, headers=AUTH)
    assert wrong_state.status_code == 409 and "it is pending" in wrong_state.json()["errors"][0]
    no_output = await served.http.post(f"{steps}/flaky/override", json={}, headers=AUTH)
    assert no_output.status_code == 422 and "output" in no_output.json()["errors"][0]
    bad_action = await served.http.post(f"{steps}/flaky/explode", json={}, headers=AUTH)
    assert bad_action.status_code == 422

    marker.write_text("go")
    retried = await served.http.post(f"{steps}/flaky/retry", json={}, headers=AUTH)
    assert retried.status_code == 200, retried.text
    assert retried.json()["action"] == "retry"
    progress = await progress_when(served, workflow_id, lambda p: p["status"] in CLOSED)
    assert progress["status"] == "completed"
    assert progress["steps"]["flaky"]["attempts"] == 2

    ended = await served.http.post(f"{steps}/flaky/skip", json={"reason": "late"}, headers=AUTH)
    assert ended.status_code == 409 and "the run has ended" in ended.json()["errors"][0]


async def test_override_approve_and_cancel(served: Served, tmp_path: Path) -> None:
    spec = dry_chain("o", 1, gate_after=1)
    spec["steps"].append({"id": "late", "kind": "approval", "needs": ["ogate"]})
    workflow_id = await start(served, spec, dry_run=True)
    steps = f"/workflows/{workflow_id}/steps"
    await progress_when(served, workflow_id, lambda p: p["steps"]["ogate"]["status"] == "waiting")
    approved = await served.http.post(
        f"{steps}/ogate/approve", json={"comment": "ok"}, headers=AUTH
    )
    assert approved.status_code == 200 and approved.json()["action"] == "approve"
    await progress_when(served, workflow_id, lambda p: p["steps"]["late"]["status"] == "waiting")

    cancelled = await served.http.post(f"/workflows/{workflow_id}/cancel", json={}, headers=AUTH)
    assert cancelled.status_code == 202
    progress = await progress_when(served, workflow_id, lambda p: p["status"] in CLOSED)
    assert progress["status"] == "cancelled"
    again = await served.http.post(f"/workflows/{workflow_id}/cancel", json={}, headers=AUTH)
    assert again.status_code == 409 and "already ended" in again.json()["errors"][0]

    marker_spec = flaky(tmp_path / "never")
    other = await start(served, marker_spec)
    await progress_when(served, other, lambda p: p["steps"]["flaky"]["status"] == "waiting")
    overridden = await served.http.post(
        f"/workflows/{other}/steps/flaky/override", json={"output": "by hand"}, headers=AUTH
    )
    assert overridden.status_code == 200
    progress = await progress_when(served, other, lambda p: p["status"] in CLOSED)
    assert progress["steps"]["flaky"]["output"] == "by hand"
    assert progress["steps"]["flaky"]["overridden"] is True


async def test_a_budget_raised_over_http_lets_the_held_steps_run(served: Served) -> None:
    spec = dry_chain("b", 2)
    spec["budget"] = {"max_tokens": 1}
    workflow_id = await start(served, spec, dry_run=True)
    held = await progress_when(
        served, workflow_id, lambda p: p["steps"]["b2"]["status"] == "waiting"
    )
    assert held["steps"]["b2"]["waiting_reason"].startswith("budget: ")
    budget = f"/workflows/{workflow_id}/budget"

    lower = await served.http.post(budget, json={"max_tokens": 1}, headers=AUTH)
    assert lower.status_code == 409 and "raise_budget only raises" in lower.json()["errors"][0]
    elsewhere = await served.http.post(budget, json={"step": "b1", "max_tokens": 9}, headers=AUTH)
    assert elsewhere.status_code == 409 and "has no budget" in elsewhere.json()["errors"][0]
    nothing = await served.http.post(budget, json={}, headers=AUTH)
    assert nothing.status_code == 409 and "max_tokens" in nothing.json()["errors"][0]
    typo = await served.http.post(budget, json={"max_tokens": "lots"}, headers=AUTH)
    assert typo.status_code == 422

    raised = await served.http.post(budget, json={"max_tokens": 100000}, headers=AUTH)
    assert raised.status_code == 200, raised.text
    assert raised.json() == {"max_tokens": 100000, "max_cost_usd": None}
    progress = await progress_when(served, workflow_id, lambda p: p["status"] in CLOSED)
    assert progress["status"] == "completed"
    assert progress["steps"]["b2"]["status"] == "completed"

    ended = await served.http.post(budget, json={"max_tokens": 200000}, headers=AUTH)
    assert ended.status_code == 409 and "the run has ended" in ended.json()["errors"][0]
    ghost = await served.http.post(
        "/workflows/no-such-run/budget", json={"max_tokens": 5}, headers=AUTH
    )
    assert ghost.status_code == 404


# ---- the event stream ---------------------------------------------------------------------------


async def wait_streams_closed(served: Served, within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while served.app.state.streams.count:
        assert time.monotonic() < deadline, "an event stream stayed open after its client left"
        await asyncio.sleep(0.05)


async def test_resume_after_a_disconnect_gets_every_event_once(
    served: Served, mixer: MixerClient
) -> None:
    workflow_id = await start(served, dry_chain("r", 6, gate_after=3), dry_run=True)

    # First reader: leaves half-way, when the gate starts to wait.
    first, ended = await read_sse(
        served,
        workflow_id,
        until=lambda e: e.type == "step_waiting" and e.data["step"] == "rgate",
    )
    assert not ended
    assert_contiguous(first)
    # Its subscription is freed although the run still waits and no event is due.
    await wait_streams_closed(served)

    approved = await served.http.post(
        f"/workflows/{workflow_id}/steps/rgate/approve", json={}, headers=AUTH
    )
    assert approved.status_code == 200
    # Second reader: resumes after the last id seen, and the stream ends with the run.
    rest, ended = await read_sse(served, workflow_id, headers={"Last-Event-ID": str(first[-1].id)})
    assert ended
    events = first + rest
    assert_contiguous(events)
    assert events[0].type == "workflow_started" and events[-1].type == "workflow_ended"
    truth = [event async for event in mixer.get_handle(workflow_id).events()]
    assert [(e.offset, e.type.value, e.step) for e in truth] == [
        (e.id, e.type, e.data["step"]) for e in events
    ]

    # ?from=N starts at N; Last-Event-ID wins over it, as a reconnecting client sends both.
    tail, _ = await read_sse(served, workflow_id, params={"from": 4})
    assert_contiguous(tail, start=4)
    assert len(tail) == len(events) - 4
    both, _ = await read_sse(
        served, workflow_id, params={"from": 1}, headers={"Last-Event-ID": "5"}
    )
    assert both[0].id == 6
    bad = await served.http.get(
        f"/workflows/{workflow_id}/events", headers={**AUTH, "Last-Event-ID": "x"}
    )
    assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["errors"][0]
    await wait_streams_closed(served)


async def test_keepalive_while_waiting(served: Served) -> None:
    workflow_id = await start(served, dry_chain("k", 1, gate_after=1), dry_run=True)
    await progress_when(served, workflow_id, lambda p: p["steps"]["kgate"]["status"] == "waiting")
    seen = ""
    async with served.http.stream(
        "GET", f"/workflows/{workflow_id}/events", headers=AUTH
    ) as response:
        async for chunk in response.aiter_text():
            seen += chunk
            if ": keepalive" in seen:
                break
    assert "event: step_waiting" in seen
    await served.http.post(f"/workflows/{workflow_id}/cancel", json={}, headers=AUTH)
    await wait_streams_closed(served)


async def test_two_runs_streams_never_mix(served: Served) -> None:
    first = await start(served, dry_chain("a", 5), dry_run=True)
    second = await start(served, dry_chain("b", 4), dry_run=True)
    (events_a, ended_a), (events_b, ended_b) = await asyncio.gather(
        read_sse(served, first), read_sse(served, second)
    )
    assert ended_a and ended_b
    for events, prefix, count in ((events_a, "a", 5), (events_b, "b", 4)):
        assert_contiguous(events)
        assert events[0].data["data"]["name"] == f"chain-{prefix}"
        steps = {event.data["step"] for event in events if event.data["step"]}
        assert steps == {f"{prefix}{n}" for n in range(1, count + 1)}
        completed = [e for e in events if e.type == "step_completed"]
        assert len(completed) == count


async def test_a_failing_subscription_cuts_the_stream_instead_of_ending_it() -> None:
    # A clean end tells the page the run has closed; a cut makes it resume with
    # Last-Event-ID. A subscription that fails half-way must look like a cut.
    class Failing:
        calls = 0

        async def next(self, timeout_s: float) -> None:
            self.calls += 1
            if self.calls == 1:
                return None  # no event yet: a keepalive
            raise RuntimeError("the subscription failed")

    app = FastAPI()

    @app.get("/events")
    async def events() -> Any:
        return event_response(event_stream(Failing(), keepalive_s=0.05))  # type: ignore[arg-type]

    async with serve_in_process(app) as url, httpx.AsyncClient(base_url=url) as http:
        seen = ""
        with pytest.raises(httpx.RemoteProtocolError):
            async with http.stream("GET", "/events") as response:
                async for chunk in response.aiter_text():
                    seen += chunk
    assert seen.startswith("retry: 2000\n\n") and ": keepalive\n\n" in seen


# ---- memory: a slow reader does not make the server buffer the run --------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def serve_process(env: WorkflowEnvironment, task_queue: str) -> Iterator[tuple[str, int]]:
    """`llmmixer serve` as its own process, against the test's Temporal and task queue."""
    port = free_port()
    process_env = {
        **os.environ,
        "TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
        "TEMPORAL_NAMESPACE": env.client.namespace,
        "LLMMIXER_TASK_QUEUE": task_queue,
        "LLMMIXER_API_TOKEN": TOKEN,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "llmmixer.client.cli", "serve", "--port", str(port)],
        env=process_env,
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
                raise AssertionError(f"llmmixer serve did not start: {process.stderr.read()}")  # type: ignore[union-attr]
            time.sleep(0.1)
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
        assert TOKEN not in stderr, "the token was logged"


EVENT_BYTES = 256 * 1024
EVENT_COUNT = 96  # 24 MiB of events in all


async def test_slow_reader_keeps_server_memory_bounded(
    serve_process: tuple[str, int], mixer: MixerClient
) -> None:
    url, pid = serve_process
    handle = await mixer.start(dry_chain("g", 1, gate_after=1), dry_run=True)
    # Rejected signals are recorded in the event stream with their argument:
    # a cheap way to make a run with many large events.
    for number in range(EVENT_COUNT):
        reason = f"{number:04d}" + "z" * EVENT_BYTES
        await handle.temporal.signal("reject", InterventionRequest(step="nowhere", reason=reason))
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as http:
        deadline = time.monotonic() + 60
        while (await http.get(f"/workflows/{handle.id}")).json()["status"] != "waiting":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        await handle.approve("ggate")
        await handle.result()
        # Warm the server's code paths with a short read, then take the baseline.
        warm, _ = await _read_all(url, handle.id, start=EVENT_COUNT)
        assert warm
    baseline = rss_kib(pid)

    reader = _SlowReader(url, handle.id)
    samples: list[int] = []
    received = await asyncio.to_thread(reader.run, lambda: samples.append(rss_kib(pid)))
    peak = max(samples)
    growth_mib = (peak - baseline) / 1024
    total_mib = received / (1024 * 1024)
    print(
        f"\nslow SSE reader: {total_mib:.1f} MiB of events; server RSS baseline "
        f"{baseline / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB (+{growth_mib:.1f} MiB), "
        f"{len(samples)} samples"
    )
    assert total_mib > EVENT_COUNT * EVENT_BYTES / (1024 * 1024)
    # Buffering the run would add at least its 24 MiB; one poll page is ~1 MB.
    assert growth_mib < 12, f"server RSS grew by {growth_mib:.1f} MiB for a slow reader"
    assert reader.events_seen == reader.last_id + 1


async def _read_all(url: str, workflow_id: str, start: int) -> tuple[list[str], bool]:
    async with (
        httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as http,
        http.stream("GET", f"/workflows/{workflow_id}/events", params={"from": start}) as r,
    ):
        body = (await r.aread()).decode()
    return [line for line in body.splitlines() if line.startswith("id: ")], True


class _SlowReader:
    """A raw socket reader that stalls, then reads in small sips with pauses."""

    def __init__(self, url: str, workflow_id: str) -> None:
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.workflow_id = workflow_id
        self.events_seen = 0
        self.last_id = -1

    def run(self, sample: Any) -> int:
        with socket.create_connection((self.host, self.port)) as sock:
            # A small receive window, so the kernel holds little on our side.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(
                (
                    f"GET /workflows/{self.workflow_id}/events HTTP/1.1\r\n"
                    f"Host: {self.host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                    "Connection: close\r\n\r\n"
                ).encode()
            )
            data = bytearray()
            data += sock.recv(65536)
            # Stalled: an unbounded server would now pull the whole run into memory.
            for _ in range(40):
                time.sleep(0.1)
                sample()
            sips = 0
            while True:
                chunk = sock.recv(256 * 1024)
                if not chunk:
                    break
                data += chunk
                sips += 1
                if sips % 8 == 0:
                    sample()
                    time.sleep(0.02)
        text = data.decode(errors="replace")
        ids = [int(line[4:]) for line in text.split("\n") if line.startswith("id: ")]
        assert ids == list(range(len(ids))), "events missing or repeated"
        self.events_seen = len(ids)
        self.last_id = ids[-1]
        return len(data)
