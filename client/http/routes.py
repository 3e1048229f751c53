"""The routes of ``llmmixer serve``'s API.

    POST /workflows                                  start a run      -> 201, 422, 409
    GET  /workflows                                  recent runs; ?state=waiting&spec=NAME
    GET  /workflows/{id}                             the progress JSON (docs/interventions.md)
    GET  /workflows/{id}/spec                        the spec the run was started with
    POST /workflows/{id}/steps/{step}/{action}       retry|skip|override|approve|reject -> 409
    POST /workflows/{id}/budget                      raise a budget   -> 409
    POST /workflows/{id}/cancel                      cancel a run     -> 202
    POST /workflows/{id}/rerun                       re-run a closed run -> 201, 422, 409
    GET  /workflows/{id}/events                      Server-Sent Events (``events.py``)
    GET  /schedules                                  llmmixer's schedules
    POST /schedules/{id}/trigger                     start a run now  -> 202
    POST /schedules/{id}/pause|unpause               {"note"?}: stop or resume its runs

Only llmmixer's runs. The namespace may hold other workflows; every route
under ``/workflows/{id}`` first checks that ``id`` is a ``MixerWorkflow``
execution and answers 404 otherwise, so the API never signals, updates,
queries or cancels anything else. Likewise ``/schedules`` lists, triggers,
pauses and unpauses only schedules whose action starts a ``MixerWorkflow``.

Every route needs the token (``auth.require_token``).
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi import Path as PathParam
from starlette.requests import Request
from starlette.responses import Response
from temporalio.client import (
    ScheduleActionStartWorkflow,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from llmmixer.client.files import has_file_inputs, store_inputs
from llmmixer.client.http.auth import require_token, settings_of
from llmmixer.client.http.events import (
    OpenStreams,
    Subscription,
    event_response,
    event_stream,
    resume_offset,
)
from llmmixer.client.http.models import (
    ERROR_RESPONSES,
    Cancelling,
    Errors,
    InterventionBody,
    RerunRequest,
    RunList,
    RunSummary,
    ScheduleChanged,
    ScheduleList,
    SchedulePauseBody,
    ScheduleSummary,
    ScheduleTriggered,
    SpecOfRun,
    Started,
    StartRequest,
)
from llmmixer.client.mixer import (
    INTERVENTIONS,
    InterventionIncomplete,
    InterventionRefused,
    MixerClient,
    MixerHandle,
    RunFailed,
)
from llmmixer.client.rerun import RerunError, SourceOpen, prepare_rerun, read_source
from llmmixer.client.schedules import ScheduleNotFound
from llmmixer.client.setup import list_query, shown_status
from llmmixer.client.specfile import prepare_spec, read_spec
from llmmixer.core.validation import SpecError
from llmmixer.workflows.mixer import WORKFLOW_NAME
from llmmixer.workflows.records import (
    BudgetLimits,
    BudgetRaise,
    InterventionOutcome,
    InterventionType,
    RunProgress,
    RunStatus,
)
from llmmixer.workflows.search import SPEC as SPEC_KEY

__all__ = ["KnownRuns", "api"]

_CLOSED = {
    WorkflowExecutionStatus.COMPLETED: RunStatus.COMPLETED,
    WorkflowExecutionStatus.FAILED: RunStatus.FAILED,
    WorkflowExecutionStatus.CANCELED: RunStatus.CANCELLED,
    WorkflowExecutionStatus.TERMINATED: RunStatus.CANCELLED,
    WorkflowExecutionStatus.TIMED_OUT: RunStatus.FAILED,
}


def _mixer(request: Request) -> MixerClient:
    mixer: MixerClient = request.app.state.mixer
    return mixer


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


def _started(handle: MixerHandle) -> Started:
    """What POST /workflows and a rerun answer: the new run and where to follow it."""
    return Started(
        workflow_id=handle.id,
        run_id=handle.temporal.result_run_id,
        progress_url=f"/workflows/{handle.id}",
        events_url=f"/workflows/{handle.id}/events",
    )


def _refuse_taken_id(workflow_id: str | None) -> HTTPException:
    return HTTPException(
        status_code=409,
        detail=f"a run with id {workflow_id!r} already exists: choose another workflow_id",
    )


api = APIRouter(dependencies=[Depends(require_token)], responses=ERROR_RESPONSES)


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
    limiter = request.app.state.spec_limiter
    try:
        # Parsing and validating a large or hostile document takes CPU time;
        # in a thread it holds neither the event stream nor any other request.
        raw = await anyio.to_thread.run_sync(read_spec, spec, limiter=limiter)
        inputs: dict[str, Any] | None = body.inputs
        merged = {**(raw.get("inputs") or {}), **body.inputs}
        if has_file_inputs(merged, stored_too=True):
            # Files arrive as bytes and go to the payload store; a path is
            # refused, never read: this process is not the caller's machine.
            raw["inputs"] = await store_inputs(
                merged, _mixer(request).temporal.data_converter, read_paths=False
            )
            inputs = None
        prepared, parsed = await anyio.to_thread.run_sync(
            functools.partial(
                prepare_spec, raw, inputs=inputs, dry_run=body.dry_run, read_paths=False
            ),
            limiter=limiter,
        )
        handle = await _mixer(request).start_prepared(
            prepared, parsed, workflow_id=body.workflow_id
        )
    except SpecError as error:
        raise HTTPException(
            status_code=422, detail=[str(issue) for issue in error.issues]
        ) from None
    except WorkflowAlreadyStartedError:
        raise _refuse_taken_id(body.workflow_id) from None
    return _started(handle)


@api.get(
    "/workflows",
    response_model=RunList,
    responses={
        422: {
            "model": Errors,
            "description": "Temporal refused the filter: its search attributes are not registered",
        }
    },
)
async def list_runs(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    state: Annotated[
        RunStatus | None, Query(description="only runs in this state (LlmmixerState)")
    ] = None,
    spec: Annotated[
        str | None,
        Query(max_length=400, description="only runs of this spec name (LlmmixerSpec)"),
    ] = None,
) -> RunList:
    """Recent runs, newest first; filtered like ``llmmixer list --state STATE --spec NAME``."""
    # The query `llmmixer list` sends: one function, so both filter alike and
    # both quote a spec name the same way (it can never widen the query).
    query = list_query(state.value if state else None, spec)
    runs: list[RunSummary] = []
    try:
        async for execution in _mixer(request).temporal.list_workflows(query, limit=limit):
            running = execution.status == WorkflowExecutionStatus.RUNNING
            runs.append(
                RunSummary(
                    workflow_id=execution.id,
                    run_id=execution.run_id,
                    status=shown_status(execution) if running else _status_name(execution.status),
                    spec=execution.typed_search_attributes.get(SPEC_KEY),
                    start_time=execution.start_time,
                    close_time=execution.close_time,
                )
            )
    except RPCError as error:
        if state is None and spec is None:
            raise
        raise HTTPException(
            status_code=422,
            detail=(
                f"Temporal refused the filter ({error.message}): its search attributes are "
                "not registered on this namespace; run `llmmixer setup` once"
            ),
        ) from None
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


@api.post(
    "/workflows/{workflow_id}/rerun",
    status_code=201,
    response_model=Started,
    responses={
        409: {"model": Errors, "description": "the run is still open, or the new id exists"},
        422: {"model": Errors, "description": "the spec or a from_steps entry is invalid"},
    },
)
async def rerun(
    workflow_id: WorkflowId, handle: Run, body: RerunRequest, request: Request
) -> Started:
    """Start a closed run again (its spec, or an edited one), reusing every unchanged step.

    A step whose call is the one the source run made takes its output from
    the source's history and costs nothing; ``from_steps`` and everything
    after them run again.
    """
    spec = _spec_text(body.spec) if isinstance(body.spec, str) else body.spec
    mixer = _mixer(request)
    try:
        source = await read_source(mixer.temporal, handle.id)
        inputs = body.inputs
        if has_file_inputs(inputs, stored_too=True):
            inputs = await store_inputs(inputs, mixer.temporal.data_converter, read_paths=False)
        # As for POST /workflows: a large or hostile document is parsed in a thread.
        prepared, parsed, table = await anyio.to_thread.run_sync(
            functools.partial(
                prepare_rerun, source, spec=spec, inputs=inputs, from_steps=body.from_steps
            ),
            limiter=request.app.state.spec_limiter,
        )
        started = await mixer.start_prepared(
            prepared, parsed, workflow_id=body.workflow_id, reuse=table
        )
    except SpecError as error:
        raise HTTPException(
            status_code=422, detail=[str(issue) for issue in error.issues]
        ) from None
    except SourceOpen as error:
        raise HTTPException(status_code=409, detail=str(error)) from None
    except RerunError as error:
        raise HTTPException(status_code=422, detail=str(error)) from None
    except WorkflowAlreadyStartedError:
        raise _refuse_taken_id(body.workflow_id) from None
    return _started(started)


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


async def open_subscription(
    request: Request, handle: Run, start: Annotated[int, Depends(resume_offset)]
) -> AsyncIterator[Subscription]:
    """Opened before the response starts; closed once it ends or the client has gone."""
    streams: OpenStreams = request.app.state.streams
    subscription = Subscription(handle.events(start))
    streams.count += 1
    try:
        yield subscription
    finally:
        await subscription.close()
        streams.count -= 1


@api.get(
    "/workflows/{workflow_id}/events",
    # Returned as a response object (events.py says why); this only documents it.
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
    subscription: Annotated[Subscription, Depends(open_subscription)],
    request: Request,
) -> Response:
    """The run's events, live, from an offset; resumable with ``Last-Event-ID``."""
    return event_response(event_stream(subscription, keepalive_s=settings_of(request).keepalive_s))


