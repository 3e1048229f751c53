"""``llmmixer serve``: the HTTP API, the Server-Sent Events stream and the web page.

Endpoints (the OpenAPI document at ``/openapi.json`` is generated from this module)::

    POST /workflows                                  start a run      -> 201, 422, 409
    GET  /workflows                                  recent runs
    GET  /workflows/{id}                             the progress JSON (docs/interventions.md)
    GET  /workflows/{id}/spec                        the spec the run was started with
    POST /workflows/{id}/steps/{step}/{action}       retry|skip|override|approve|reject -> 409
    POST /workflows/{id}/cancel                      cancel a run     -> 202
    GET  /workflows/{id}/events                      Server-Sent Events (below)
    GET  /                                           the web page (static/index.html)
    GET  /healthz                                    liveness; no token needed

Errors are always ``{"errors": ["..."]}``, each message saying what to do.

Authentication. When ``LLMMIXER_API_TOKEN`` is set (at least 16 characters),
every API request needs ``Authorization: Bearer <token>`` (compared in
constant time); the page, its static files, ``/healthz`` and ``/openapi.json``
are public because they carry no run data. ``serve`` refuses to bind beyond
loopback without the variable. The token is accepted *only* in that header,
never in a query string: query strings end up in access logs, proxy logs and
browser history. The page therefore reads the event stream with ``fetch``
(which can send the header) instead of ``EventSource`` (which cannot), and
resumes it with ``Last-Event-ID`` itself.

Browsers. Loopback is not a wall against the web pages its user opens
(``llmmixer.runtime.http_guard`` explains the attacks): without a token only a
loopback ``Host`` is answered, and with or without one a request that changes
something must say ``Content-Type: application/json`` and must not come from
another origin (``Origin``, ``Sec-Fetch-Site``), or it is refused with 403/415
before any route runs. Every answer forbids framing and sniffing and carries a
Content-Security-Policy that lets the page run only its own script.

Only llmmixer's runs. The namespace may hold other workflows; every route
under ``/workflows/{id}`` first checks that ``id`` is a ``MixerWorkflow``
execution and answers 404 otherwise, so the API never signals, updates,
queries or cancels anything else.

The event stream. ``id:`` is the event's offset, ``event:`` its type and
``data:`` the event as JSON. ``Last-Event-ID: N`` resumes *after* N;
``?from=N`` starts *at* N (as ``MixerHandle.events(from_offset=N)``); the
header wins when both are given, because it is what a reconnecting client
sends. The stream ends once the run has closed and every event was sent.

Backpressure: each connection has its own ``MixerHandle.events`` subscription
and asks it for the next event only after the previous one was handed to the
server's transport, and uvicorn's ``send`` waits while the socket's write
buffer is full. So a slow reader holds at most one poll page of the workflow
stream (about 1 MB of payload, the library's own cap) plus one transport
buffer (64 KiB), never a queue that grows with the run. A disconnect cancels
the pending poll and closes the subscription at once, even while no event is
due.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from temporalio.client import WorkflowExecutionDescription, WorkflowExecutionStatus
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from llmmixer.client.mixer import (
    INTERVENTIONS,
    InterventionIncomplete,
    InterventionRefused,
    MixerClient,
    MixerHandle,
    RunFailed,
)
from llmmixer.client.specfile import prepare_spec
from llmmixer.core.contracts import MixerEvent
from llmmixer.core.validation import SpecError
from llmmixer.runtime.address import is_loopback
from llmmixer.runtime.http_guard import (
    GuardPolicy,
    Refusal,
    RequestGuard,
    TokenError,
    bearer_matches,
    check_token,
)
from llmmixer.workflows.mixer import WORKFLOW_NAME
from llmmixer.workflows.records import (
    BudgetLimits,
    BudgetRaise,
    InterventionOutcome,
    InterventionType,
    RunProgress,
    RunStatus,
)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "TOKEN_ENV",
    "ServeSettings",
    "create_app",
    "serve",
]

TOKEN_ENV = "LLMMIXER_API_TOKEN"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
STATIC_DIR = Path(__file__).parent / "static"
_WORKFLOW_TYPE_QUERY = f'WorkflowType="{WORKFLOW_NAME}"'
_CLOSED = {
    WorkflowExecutionStatus.COMPLETED: RunStatus.COMPLETED,
    WorkflowExecutionStatus.FAILED: RunStatus.FAILED,
    WorkflowExecutionStatus.CANCELED: RunStatus.CANCELLED,
    WorkflowExecutionStatus.TERMINATED: RunStatus.CANCELLED,
    WorkflowExecutionStatus.TIMED_OUT: RunStatus.FAILED,
}

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    """How the app behaves; ``token`` is never printed (it is left out of ``repr``)."""

    token: str | None = None
    """The bearer token every API request must carry; ``None`` lets every request in."""
    max_body_bytes: int = 1024 * 1024
    """Largest request body; a bigger one is refused with 413 before it is parsed."""
    keepalive_s: float = 15.0
    """An SSE comment is sent after this long without an event, so proxies keep the
    connection open and a vanished client is noticed."""

    spec_threads: int = 4
    """Specs parsed and validated at once, each in a worker thread (never on the event
    loop, where a slow document would hold every other request)."""

    def __post_init__(self) -> None:
        # Raises TokenError, naming the variable, for a guessable token.
        check_token(TOKEN_ENV, self.token)

    def __repr__(self) -> str:
        token = "set" if self.token else "unset"
        return f"ServeSettings(token={token}, max_body_bytes={self.max_body_bytes})"


# ---- request and response bodies ------------------------------------------------------


class StartRequest(BaseModel):
    """``POST /workflows``."""

    model_config = ConfigDict(extra="forbid")

    spec: dict[str, Any] | str = Field(
        description="The spec as a JSON object, or as YAML/JSON text (never a file path)."
    )
    inputs: dict[str, Any] = Field(
        default_factory=dict, description="Values for {{inputs.*}}, merged over the spec's own."
    )
    workflow_id: str | None = Field(default=None, description="Default: NAME-<random>.")
    dry_run: bool = Field(default=False, description="Answer every provider call offline.")


class Started(BaseModel):
    workflow_id: str
    run_id: str | None
    progress_url: str
    events_url: str


class RunSummary(BaseModel):
    workflow_id: str
    run_id: str
    status: str
    start_time: datetime | None
    close_time: datetime | None


class RunList(BaseModel):
    runs: list[RunSummary]


class SpecOfRun(BaseModel):
    workflow_id: str
    spec: dict[str, Any]


class InterventionBody(BaseModel):
    """The optional text of an intervention; which field applies depends on the action."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(default=None, description="retry: a new prompt for an LLM step")
    reason: str | None = Field(default=None, description="skip, reject: why")
    output: str | None = Field(default=None, description="override: the step's output (required)")
    comment: str | None = Field(default=None, description="approve: a comment")


class Cancelling(BaseModel):
    workflow_id: str
    message: str


class Errors(BaseModel):
    errors: list[str]


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": Errors, "description": "missing or wrong bearer token"},
    404: {"model": Errors, "description": "no such run"},
}


# ---- authentication ---------------------------------------------------------------------

_bearer = HTTPBearer(
    auto_error=False,
    description=f"The value of {TOKEN_ENV} on the server, when it is set.",
)


def _settings(request: Request) -> ServeSettings:
    settings: ServeSettings = request.app.state.settings
    return settings


def _mixer(request: Request) -> MixerClient:
    mixer: MixerClient = request.app.state.mixer
    return mixer


async def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    expected = _settings(request).token
    if expected is None:
        return
    # `credentials` is only there so the OpenAPI document declares the scheme;
    # the raw header is compared, as bytes and in constant time.
    if not bearer_matches(request.headers.get("authorization"), expected):
        raise HTTPException(
            status_code=401,
            detail=(
                "missing or wrong token: send `Authorization: Bearer <token>` "
                f"with the value of {TOKEN_ENV} the server was started with"
            ),
            headers={"WWW-Authenticate": "Bearer"},
        )


# ---- helpers ---------------------------------------------------------------------------


def _not_found(workflow_id: str) -> HTTPException:
    return HTTPException(
        status_code=404,
        detail=f"no run with id {workflow_id!r}: list the runs with GET /workflows",
    )