# ---- schedules ------------------------------------------------------------------------------


@api.get("/schedules", response_model=ScheduleList)
async def list_schedules(request: Request) -> ScheduleList:
    """llmmixer's schedules (``llmmixer schedule list``); a new one may show a moment later."""
    found = await _mixer(request).list_schedules()
    return ScheduleList(
        schedules=[
            ScheduleSummary(
                schedule_id=schedule.name,
                spec=schedule.spec,
                cron=schedule.cron,
                next_run=schedule.next_runs[0] if schedule.next_runs else None,
                paused=schedule.paused,
                note=schedule.note,
            )
            for schedule in found
        ]
    )


@api.post(
    "/schedules/{schedule_id}/trigger",
    status_code=202,
    response_model=ScheduleTriggered,
    responses={404: {"model": Errors, "description": "no llmmixer schedule with this id"}},
)
async def trigger_schedule(
    schedule_id: Annotated[str, PathParam(description="the schedule's id")], request: Request
) -> ScheduleTriggered:
    """Start the schedule's run now, as if it were due (its overlap policy applies)."""
    mixer = _mixer(request)
    await _llmmixer_schedule(mixer, schedule_id, "triggers")
    try:
        await mixer.trigger_schedule(schedule_id)
    except ScheduleNotFound:
        raise HTTPException(status_code=404, detail=_no_schedule(schedule_id)) from None
    return ScheduleTriggered(
        schedule_id=schedule_id,
        message="triggered: the run starts now unless its overlap policy skips it",
    )