async def _describe_or_404(handle: MixerHandle) -> WorkflowExecutionDescription:
    try:
        description = await handle.temporal.describe()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            raise _not_found(handle.id) from None
        raise
    if description.workflow_type != WORKFLOW_NAME:
        raise _not_a_run(handle.id)
    return description


def _not_a_run(workflow_id: str) -> HTTPException:
    return HTTPException(
        status_code=404,
        detail=(
            f"{workflow_id!r} is not an llmmixer run (another kind of workflow in this "
            "namespace): this API acts only on llmmixer's runs; list them with GET /workflows"
        ),
    )


class KnownRuns:
    """Workflow ids recently seen to be llmmixer runs, so most requests skip a describe.

    Only a positive answer is kept, for ``ttl_s``: an id can be reused by another
    workflow type once its run has closed, so the answer must not live forever.
    """

    def __init__(self, *, ttl_s: float = 30.0, size: int = 4096) -> None:
        self.ttl_s = ttl_s
        self.size = size
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, workflow_id: str) -> bool:
        seen = self._seen.get(workflow_id)
        return seen is not None and time.monotonic() - seen < self.ttl_s

    def add(self, workflow_id: str) -> None:
        self._seen[workflow_id] = time.monotonic()
        self._seen.move_to_end(workflow_id)
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)


async def _run_handle(workflow_id: str, request: Request) -> MixerHandle:
    """The handle of ``workflow_id`` once it is known to be an llmmixer run; 404 otherwise."""
    handle = _mixer(request).get_handle(workflow_id)
    known: KnownRuns = request.app.state.known_runs
    if workflow_id not in known:
        await _describe_or_404(handle)
        known.add(workflow_id)
    return handle


async def _progress(handle: MixerHandle) -> RunProgress:
    """The progress query, or for a closed run that cannot answer it, its result."""
    try:
        return await handle.progress()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            raise _not_found(handle.id) from None
        status = (await _describe_or_404(handle)).status
        if status is None or status not in _CLOSED:
            raise
    # A closed run's query needs a worker to replay it; the result does not.
    try:
        return await handle.result()
    except RunFailed as failure:
        return RunProgress(status=_CLOSED[status], error=str(failure))


def _spec_text(text: str) -> str:
    # `read_spec` treats a one-line string ending in .yaml/.yml/.json as a file
    # path. Over HTTP that would read files on the server, so the text always
    # gets a trailing newline: YAML and JSON mean the same with it, and line
    # numbers in error messages stay right.
    return text if text.endswith("\n") else text + "\n"


def _links(workflow_id: str) -> tuple[str, str]:
    return f"/workflows/{workflow_id}", f"/workflows/{workflow_id}/events"


# ---- the API -----------------------------------------------------------------------------

api = APIRouter(dependencies=[Depends(require_token)], responses=_ERROR_RESPONSES)


@api.post(
    "/workflows",
    status_code=201,
    response_model=Started,
    responses={
        409: {"model": Errors, "description": "a run with this workflow_id exists"},
        422: {"model": Errors, "description": "the spec is invalid: one message per problem"},
    },
)
async def start_run(body: StartRequest, request: Request) -> Started:
    """Validate the spec (the same messages as ``llmmixer validate``) and start a run."""
    spec = _spec_text(body.spec) if isinstance(body.spec, str) else body.spec
    try:
        # Parsing and validating a large or hostile document takes CPU time;
        # in a thread it holds neither the event stream nor any other request.
        prepared, parsed = await anyio.to_thread.run_sync(
            functools.partial(prepare_spec, spec, inputs=body.inputs, dry_run=body.dry_run),
            limiter=request.app.state.spec_limiter,
        )
        handle = await _mixer(request).start_prepared(
            prepared, parsed, workflow_id=body.workflow_id
        )
    except SpecError as error:
        raise HTTPException(
            status_code=422, detail=[str(issue) for issue in error.issues]
        ) from None
    except WorkflowAlreadyStartedError:
        raise HTTPException(
            status_code=409,
            detail=f"a run with id {body.workflow_id!r} already exists: choose another workflow_id",
        ) from None
    progress_url, events_url = _links(handle.id)
    return Started(
        workflow_id=handle.id,
        run_id=handle.temporal.result_run_id,
        progress_url=progress_url,
        events_url=events_url,
    )