@api.post(
    "/schedules/{schedule_id}/pause",
    response_model=ScheduleChanged,
    responses={404: {"model": Errors, "description": "no llmmixer schedule with this id"}},
)
async def pause_schedule(
    schedule_id: Annotated[str, PathParam(description="the schedule's id")],
    request: Request,
    body: SchedulePauseBody | None = None,
) -> ScheduleChanged:
    """Start no runs until unpaused (``llmmixer schedule pause``); a run going on goes on."""
    return await _pause(request, schedule_id, True, body)


@api.post(
    "/schedules/{schedule_id}/unpause",
    response_model=ScheduleChanged,
    responses={404: {"model": Errors, "description": "no llmmixer schedule with this id"}},
)
async def unpause_schedule(
    schedule_id: Annotated[str, PathParam(description="the schedule's id")],
    request: Request,
    body: SchedulePauseBody | None = None,
) -> ScheduleChanged:
    """Start runs again when they are due (``llmmixer schedule unpause``)."""
    return await _pause(request, schedule_id, False, body)


async def _pause(
    request: Request, schedule_id: str, paused: bool, body: SchedulePauseBody | None
) -> ScheduleChanged:
    mixer = _mixer(request)
    verb = "pause" if paused else "unpause"
    await _llmmixer_schedule(mixer, schedule_id, f"{verb}s")
    note = body.note if body is not None and body.note else f"{verb}d through llmmixer serve"
    try:
        if paused:
            await mixer.pause_schedule(schedule_id, note=note)
        else:
            await mixer.unpause_schedule(schedule_id, note=note)
        found = await mixer.describe_schedule(schedule_id)
    except ScheduleNotFound:
        raise HTTPException(status_code=404, detail=_no_schedule(schedule_id)) from None
    return ScheduleChanged(
        schedule_id=schedule_id,
        paused=found.paused,
        note=found.note,
        message=(
            "paused: no run starts until it is unpaused"
            if found.paused
            else "unpaused: runs start again when they are due"
        ),
    )


async def _llmmixer_schedule(mixer: MixerClient, schedule_id: str, verb: str) -> None:
    """404 unless ``schedule_id`` is a schedule that starts llmmixer's workflow."""
    try:
        description = await mixer.temporal.get_schedule_handle(schedule_id).describe()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            raise HTTPException(status_code=404, detail=_no_schedule(schedule_id)) from None
        raise
    action = description.schedule.action
    # Another application's schedule in the namespace is never changed from here.
    if not (isinstance(action, ScheduleActionStartWorkflow) and action.workflow == WORKFLOW_NAME):
        raise HTTPException(
            status_code=404,
            detail=(
                f"{schedule_id!r} is not an llmmixer schedule (it starts another kind of "
                f"workflow): this API {verb} only llmmixer's; list them with GET /schedules"
            ),
        )


def _no_schedule(schedule_id: str) -> str:
    return f"no schedule with id {schedule_id!r}: list the schedules with GET /schedules"