@api.get("/workflows", response_model=RunList)
async def list_runs(request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> RunList:
    """Recent runs, newest first."""
    runs: list[RunSummary] = []
    async for execution in _mixer(request).temporal.list_workflows(
        _WORKFLOW_TYPE_QUERY, limit=limit
    ):
        runs.append(
            RunSummary(
                workflow_id=execution.id,
                run_id=execution.run_id,
                status=_status_name(execution.status),
                start_time=execution.start_time,
                close_time=execution.close_time,
            )
        )
    return RunList(runs=runs)


def _status_name(status: WorkflowExecutionStatus | None) -> str:
    if status is None:
        return "unknown"
    if status in _CLOSED:
        return _CLOSED[status].value
    return status.name.lower()


WorkflowId = Annotated[str, PathParam(description="the run's workflow id")]


async def run_handle(workflow_id: WorkflowId, request: Request) -> MixerHandle:
    return await _run_handle(workflow_id, request)


Run = Annotated[MixerHandle, Depends(run_handle)]


@api.get("/workflows/{workflow_id}", response_model=RunProgress)
async def get_progress(handle: Run) -> RunProgress:
    """The run's progress (the same object as `llmmixer status --json`)."""
    return await _progress(handle)


@api.get("/workflows/{workflow_id}/spec", response_model=SpecOfRun)
async def get_spec(workflow_id: WorkflowId, handle: Run, request: Request) -> SpecOfRun:
    """The spec the run was started with (its ``needs`` give the page its DAG order)."""
    mixer = _mixer(request)
    # Only the first history event is read: a long run's history can be large.
    async for event in handle.temporal.fetch_history_events(page_size=1):
        started = event.workflow_execution_started_event_attributes
        if started.input.payloads:
            (spec,) = await mixer.temporal.data_converter.decode(
                list(started.input.payloads)[:1], [dict]
            )
            return SpecOfRun(workflow_id=workflow_id, spec=spec)
        break
    raise HTTPException(status_code=404, detail=f"run {workflow_id!r} has no spec in its history")


@api.post(
    "/workflows/{workflow_id}/steps/{step}/{action}",
    response_model=InterventionOutcome,
    responses={409: {"model": Errors, "description": "refused: the workflow's reason"}},
)
async def intervene(
    workflow_id: WorkflowId,
    step: str,
    action: InterventionType,
    handle: Run,
    body: InterventionBody | None = None,
) -> InterventionOutcome:
    """Retry, skip, override, approve or reject a step, through the validated updates.

    A refused intervention changes nothing and answers 409 with the workflow's reason.
    """
    body = body or InterventionBody()
    try:
        return await handle.intervene(action, step, getattr(body, INTERVENTIONS[action].field))
    except InterventionIncomplete as missing:
        raise HTTPException(
            status_code=422,
            detail=f'{action} needs the new {missing.field}: send {{"{missing.field}": "..."}}',
        ) from None
    except InterventionRefused as refusal:
        raise HTTPException(status_code=409, detail=str(refusal)) from None
    except RPCError as error:
        raise await _update_error(handle, error) from None


async def _update_error(handle: MixerHandle, error: RPCError) -> Exception:
    """What to answer when an update did not reach the run: 404, 409 if it ended, else the error."""
    status = (await _describe_or_404(handle)).status
    if status in _CLOSED:
        return HTTPException(
            status_code=409,
            detail=f"the run has ended ({_CLOSED[status].value}); start a new run instead",
        )
    return error


@api.post(
    "/workflows/{workflow_id}/budget",
    response_model=BudgetLimits,
    responses={409: {"model": Errors, "description": "refused: the workflow's reason"}},
)
async def raise_budget(workflow_id: WorkflowId, body: BudgetRaise, handle: Run) -> BudgetLimits:
    """Raise the spec's budget, or a decompose step's (``step``); the steps it held then start.

    Limits only go up. A refusal (no such budget, a limit not above the
    current one) changes nothing and answers 409 with the workflow's reason.
    """
    try:
        return await handle.raise_budget(
            step=body.step, max_tokens=body.max_tokens, max_cost_usd=body.max_cost_usd
        )
    except InterventionRefused as refusal:
        raise HTTPException(status_code=409, detail=str(refusal)) from None
    except RPCError as error:
        raise await _update_error(handle, error) from None


@api.post("/workflows/{workflow_id}/cancel", status_code=202, response_model=Cancelling)
async def cancel_run(workflow_id: WorkflowId, handle: Run) -> Cancelling:
    """Ask the run to stop: running commands and LLM streams end, the run ends cancelled."""
    status = (await _describe_or_404(handle)).status
    if status in _CLOSED:
        raise HTTPException(
            status_code=409,
            detail=f"the run has already ended ({_CLOSED[status].value}); nothing to cancel",
        )
    await handle.cancel()
    return Cancelling(
        workflow_id=workflow_id,
        message="cancellation requested: running steps are being stopped",
    )


@api.get(
    "/workflows/{workflow_id}/events",
    response_class=Response,
    responses={
        200: {
            "description": (
                "Server-Sent Events: `id:` offset, `event:` type, `data:` the event JSON. "
                "Ends once the run has closed and every event was sent."
            ),
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        400: {"model": Errors, "description": "Last-Event-ID is not an offset"},
    },
)
async def stream_events(
    workflow_id: WorkflowId,
    handle: Run,
    request: Request,
    from_offset: Annotated[
        int | None,
        Query(alias="from", ge=0, description="first offset to send (inclusive)"),
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(description="resume after this offset (what a reconnecting client sends)"),
    ] = None,
) -> Response:
    """The run's events, live, from an offset; resumable with ``Last-Event-ID``."""
    start = from_offset or 0
    if last_event_id is not None and last_event_id.strip():
        try:
            start = int(last_event_id) + 1
        except ValueError:
            raise HTTPException(
                status_code=400,
                detail=(
                    f"Last-Event-ID {last_event_id!r} is not an event offset: "
                    "send the `id:` of the last event received, or omit it"
                ),
            ) from None
        if start < 0:
            raise HTTPException(status_code=400, detail="Last-Event-ID must be 0 or more")
    return EventStreamResponse(
        handle.events(start),
        keepalive_s=_settings(request).keepalive_s,
        streams=request.app.state.streams,
    )


# ---- Server-Sent Events --------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class OpenStreams:
    """How many event streams are open: lets tests see that a disconnect frees one."""

    def __init__(self) -> None:
        self.count = 0


def sse_frame(event: MixerEvent) -> bytes:
    # model_dump_json writes no raw newline (they are escaped inside strings),
    # so the JSON is always a single `data:` line.
    return (
        f"id: {event.offset}\nevent: {event.type.value}\ndata: {event.model_dump_json()}\n\n"
    ).encode()


class EventStreamResponse(Response):
    """Streams one subscription, one event at a time, until the run ends or the client goes.

    Two tasks: one pulls the next event and writes it; the other waits for the
    client's disconnect. Whichever ends first cancels the other, so a client
    that leaves while the subscription waits for the next event frees it at
    once rather than at the next write.
    """

    media_type = "text/event-stream"

    def __init__(
        self, events: AsyncIterator[MixerEvent], *, keepalive_s: float, streams: OpenStreams
    ) -> None:
        # Response.__init__ is not called: it would declare a Content-Length for
        # an empty body, and this body is open-ended (as StreamingResponse does).
        self.status_code = 200
        self.background = None
        self.init_headers(
            {
                "Cache-Control": "no-cache",
                # nginx and similar proxies would otherwise hold events back in a buffer
                "X-Accel-Buffering": "no",
            }
        )
        self._events = events
        self._keepalive_s = keepalive_s
        self._streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        self._streams.count += 1
        pump = asyncio.create_task(self._pump(send))
        watch = asyncio.create_task(self._wait_for_disconnect(receive))
        try:
            done, _ = await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watch):
                task.cancel()
            results = await asyncio.gather(pump, watch, return_exceptions=True)
            self._streams.count -= 1
        if watch in done:
            return  # the client left; nothing more can be sent
        if isinstance(results[0], BaseException):
            # Headers are sent, so no error status can follow. The connection is
            # dropped rather than ended cleanly: a clean end means "the run has
            # closed", while a cut makes the client resume with Last-Event-ID.
            raise results[0]
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _pump(self, send: Send) -> None:
        events = self._events
        pending: asyncio.Future[MixerEvent] | None = None
        try:
            # The browser's EventSource waits this long before reconnecting.
            await send(
                {"type": "http.response.body", "body": b"retry: 2000\n\n", "more_body": True}
            )
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(events))
                done, _ = await asyncio.wait({pending}, timeout=self._keepalive_s)
                if not done:
                    # The same poll stays pending: a keepalive never skips an event.
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b": keepalive\n\n",
                            "more_body": True,
                        }
                    )
                    continue
                try:
                    event = pending.result()
                except StopAsyncIteration:
                    return
                pending = None
                # uvicorn's send waits while the socket's buffer is full: this await
                # is what keeps a slow reader from making the server buffer events.
                await send(
                    {"type": "http.response.body", "body": sse_frame(event), "more_body": True}
                )
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    @staticmethod
    async def _wait_for_disconnect(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return


# ---- the app -------------------------------------------------------------------------------


class BodyLimit:
    """Refuses a request body over ``max_bytes`` with 413, keeping at most that much.

    A declared Content-Length over the limit is refused without keeping any of
    it; a chunked body is counted as it arrives. The rest of a refused body is
    read and dropped (up to ``_DRAIN_FACTOR`` times the limit) before the 413 is
    sent: a client still writing its body would otherwise see a reset
    connection instead of the answer. The accepted body is handed on whole.
    """

    _DRAIN_FACTOR = 16

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_large = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            more = bool(message.get("more_body", False))
            size += len(chunk)
            if too_large or size > self.max_bytes:
                too_large = True
                chunks.clear()
                if size > self.max_bytes * self._DRAIN_FACTOR:
                    break
                continue
            chunks.append(chunk)
        if too_large:
            await self._too_large(scope, receive, send)
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {
                "errors": [
                    f"the request body is over {self.max_bytes} bytes: send a smaller "
                    "spec, and give large inputs as files that the steps read"
                ]
            },
            status_code=413,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


#: The page loads only its own script and stylesheet and talks only to this server;
#: nothing may frame it, and no inline script runs (step outputs are shown as text).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    # Another site may not embed these answers (as a script, an image...) either.
    (b"cross-origin-resource-policy", b"same-origin"),
]


class SecurityHeaders:
    """Adds the headers above to every answer, refusals and the event stream included."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in _SECURITY_HEADERS if n not in present]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _refused(refusal: Refusal) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    return JSONResponse({"errors": [refusal.message]}, status_code=refusal.status)


def _error_messages(detail: Any) -> list[str]:
    if isinstance(detail, list):
        return [str(item) for item in detail]
    return [str(detail)]


def create_app(mixer: MixerClient, settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app over a connected ``MixerClient``."""
    settings = settings or ServeSettings()
    app = FastAPI(
        title="llmmixer",
        summary="Start, watch and steer durable multi-LLM workflows.",
        version="1",
        # Swagger UI and ReDoc load their scripts from a CDN; the page at / is the UI.
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        # A body is read as JSON only with a JSON Content-Type (the default since
        # FastAPI 0.132, stated so it never changes under us): text/plain and form
        # posts are what other web sites can send without a CORS preflight.
        strict_content_type=True,
    )
    app.state.mixer = mixer
    app.state.settings = settings
    app.state.streams = OpenStreams()
    app.state.known_runs = KnownRuns()
    app.state.spec_limiter = anyio.CapacityLimiter(settings.spec_threads)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"errors": _error_messages(error.detail)},
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def body_error(request: Request, error: RequestValidationError) -> JSONResponse:
        messages = []
        for item in error.errors():
            where = ".".join(str(part) for part in item.get("loc", ()))
            messages.append(f"{where}: {item.get('msg', 'invalid')}")
        return JSONResponse({"errors": messages}, status_code=422)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(api)
    # The last added runs first: headers on every answer, then the browser checks,
    # then the body limit, so a refused request's body is never read.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        RequestGuard,
        policy=GuardPolicy(
            token_variable=TOKEN_ENV,
            token_set=settings.token is not None,
        ),
        respond=_refused,
    )
    app.add_middleware(SecurityHeaders)
    return app


# ---- the command ---------------------------------------------------------------------------


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> int:
    """``llmmixer serve``: exit 2 for a refused configuration, 1 if Temporal is unreachable."""
    import uvicorn

    from llmmixer.runtime.connection import Connection

    try:
        token = check_token(TOKEN_ENV, os.environ.get(TOKEN_ENV))
    except TokenError as error:
        _err(f"refusing to start: {error}")
        return 2
    if token is None and not is_loopback(host):
        _err(
            f"refusing to serve on {host}: anyone who can reach it could start and steer runs. "
            f"Set {TOKEN_ENV} to a long random secret (for example `export {TOKEN_ENV}="
            '$(python3 -c "import secrets; print(secrets.token_urlsafe())")`), '
            "or serve on 127.0.0.1"
        )
        return 2
    connection = Connection.from_env()
    try:
        mixer = MixerClient(await connection.connect(), connection.task_queue)
    except RuntimeError as error:
        _err(
            f"cannot reach Temporal at {connection.address}: {error}. "
            "Start `llmmixer dev`, or set TEMPORAL_ADDRESS"
        )
        return 1
    if token is None:
        _err(
            f"{TOKEN_ENV} is not set: the API is open to every local user of this machine "
            "(web pages cannot use it: only loopback Host names and same-origin requests "
            "are answered)"
        )
    app = create_app(mixer, ServeSettings(token=token))
    shown = f"[{host}]" if ":" in host else host
    _err(
        f"starting on http://{shown}:{port}/ (API under /workflows, OpenAPI at /openapi.json) "
        f"for Temporal {connection.address}, task queue {connection.task_queue!r}"
    )
    # The access log shows method, path and status; the token travels only in a
    # header, which uvicorn never logs.
    config = uvicorn.Config(app, host=host, port=port, log_level="info", lifespan="off")
    server = uvicorn.Server(config)
    try:
        await server.serve()
    except SystemExit:
        # uvicorn exits the process when it cannot bind (it has logged why);
        # returning instead lets the CLI leave through its usual, safe exit.
        _err(f"cannot listen on {shown}:{port}: choose another --port, or stop what uses it")
        return 1
    return 0 if server.started else 1
