"""``llmmixer audit ID``: what happened in a run, rebuilt from its Temporal history alone.

Nothing here asks the workflow (no query) or the worker: the record is read
from the history events, so it can be made for a run whose workers are gone,
from the server or from files exported with
``temporal workflow show --workflow-id ID [--run-id RUN] -o json > run.json`` (``--history``).
A long run continues as new under the same workflow id; the audit follows
that chain (each run's start event names the run before it, its
continued-as-new event the run after it) and makes ONE record of every run,
listed in order under ``runs``. Where each part comes from::

    step prompt, provider, model,     ActivityTaskScheduled: the activity's input, i.e.
    parameters                        the LlmCall / CommandCall / AgentCall exactly as sent
    attempts: start, end, error       ActivityTaskStarted (attempt number, last_failure),
                                      ActivityTaskCompleted / Failed / TimedOut / Canceled
    output, usage, cost               ActivityTaskCompleted: the LlmReply / CommandResult
    interventions                     WorkflowExecutionSignaled, WorkflowExecutionUpdate-
                                      Accepted / -Completed (refused updates carry the reason);
                                      raise_budget and cancel requests at the top level
    checks                            the spec check (a local activity: MarkerRecorded) and
                                      each plan check (ActivityTaskScheduled / -Completed)
    step status, accepted signals     the result in WorkflowExecutionCompleted, when the
                                      run completed (it records which signals applied)
    forecast                          ``estimate_spec`` on the spec of the start event,
                                      with today's price table, next to the actual usage

Each event type has its handler in ``_HANDLERS``; an event, signal, update,
activity or marker the audit does not know is listed under ``unhandled``
(and as a warning), never dropped silently.

Temporal writes one ActivityTaskStarted event per activity, for its last
attempt, carrying the previous attempt's failure. So the last attempt of each
activity has its start and end times, the one before it its error, and earlier
ones only their existence (``"recorded": false``). Nothing is invented.

Payloads are decoded with the same data converter as clients and workers, so
outputs kept in external storage (``workers/storage.py``) come back whole and
encrypted payloads are read with ``LLMMIXER_PAYLOAD_KEY``. Command and agent
outputs were redacted before they reached history; a step's ``env`` is never
copied into the record.

The JSON document's keys (``workflow_id``, ``status``, ``steps`` with
``provider``, ``model``, ``prompt``, ``output``, ``usage``, ``cost_usd``,
``attempts``, ``interventions``) are kept; other keys are only ever added.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from temporalio.api.common.v1 import Payload, Payloads
from temporalio.api.enums.v1 import ContinueAsNewInitiator, EventType, WorkflowTaskFailedCause
from temporalio.api.failure.v1 import Failure
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowHistory
from temporalio.converter import DataConverter
from temporalio.service import RPCError, RPCStatusCode

from llmmixer.core.contracts import (
    AGENT_ACTIVITY,
    CHECK_PLAN_ACTIVITY,
    CHECK_SPEC_ACTIVITY,
    LLM_ACTIVITY,
    MCP_CALL_ACTIVITY,
    MCP_LIST_ACTIVITY,
    PTY_ACTIVITY,
    TOOL_COMMAND_ACTIVITY,
    AgentCall,
    ChatMessage,
    CheckIssue,
    CommandCall,
    CommandResult,
    LlmCall,
    LlmReply,
    McpCallRequest,
    McpListRequest,
    McpListResult,
    PlanCheck,
    PlanCheckResult,
    SpecCheckResult,
    ToolRunRequest,
    ToolRunResult,
    Usage,
)
from llmmixer.core.search import SEARCH_ATTRIBUTES_ACTIVITY
from llmmixer.core.validation import SpecError, validate_spec
from llmmixer.workflows.carry import Carried
from llmmixer.workflows.records import BudgetLimits, RunProgress
from llmmixer.workflows.reuse import REUSED_MEMO

__all__ = [
    "AuditError",
    "add_audit_parser",
    "audit_from_client",
    "audit_histories",
    "audit_history",
    "cmd_audit",
    "fetch_chain",
    "load_history",
    "render_markdown",
]

_INTERVENTIONS = ("retry", "skip", "override", "approve", "reject")
# Markdown is for reading; the JSON document always carries whole outputs.
_MD_TEXT_LIMIT = 4000


class AuditError(Exception):
    """The history cannot be read or decoded; the message says what to set or fix."""


# ---- reading history -------------------------------------------------------------


async def audit_from_client(
    client: Client, workflow_id: str, run_id: str | None = None
) -> dict[str, Any]:
    """Fetch the histories of the run's whole chain from the server and rebuild its record."""
    histories = await fetch_chain(client, workflow_id, run_id)
    return await audit_histories(histories, client.data_converter)


async def fetch_chain(
    client: Client, workflow_id: str, run_id: str | None = None
) -> list[WorkflowHistory]:
    """Every run of the chain that ``run_id`` (default: the latest run) belongs to, in order.

    A long run continues as new under the same workflow id; each run's history
    names the run before it and the run after it, so the chain is followed
    through history alone (list_workflows is eventually consistent, and a
    reused workflow id would mix unrelated runs into it).
    """
    chain = [await _fetch(client, workflow_id, run_id)]
    seen = {chain[0].run_id}
    while (previous := _links(chain[0])[0]) is not None and previous not in seen:
        seen.add(previous)
        try:
            chain.insert(0, await _fetch(client, workflow_id, previous))
        except AuditError:
            break  # past the namespace's retention: the record's warnings say so
    while (following := _links(chain[-1])[1]) is not None and following not in seen:
        seen.add(following)
        try:
            chain.append(await _fetch(client, workflow_id, following))
        except AuditError:
            break
    return chain


async def _fetch(client: Client, workflow_id: str, run_id: str | None) -> WorkflowHistory:
    try:
        return await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
    except RPCError as error:
        if error.status != RPCStatusCode.NOT_FOUND:
            raise
        which = f"run {run_id} of workflow {workflow_id}" if run_id else f"workflow {workflow_id}"
        raise AuditError(
            f"{which} is not on the server (a wrong id, or past the namespace's retention): "
            "check the id with `llmmixer list`, or audit an exported history with --history"
        ) from error


def load_history(path: str | Path, workflow_id: str) -> WorkflowHistory:
    """A history exported with ``temporal workflow show -o json``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        history = WorkflowHistory.from_json(workflow_id, text)
        _ = history.run_id  # a file without a start event is no run's history
        return history
    except (OSError, ValueError, RuntimeError) as error:
        raise AuditError(
            f"{path}: not a history exported with `temporal workflow show -o json`: {error}"
        ) from error


def _links(history: WorkflowHistory) -> tuple[str | None, str | None]:
    """(the run this one continued, the run that continued it), by continue-as-new only."""
    previous: str | None = None
    following: str | None = None
    if history.events and history.events[0].HasField("workflow_execution_started_event_attributes"):
        started = history.events[0].workflow_execution_started_event_attributes
        if (
            started.continued_execution_run_id
            and started.initiator == ContinueAsNewInitiator.CONTINUE_AS_NEW_INITIATOR_WORKFLOW
        ):
            previous = started.continued_execution_run_id
    if history.events and history.events[-1].HasField(
        "workflow_execution_continued_as_new_event_attributes"
    ):
        attrs = history.events[-1].workflow_execution_continued_as_new_event_attributes
        following = attrs.new_execution_run_id or None
    return previous, following


def _order_chain(histories: Sequence[WorkflowHistory]) -> list[WorkflowHistory]:
    """The histories as one chain of runs, first run first (files may come in any order)."""
    by_run = {history.run_id: history for history in histories}
    firsts = [h for h in histories if _links(h)[0] not in by_run]
    if len(firsts) != 1 or len(by_run) != len(histories):
        runs = ", ".join(history.run_id for history in histories)
        raise AuditError(
            f"the histories given ({runs}) are not the runs of one chain of continue-as-new: "
            "give one --history per run of the same chain, each run once"
        )
    chain = [firsts[0]]
    while (following := _links(chain[-1])[1]) in by_run and following is not None:
        chain.append(by_run.pop(following))
        if len(chain) > len(histories):
            break
    if len(chain) != len(histories):
        raise AuditError(
            "the histories given do not follow each other by continue-as-new: "
            "give one --history per run of the same chain"
        )
    return chain


# ---- rebuilding ------------------------------------------------------------------


@dataclass
class _Activity:
    step_id: str
    kind: str
    run_id: str
    scheduled: datetime | None
    call: LlmCall | CommandCall | AgentCall
    started: datetime | None = None
    attempt: int | None = None
    previous_error: str | None = None
    ended: datetime | None = None
    outcome: str = "running"
    error: str | None = None
    error_type: str | None = None
    reply: LlmReply | None = None
    command: CommandResult | None = None


@dataclass
class _ToolActivity:
    """A tool call of an llm step's loop (a command, an MCP call or listing, a child spec)."""

    step_id: str
    kind: str  # "command", "mcp", "mcp_list" or "spec"
    name: str
    run_id: str
    scheduled: datetime | None
    call_id: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    started: datetime | None = None
    attempt: int | None = None
    ended: datetime | None = None
    outcome: str = "running"
    error: str | None = None
    result: str | None = None
    is_error: bool | None = None
    workflow_id: str | None = None

    def document(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "call_id": self.call_id,
            "arguments": self.arguments,
            "scheduled": _iso(self.scheduled),
            "started": _iso(self.started),
            "ended": _iso(self.ended),
            "attempt": self.attempt,
            "outcome": self.outcome,
            "error": self.error,
            "result": self.result,
            "is_error": self.is_error,
            "child_workflow_id": self.workflow_id,
            "run_id": self.run_id,
        }


@dataclass
class _Check:
    """A check whose verdict history records: the spec's, or a decompose step's plan."""

    activity: str
    step_id: str | None
    run_id: str
    scheduled: datetime | None
    ended: datetime | None = None
    outcome: str = "running"
    issues: list[CheckIssue] = field(default_factory=list)
    planned: list[str] = field(default_factory=list)
    error: str | None = None

    def document(self) -> dict[str, Any]:
        return {
            "activity": self.activity,
            "step": self.step_id,
            "run_id": self.run_id,
            "scheduled": _iso(self.scheduled),
            "ended": _iso(self.ended),
            "outcome": self.outcome,
            "issues": [issue.model_dump() for issue in self.issues],
            "planned_steps": self.planned,
            "error": self.error,
        }


@dataclass
class _Step:
    step_id: str
    kind: str | None = None
    activities: list[_Activity] = field(default_factory=list)
    checks: list[_Check] = field(default_factory=list)
    tools: list[_ToolActivity] = field(default_factory=list)
    interventions: list[dict[str, Any]] = field(default_factory=list)
    # What changed the step, in history order: ("activity", _Activity) once it
    # closed, ("intervention", entry). Folded at the end, when it is known
    # which signals applied.
    timeline: list[tuple[str, Any]] = field(default_factory=list)
    status: str = "pending"
    output: str | None = None
    overridden: bool = False
    # A re-run's step that took its source run's output ("<run>/<step>").
    reused_from: str | None = None


@dataclass
class _Run:
    run_id: str
    status: str = "running"
    started: datetime | None = None
    ended: datetime | None = None
    events: int = 0

    def document(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "started": _iso(self.started),
            "ended": _iso(self.ended),
            "events": self.events,
        }


@dataclass
class _Rebuild:
    """What the events of every run of the chain, read in order, have said so far."""

    decoder: _Decoder
    workflow_id: str
    run: _Run
    runs: list[_Run] = field(default_factory=list)
    steps: dict[str, _Step] = field(default_factory=dict)
    # Event ids start again in each run: these are reset at every run's start.
    activities: dict[int, _Activity] = field(default_factory=dict)
    pending_checks: dict[int, _Check] = field(default_factory=dict)
    tool_activities: dict[int, _ToolActivity] = field(default_factory=dict)
    children: dict[int, _ToolActivity] = field(default_factory=dict)
    updates: dict[str, dict[str, Any]] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)
    # A re-run's source outputs (its start's reuse table), by step.
    reused_outputs: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    result: RunProgress | None = None
    interventions: list[dict[str, Any]] = field(default_factory=list)
    checks: list[_Check] = field(default_factory=list)
    unhandled: list[dict[str, Any]] = field(default_factory=list)
    task_failures: list[dict[str, Any]] = field(default_factory=list)

    def step(self, step_id: str) -> _Step:
        return self.steps.setdefault(step_id, _Step(step_id))

    def begin(self, run_id: str) -> None:
        self.run = _Run(run_id)
        self.runs.append(self.run)
        self.activities, self.pending_checks = {}, {}

    def end(self, status: str, when: datetime | None, error: str | None = None) -> None:
        self.run.status, self.run.ended = status, when
        self.error = error

    def not_understood(self, event: HistoryEvent, when: datetime | None, name: str = "") -> None:
        # Listed, never dropped: an audit that skipped what it cannot read
        # would look complete while missing part of the run.
        self.unhandled.append(
            {
                "run_id": self.run.run_id,
                "event_id": event.event_id,
                "event_type": _enum_name(EventType, event.event_type),
                "name": name or None,
                "time": _iso(when),
            }
        )


Handler = Callable[[_Rebuild, HistoryEvent, "datetime | None"], Awaitable[None]]


async def audit_history(history: WorkflowHistory, converter: DataConverter) -> dict[str, Any]:
    """The audit document of one run's history (see ``audit_histories`` for a chain)."""
    return await audit_histories([history], converter)


async def audit_histories(
    histories: Sequence[WorkflowHistory], converter: DataConverter
) -> dict[str, Any]:
    """The audit document of a chain of runs (continue-as-new), as one record.

    Steps, attempts and interventions of every run are merged in order; the
    status is the last run's.
    """
    if not histories:
        raise AuditError("no history to audit: give the workflow id of a run")
    chain = _order_chain(histories)
    rebuild = _Rebuild(_Decoder(converter), chain[0].workflow_id, _Run(chain[0].run_id))
    for history in chain:
        rebuild.begin(history.run_id)
        for event in history.events:
            rebuild.run.events += 1
            when = _time(event)
            handler = _HANDLERS.get(event.event_type)
            if handler is None:
                rebuild.not_understood(event, when)
            else:
                await handler(rebuild, event, when)
    return _document(rebuild, chain)


def _document(rebuild: _Rebuild, chain: list[WorkflowHistory]) -> dict[str, Any]:
    steps, result = rebuild.steps, rebuild.result
    _move_strays(rebuild)
    if result is not None:
        _confirm_signals(steps, result)
    for item in steps.values():
        _fold(item)
    if result is not None:
        _confirm_states(steps, result)
    documents = {step_id: _step_document(item) for step_id, item in steps.items()}
    total_in = sum(doc["usage"]["input_tokens"] for doc in documents.values())
    total_out = sum(doc["usage"]["output_tokens"] for doc in documents.values())
    costs = [doc["cost_usd"] for doc in documents.values()]
    warnings: list[str] = []
    before, _ = _links(chain[0])
    if before is not None:
        warnings.append(
            f"run {chain[0].run_id} continued run {before}, whose history is not included: "
            f"export it with `temporal workflow show --workflow-id {rebuild.workflow_id} "
            f"--run-id {before} -o json` and give it with another --history"
        )
    _, after = _links(chain[-1])
    if after is not None:
        warnings.append(
            f"run {chain[-1].run_id} continued as new as run {after}, whose history is not "
            f"included: export it with `temporal workflow show --workflow-id "
            f"{rebuild.workflow_id} --run-id {after} -o json` and give it with another --history"
        )
    if rebuild.unhandled:
        warnings.append(
            f"{len(rebuild.unhandled)} history event(s) this version of the audit does not "
            "understand are listed under `unhandled`; this record may miss what they did"
        )
    first, last = rebuild.runs[0], rebuild.runs[-1]
    return {
        "workflow_id": rebuild.workflow_id,
        "run_id": last.run_id,
        "runs": [run.run_id for run in rebuild.runs],
        "chain": [run.document() for run in rebuild.runs],
        "name": rebuild.spec.get("name"),
        "status": last.status,
        "started": _iso(first.started),
        "ended": _iso(last.ended),
        "error": rebuild.error,
        "dry_run": bool(rebuild.spec.get("dry_run", False)),
        "steps": documents,
        "interventions": rebuild.interventions,
        "checks": [check.document() for check in rebuild.checks],
        "workflow_task_failures": rebuild.task_failures,
        "unhandled": rebuild.unhandled,
        "warnings": warnings,
        "usage": {
            "input_tokens": total_in,
            "output_tokens": total_out,
            "cost_usd": round(sum(c for c in costs if c is not None), 8),
            # False when some model's price is unknown: the total is a lower bound.
            "cost_complete": all(c is not None for c in costs),
        },
        "forecast": _forecast(rebuild, documents),
    }


def _forecast(rebuild: _Rebuild, documents: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What ``llmmixer estimate`` forecasts for the run's spec, next to what it spent.

    Per step of the spec: a decompose step's sub-steps are counted in their
    planner's row, as the estimate counts them. The forecast uses the price
    table of today, not of the day the run ran.
    """
    from llmmixer.client.estimate import estimate_spec

    try:
        spec = validate_spec(rebuild.spec)
    except SpecError as error:
        return {"error": f"the run's spec cannot be estimated: {error}", "steps": {}}
    try:
        estimate = estimate_spec(spec)
    except Exception as error:  # a forecast must never cost the audit its record
        return {"error": f"no forecast ({type(error).__name__}: {error})", "steps": {}}
    parents = {
        planned: check.step_id
        for check in rebuild.checks
        if check.step_id is not None
        for planned in check.planned
    }

    def owner(step_id: str) -> str:
        seen = {step_id}
        while step_id in parents and parents[step_id] not in seen:
            step_id = parents[step_id]
            seen.add(step_id)
        return step_id

    actual_cost: dict[str, float | None] = {}
    actual_tokens: dict[str, int] = {}
    for step_id, doc in documents.items():
        row = owner(step_id)
        before = actual_cost.get(row, 0.0)
        cost = doc["cost_usd"]
        actual_cost[row] = None if before is None or cost is None else round(before + cost, 8)
        usage = doc["usage"]
        actual_tokens[row] = (
            actual_tokens.get(row, 0) + usage["input_tokens"] + usage["output_tokens"]
        )
    steps: dict[str, dict[str, Any]] = {}
    for item in estimate.steps:
        tokens = item.input_tokens + item.output_tokens
        steps[item.step] = {
            "cost_usd": _span(item.cost_usd, 8),
            "tokens": _span(tokens, 0),
            "actual_cost_usd": actual_cost.get(item.step, 0.0),
            "actual_tokens": actual_tokens.get(item.step, 0),
        }
    spec_steps = {item.step for item in estimate.steps}
    unplanned = sorted(row for row in actual_tokens if row not in spec_steps)
    total_cost = [actual_cost[row] for row in actual_cost]
    return {
        "steps": steps,
        "total": {
            "cost_usd": _span(estimate.cost_usd, 8),
            "tokens": _span(estimate.tokens, 0),
            "actual_cost_usd": None
            if any(cost is None for cost in total_cost)
            else round(sum(cost for cost in total_cost if cost is not None), 8),
            "actual_tokens": sum(actual_tokens.values()),
        },
        # Steps that ran but are no step of the spec (nor a decompose step's).
        "unforecast_steps": unplanned,
        "warnings": list(estimate.warnings),
        # A dry run spends nothing: its forecast is of running the spec for real.
        "dry_run": estimate.dry_run,
        "prices": "today's price table (`llmmixer prices`), not the run's day's",
    }


def _span(span: Any, digits: int) -> dict[str, float]:
    def rounded(value: float) -> float:
        return round(value, digits) if digits else int(value)

    return {
        "min": rounded(span.low),
        "expected": rounded(span.expected),
        "max": rounded(span.high),
    }


def _move_strays(rebuild: _Rebuild) -> None:
    """Interventions naming no step of the run are the run's, not a step's of their own.

    A signal cannot be refused to its sender, so history keeps one aimed at a
    step that never existed; listed as a step, it would look like part of the run.
    """
    planned = {step_id for check in rebuild.checks for step_id in check.planned}
    known = set(rebuild.result.steps) if rebuild.result is not None else set()
    for step_id, target in list(rebuild.steps.items()):
        if target.kind is None and not target.activities and step_id not in planned | known:
            for entry in target.interventions:
                if rebuild.result is not None and entry["accepted"] is None:
                    entry["accepted"] = False
                    entry["reason"] = f"the run has no step {step_id!r}"
            rebuild.interventions.extend(target.interventions)
            del rebuild.steps[step_id]
    rebuild.interventions.sort(key=lambda entry: entry["time"] or "")


# ---- one handler per history event type ------------------------------------------


async def _ignore(rebuild: _Rebuild, event: HistoryEvent, when: datetime | None) -> None:
    """Events that change nothing a person audits (workflow tasks, timers, search attributes)."""


async def _on_started(rebuild: _Rebuild, event: HistoryEvent, when: datetime | None) -> None:
    rebuild.run.started = when
    attrs = event.workflow_execution_started_event_attributes
    spec: dict[str, Any] = {}
    # Every run of a chain gets the same spec as its first argument.
    if attrs.input.payloads:
        decoded = await rebuild.decoder.value(attrs.input.payloads[0], dict)
        spec = decoded if isinstance(decoded, dict) else {}
    rebuild.spec = rebuild.spec or spec
    if len(attrs.input.payloads) > 2 and not rebuild.reused_outputs:
        # A re-run's source outputs: what its reused steps' outputs were.
        carried = await rebuild.decoder.value(attrs.input.payloads[2], Carried)
        if isinstance(carried, Carried) and carried.reuse is not None:
            rebuild.reused_outputs = {
                step_id: entry.output for step_id, entry in carried.reuse.steps.items()
            }
    for item in spec.get("steps") or []:
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            target = rebuild.step(item["id"])
            target.kind = target.kind or str(item.get("kind", "llm"))


async def _on_properties_modified(
    rebuild: _Rebuild, event: HistoryEvent, when: datetime | None
) -> None:
    """The memo entries a run writes (workflows/reuse.py): a step that took a
    source run's output says so here, the only trace a run without a result
    (failed, cancelled, terminated) keeps of it."""
    fields = event.workflow_properties_modified_event_attributes.upserted_memo.fields
    for key, payload in fields.items():
        if key.startswith(REUSED_MEMO):
            source = await rebuild.decoder.value(payload, str)
            step_id = key.removeprefix(REUSED_MEMO)
            output = rebuild.reused_outputs.get(step_id)
            rebuild.step(step_id).timeline.append(("reused", (str(source), output)))


async def _on_activity_scheduled(
    rebuild: _Rebuild, event: HistoryEvent, when: datetime | None
) -> None:
    attrs = event.activity_task_scheduled_event_attributes
    name = attrs.activity_type.name
    if name == CHECK_PLAN_ACTIVITY:
        step_id: str | None = None
        if attrs.input.payloads:
            request = await rebuild.decoder.value(attrs.input.payloads[0], PlanCheck)
            step_id = request.step_id
        check = _Check(CHECK_PLAN_ACTIVITY, step_id, rebuild.run.run_id, when)
        rebuild.pending_checks[event.event_id] = check
        rebuild.checks.append(check)
        if step_id is not None:
            rebuild.step(step_id).checks.append(check)
        return
    if name in _TOOL_ACTIVITIES and attrs.input.payloads:
        tool = await _tool_activity(rebuild, name, attrs.input.payloads[0], when)
        rebuild.tool_activities[event.event_id] = tool
        rebuild.step(tool.step_id).tools.append(tool)
        return
    kind_and_type = _STEP_ACTIVITIES.get(name)
    if kind_and_type is None or not attrs.input.payloads:
        rebuild.not_understood(event, when, name)
        return
    kind, call_type = kind_and_type
    call = await rebuild.decoder.value(attrs.input.payloads[0], call_type)
    activity = _Activity(call.step_id, kind, rebuild.run.run_id, when, call)
    rebuild.activities[event.event_id] = activity
    target = rebuild.step(activity.step_id)
    target.kind = target.kind or kind
    target.activities.append(activity)


async def _on_activity_started(
    rebuild: _Rebuild, event: HistoryEvent, when: datetime | None
) -> None:
    started = event.activity_task_started_event_attributes
    tool = rebuild.tool_activities.get(started.scheduled_event_id)
    if tool is not None:
        tool.started, tool.attempt = when, started.attempt or 1
        return
    activity = rebuild.activities.get(started.scheduled_event_id)
    if activity is not None:
        activity.started = when
        activity.attempt = started.attempt or 1
        if started.HasField("last_failure"):
            activity.previous_error = started.last_failure.message


async def _on_activity_completed(
    rebuild: _Rebuild, event: HistoryEvent, when: datetime | None
) -> None:
    completed = event.activity_task_completed_event_attributes
    check = rebuild.pending_checks.get(completed.scheduled_event_id)
    if check is not None:
        check.outcome, check.ended = "completed", when
        if completed.result.payloads:
            verdict = await rebuild.decoder.value(completed.result.payloads[0], PlanCheckResult)
            check.issues = list(verdict.issues)
            check.planned = [str(step.get("id")) for step in verdict.steps]
        return
    tool = rebuild.tool_activities.get(completed.scheduled_event_id)
    if tool is not None:
        tool.outcome, tool.ended = "completed", when
        if completed.result.payloads and tool.kind == "mcp_list":
            listed = await rebuild.decoder.value(completed.result.payloads[0], McpListResult)
            tool.result = ", ".join(info.name for info in listed.tools)
        elif completed.result.payloads:
            ran = await rebuild.decoder.value(completed.result.payloads[0], ToolRunResult)
            tool.result, tool.is_error = ran.content, ran.is_error
        return
    activity = rebuild.activities.get(completed.scheduled_event_id)
    if activity is not None:
        await _completed(rebuild.decoder, activity, completed.result, when)
        rebuild.step(activity.step_id).timeline.append(("activity", activity))


async def _on_activity_failed(
    rebuild: _Rebuild, event: HistoryEvent, when: datetime | None
) -> None:
    failed = event.activity_task_failed_event_attributes
    await _activity_ended(rebuild, failed.scheduled_event_id, failed.failure, "failed", when)


async def _on_activity_timed_out(
    rebuild: _Rebuild, event: HistoryEvent, when: datetime | None
) -> None:
    timed_out = event.activity_task_timed_out_event_attributes
    await _activity_ended(
        rebuild, timed_out.scheduled_event_id, timed_out.failure, "timed_out", when
    )


async def _on_activity_canceled(
    rebuild: _Rebuild, event: HistoryEvent, when: datetime | None
) -> None:
    scheduled_id = event.activity_task_canceled_event_attributes.scheduled_event_id
    await _activity_ended(rebuild, scheduled_id, None, "cancelled", when)


async def _activity_ended(
    rebuild: _Rebuild,
    scheduled_id: int,
    failure: Failure | None,
    outcome: str,
    when: datetime | None,
) -> None:
    check = rebuild.pending_checks.get(scheduled_id)
    if check is not None:
        check.outcome, check.ended = outcome, when
        check.error = (failure.message if failure is not None else None) or outcome
        return
    tool = rebuild.tool_activities.get(scheduled_id)
    if tool is not None:
        tool.outcome, tool.ended = outcome, when
        tool.error = (failure.message if failure is not None else None) or outcome
        return
    activity = rebuild.activities.get(scheduled_id)
    if activity is None:
        return  # an activity the audit does not know: its scheduling is listed
    if failure is None:
        activity.outcome, activity.ended, activity.error = outcome, when, outcome
    else:
        await _failed(rebuild.decoder, activity, failure, outcome, when)
    rebuild.step(activity.step_id).timeline.append(("activity", activity))


async def _tool_activity(
    rebuild: _Rebuild, name: str, payload: Payload, when: datetime | None
) -> _ToolActivity:
    kind, request_type = _TOOL_ACTIVITIES[name]
    request = await rebuild.decoder.value(payload, request_type)
    run_id = rebuild.run.run_id
    if isinstance(request, McpListRequest):
        return _ToolActivity(request.step_id, kind, request.server.name, run_id, when)
    call = request.call
    return _ToolActivity(
        request.step_id, kind, call.name, run_id, when, call_id=call.id, arguments=call.arguments
    )


async def _on_child_initiated(
    rebuild: _Rebuild, event: HistoryEvent, when: datetime | None
) -> None:
    attrs = event.start_child_workflow_execution_initiated_event_attributes
    # A spec tool's child is "<run>/<step>/<tool>-<suffix>" (workflows/steps/tools.py).
    parts = attrs.workflow_id.split("/")
    if len(parts) < 3:
        rebuild.not_understood(event, when, attrs.workflow_type.name)
        return
    step_id, tool_name = parts[-2], parts[-1].rsplit("-", 1)[0]
    tool = _ToolActivity(step_id, "spec", tool_name, rebuild.run.run_id, when)
    tool.workflow_id = attrs.workflow_id
    if attrs.input.payloads:
        body = await rebuild.decoder.value(attrs.input.payloads[0], dict)
        if isinstance(body, dict) and isinstance(body.get("inputs"), dict):
            tool.arguments = body["inputs"]
    rebuild.children[event.event_id] = tool
    rebuild.step(step_id).tools.append(tool)


async def _on_child_started(rebuild: _Rebuild, event: HistoryEvent, when: datetime | None) -> None:
    attrs = event.child_workflow_execution_started_event_attributes
    tool = rebuild.children.get(attrs.initiated_event_id)
    if tool is not None:
        tool.started = when


async def _on_child_completed(
    rebuild: _Rebuild, event: HistoryEvent, when: datetime | None
) -> None:
    attrs = event.child_workflow_execution_completed_event_attributes
    tool = rebuild.children.get(attrs.initiated_event_id)
    if tool is None:
        return
    tool.outcome, tool.ended = "completed", when
    if attrs.result.payloads:
        progress = await rebuild.decoder.value(attrs.result.payloads[0], RunProgress)
        tool.result, tool.is_error = progress.output or "", False


async def _on_child_ended(rebuild: _Rebuild, event: HistoryEvent, when: datetime | None) -> None:
    which = event.WhichOneof("attributes")
    attrs = getattr(event, which) if which else None
    tool = rebuild.children.get(getattr(attrs, "initiated_event_id", -1))
    if tool is None:
        return
    tool.outcome, tool.ended, tool.is_error = "failed", when, True
    failure = getattr(attrs, "failure", None)
    tool.error = (failure.message if failure is not None else None) or which


async def _on_marker(rebuild: _Rebuild, event: HistoryEvent, when: datetime | None) -> None:
    attrs = event.marker_recorded_event_attributes
    if attrs.marker_name == _PATCH_MARKER:
        return  # which code path a run took; nothing a person did or was sent
    if attrs.marker_name != _LOCAL_ACTIVITY_MARKER or "data" not in attrs.details:
        rebuild.not_understood(event, when, attrs.marker_name)
        return
    data = await rebuild.decoder.value(attrs.details["data"].payloads[0], dict)
    name = str(data.get("activity_type", "")) if isinstance(data, dict) else ""
    if name == SEARCH_ATTRIBUTES_ACTIVITY:
        return  # which search attributes the namespace has; nothing a person did or was sent
    if name != CHECK_SPEC_ACTIVITY:
        rebuild.not_understood(event, when, name or attrs.marker_name)
        return
    check = _Check(CHECK_SPEC_ACTIVITY, None, rebuild.run.run_id, None, ended=when)
    if attrs.HasField("failure"):
        check.outcome, check.error = "failed", attrs.failure.message or "failed"
    else:
        check.outcome = "completed"
        result = attrs.details.get("result")
        if result is not None and result.payloads:
            verdict = await rebuild.decoder.value(result.payloads[0], SpecCheckResult)
            check.issues = list(verdict.issues)
    rebuild.checks.append(check)


async def _on_signaled(rebuild: _Rebuild, event: HistoryEvent, when: datetime | None) -> None:
    signaled = event.workflow_execution_signaled_event_attributes
    name = signaled.signal_name
    if name.startswith(_STREAM_PREFIX):
        return  # the event stream's own traffic (activities publishing streamed text)
    if name not in _INTERVENTIONS:
        rebuild.not_understood(event, when, name)
        return
    argument = await _argument(rebuild.decoder, signaled.input)
    entry = _intervention(name, argument, when, "signal", rebuild.run.run_id)
    target = rebuild.step(str(argument.get("step", "")))
    target.interventions.append(entry)
    # Whether a signal applied is not in history; the run's result says, when
    # it completed; otherwise it counts as applied.
    target.timeline.append(("intervention", entry))


async def _on_update_accepted(
    rebuild: _Rebuild, event: HistoryEvent, when: datetime | None
) -> None:
    request = event.workflow_execution_update_accepted_event_attributes.accepted_request
    name = request.input.name
    if name.startswith(_STREAM_PREFIX):
        return  # readers polling the event stream
    action = name.removesuffix("_step")
    if name == _RAISE_BUDGET:
        argument = await _argument(rebuild.decoder, request.input.args)
        entry = _intervention(name, argument, when, "update", rebuild.run.run_id)
        rebuild.interventions.append(entry)
        if argument.get("step"):  # a decompose step's own budget
            rebuild.step(str(argument["step"])).interventions.append(entry)
    elif name.endswith("_step") and action in _INTERVENTIONS:
        argument = await _argument(rebuild.decoder, request.input.args)
        entry = _intervention(action, argument, when, "update", rebuild.run.run_id)
        rebuild.step(str(argument.get("step", ""))).interventions.append(entry)
    else:
        rebuild.not_understood(event, when, name)
        return
    rebuild.updates[request.meta.update_id] = entry


async def _on_update_completed(
    rebuild: _Rebuild, event: HistoryEvent, when: datetime | None
) -> None:
    done = event.workflow_execution_update_completed_event_attributes
    entry = rebuild.updates.get(done.meta.update_id)
    if entry is None:
        return  # stream polls, or an update listed as unhandled when accepted
    if done.outcome.HasField("failure"):
        entry["accepted"], entry["reason"] = False, done.outcome.failure.message
        return
    entry["accepted"] = True
    if entry["type"] == _RAISE_BUDGET:
        if done.outcome.success.payloads:
            limits = await rebuild.decoder.value(done.outcome.success.payloads[0], BudgetLimits)
            entry["result"] = limits.model_dump()
        return
    rebuild.step(str(entry["argument"].get("step", ""))).timeline.append(("intervention", entry))


async def _on_cancel_requested(
    rebuild: _Rebuild, event: HistoryEvent, when: datetime | None
) -> None:
    cause = event.workflow_execution_cancel_requested_event_attributes.cause
    argument = {"reason": cause} if cause else {}
    entry = _intervention("cancel", argument, when, "cancel", rebuild.run.run_id)
    entry["accepted"] = True
    rebuild.interventions.append(entry)


async def _on_paused(rebuild: _Rebuild, event: HistoryEvent, when: datetime | None) -> None:
    action = "pause" if event.HasField("workflow_execution_paused_event_attributes") else "unpause"
    entry = _intervention(action, {}, when, "operator", rebuild.run.run_id)
    entry["accepted"] = True
    rebuild.interventions.append(entry)


async def _on_task_failed(rebuild: _Rebuild, event: HistoryEvent, when: datetime | None) -> None:
    # A workflow task that failed (a bug, non-determinism after a deploy) is
    # retried by Temporal; the run went on or is stuck, either way it matters.
    attrs = event.workflow_task_failed_event_attributes
    rebuild.task_failures.append(
        {
            "run_id": rebuild.run.run_id,
            "time": _iso(when),
            "cause": _enum_name(WorkflowTaskFailedCause, attrs.cause),
            "message": attrs.failure.message,
        }
    )


async def _on_run_completed(rebuild: _Rebuild, event: HistoryEvent, when: datetime | None) -> None:
    rebuild.end("completed", when)
    completed = event.workflow_execution_completed_event_attributes
    if completed.result.payloads:
        value = await rebuild.decoder.value(completed.result.payloads[0], RunProgress)
        rebuild.result = value if isinstance(value, RunProgress) else None


async def _on_run_failed(rebuild: _Rebuild, event: HistoryEvent, when: datetime | None) -> None:
    rebuild.end("failed", when, event.workflow_execution_failed_event_attributes.failure.message)


async def _on_run_canceled(rebuild: _Rebuild, event: HistoryEvent, when: datetime | None) -> None:
    rebuild.end("cancelled", when)


async def _on_run_terminated(rebuild: _Rebuild, event: HistoryEvent, when: datetime | None) -> None:
    reason = event.workflow_execution_terminated_event_attributes.reason
    rebuild.end("failed", when, f"terminated: {reason or 'no reason given'}")


async def _on_run_timed_out(rebuild: _Rebuild, event: HistoryEvent, when: datetime | None) -> None:
    rebuild.end("failed", when, "the run timed out (workflow execution timeout)")


async def _on_continued_as_new(
    rebuild: _Rebuild, event: HistoryEvent, when: datetime | None
) -> None:
    rebuild.end("continued_as_new", when)


_E = EventType
_HANDLERS: Mapping[EventType.ValueType, Handler] = {
    _E.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED: _on_started,
    _E.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED: _on_activity_scheduled,
    _E.EVENT_TYPE_ACTIVITY_TASK_STARTED: _on_activity_started,
    _E.EVENT_TYPE_ACTIVITY_TASK_COMPLETED: _on_activity_completed,
    _E.EVENT_TYPE_ACTIVITY_TASK_FAILED: _on_activity_failed,
    _E.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT: _on_activity_timed_out,
    _E.EVENT_TYPE_ACTIVITY_TASK_CANCELED: _on_activity_canceled,
    _E.EVENT_TYPE_MARKER_RECORDED: _on_marker,
    _E.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED: _on_child_initiated,
    _E.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED: _on_child_started,
    _E.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED: _on_child_completed,
    _E.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_FAILED: _on_child_ended,
    _E.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_CANCELED: _on_child_ended,
    _E.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TIMED_OUT: _on_child_ended,
    _E.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TERMINATED: _on_child_ended,
    _E.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_FAILED: _on_child_ended,
    _E.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED: _on_signaled,
    _E.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED: _on_update_accepted,
    _E.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED: _on_update_completed,
    _E.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED: _on_cancel_requested,
    _E.EVENT_TYPE_WORKFLOW_EXECUTION_PAUSED: _on_paused,
    _E.EVENT_TYPE_WORKFLOW_EXECUTION_UNPAUSED: _on_paused,
    _E.EVENT_TYPE_WORKFLOW_TASK_FAILED: _on_task_failed,
    _E.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED: _on_run_completed,
    _E.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED: _on_run_failed,
    _E.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED: _on_run_canceled,
    _E.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED: _on_run_terminated,
    _E.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT: _on_run_timed_out,
    _E.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW: _on_continued_as_new,
    # Known, and nothing in them a person audits.
    _E.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED: _ignore,
    _E.EVENT_TYPE_WORKFLOW_TASK_STARTED: _ignore,
    _E.EVENT_TYPE_WORKFLOW_TASK_COMPLETED: _ignore,
    _E.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT: _ignore,
    _E.EVENT_TYPE_TIMER_STARTED: _ignore,
    _E.EVENT_TYPE_TIMER_FIRED: _ignore,
    _E.EVENT_TYPE_TIMER_CANCELED: _ignore,
    _E.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED: _ignore,
    _E.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES: _ignore,
    _E.EVENT_TYPE_WORKFLOW_PROPERTIES_MODIFIED: _on_properties_modified,
    _E.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ADMITTED: _ignore,
}

# Activities that run a step, with the type of their input.
_STEP_ACTIVITIES: Mapping[str, tuple[str, type[LlmCall] | type[CommandCall] | type[AgentCall]]] = {
    LLM_ACTIVITY: ("llm", LlmCall),
    PTY_ACTIVITY: ("pty", CommandCall),
    AGENT_ACTIVITY: ("agent", AgentCall),
}
# Tool calls of an llm step's loop (workflows/steps/tools.py), with their input's type.
_TOOL_ACTIVITIES: Mapping[
    str, tuple[str, type[ToolRunRequest | McpCallRequest | McpListRequest]]
] = {
    TOOL_COMMAND_ACTIVITY: ("command", ToolRunRequest),
    MCP_CALL_ACTIVITY: ("mcp", McpCallRequest),
    MCP_LIST_ACTIVITY: ("mcp_list", McpListRequest),
}
_PATCH_MARKER = "core_patch"
_LOCAL_ACTIVITY_MARKER = "core_local_activity"
_STREAM_PREFIX = "__temporal_workflow_stream_"
_RAISE_BUDGET = "raise_budget"


class _Decoder:
    def __init__(self, converter: DataConverter) -> None:
        self._converter = converter

    async def value(self, payload: Payload, type_hint: type) -> Any:
        try:
            [value] = await self._converter.decode([payload], [type_hint])
        except Exception as error:
            raise AuditError(
                f"cannot decode a payload of this history ({type(error).__name__}: {error}); "
                "audit with the same LLMMIXER_PAYLOAD_* settings (store, directory or bucket, "
                "key) as the workers that ran it"
            ) from error
        return value


async def _completed(
    decoder: _Decoder, activity: _Activity, result: Payloads, when: datetime | None
) -> None:
    activity.outcome, activity.ended = "completed", when
    if not result.payloads:
        return
    if activity.kind == "llm":
        activity.reply = await decoder.value(result.payloads[0], LlmReply)
        activity.attempt = activity.attempt or activity.reply.attempt
    else:
        activity.command = await decoder.value(result.payloads[0], CommandResult)
        activity.attempt = activity.attempt or activity.command.attempt


async def _failed(
    decoder: _Decoder, activity: _Activity, failure: Failure, outcome: str, when: datetime | None
) -> None:
    activity.outcome, activity.ended = outcome, when
    activity.error = failure.message or outcome
    if failure.HasField("application_failure_info"):
        info = failure.application_failure_info
        activity.error_type = info.type or None
        if info.details.payloads:
            details = await decoder.value(info.details.payloads[0], dict)
            if isinstance(details, dict) and isinstance(details.get("attempt"), int):
                activity.attempt = activity.attempt or details["attempt"]
    elif failure.HasField("timeout_failure_info"):
        activity.error_type = "Timeout"


async def _argument(decoder: _Decoder, payloads: Payloads) -> dict[str, Any]:
    if not payloads.payloads:
        return {}
    value = await decoder.value(payloads.payloads[0], dict)
    if not isinstance(value, dict):
        return {}
    # The same shape the workflow records: fields that were not given are left out.
    return {key: item for key, item in value.items() if item is not None}


def _intervention(
    action: str, argument: dict[str, Any], when: datetime | None, via: str, run_id: str
) -> dict[str, Any]:
    return {
        "type": action,
        "argument": argument,
        "time": _iso(when),
        "via": via,
        # None until the workflow's answer (an update's completion, a completed
        # run's record) says whether it applied.
        "accepted": None,
        "reason": None,
        "run_id": run_id,
    }


def _fold(target: _Step) -> None:
    """The step's status and output from its timeline (refused interventions skipped)."""
    if any(activity.outcome == "running" for activity in target.activities):
        target.status = "running"
    for what, item in target.timeline:
        if what == "reused":
            target.status, (target.reused_from, output) = "completed", item
            target.output = output if output is not None else target.output
            continue
        if what == "activity":
            activity: _Activity = item
            if activity.outcome != "completed":
                target.status = "failed"
                continue
            target.status, target.overridden = "completed", False
            if activity.reply is not None:
                target.output = activity.reply.text
            elif activity.command is not None:
                target.output = activity.command.output
            continue
        entry: dict[str, Any] = item
        if entry["accepted"] is False:
            continue
        action, argument = entry["type"], entry["argument"]
        if action == "override":
            target.status, target.overridden = "completed", True
            target.output = str(argument.get("output") or "")
        elif action == "skip":
            target.status, target.output = "skipped", ""
        elif action == "approve" and target.kind == "approval":
            target.status = "completed"
            target.output = argument.get("comment") or "approved"
        elif action == "reject" and target.kind == "approval":
            target.status = "failed"


def _confirm_signals(steps: dict[str, _Step], result: RunProgress) -> None:
    """A completed run's own record says which signals applied, and why not."""
    for step_id, record in result.steps.items():
        target = steps.get(step_id)
        if target is None:
            continue
        recorded = list(record.interventions)
        for entry in target.interventions:
            match = next(
                (
                    item
                    for item in recorded
                    if item.type == entry["type"] and item.argument == entry["argument"]
                ),
                None,
            )
            if match is None:
                continue
            recorded.remove(match)
            if entry["via"] == "signal":
                entry["accepted"], entry["reason"] = match.accepted, match.reason


def _confirm_states(steps: dict[str, _Step], result: RunProgress) -> None:
    # States a history cannot show alone (a step that waited for a person, a
    # step that never started) come from the completed run's record.
    for step_id, record in result.steps.items():
        target = steps.setdefault(step_id, _Step(step_id, kind=record.kind))
        target.status = record.status.value
        if target.output is None and record.output is not None:
            target.output = record.output
        target.reused_from = record.reused_from


def _step_document(item: _Step) -> dict[str, Any]:
    activities = item.activities
    answered = [a for a in activities if a.reply is not None]
    last = activities[-1] if activities else None
    final = answered[-1] if answered else last
    # Every field of Usage (cache and reasoning tokens included), as the step record has it.
    usage = sum((a.reply.usage for a in answered if a.reply), Usage())
    cost: float | None = 0.0
    for activity in answered:
        assert activity.reply is not None
        cost = (
            None
            if cost is None or activity.reply.cost_usd is None
            else round(cost + activity.reply.cost_usd, 8)
        )
    doc: dict[str, Any] = {
        "kind": item.kind or (last.kind if last else None),
        "status": item.status,
        "provider": None,
        "model": None,
        "prompt": None,
        "output": item.output,
        "overridden": item.overridden,
        "usage": usage.model_dump(),
        "cost_usd": cost,
        "attempts": [entry for activity in activities for entry in _attempts(activity)],
        "interventions": item.interventions,
    }
    if item.reused_from is not None:
        doc["reused_from"] = item.reused_from
    if item.checks:
        doc["checks"] = [check.document() for check in item.checks]
    if item.tools:
        doc["tool_calls"] = [tool.document() for tool in item.tools]
    if final is not None and isinstance(final.call, LlmCall):
        call = final.call
        reply = final.reply
        doc["provider"] = reply.provider if reply else call.provider
        doc["model"] = reply.model if reply else call.model
        doc["response_model"] = reply.response_model if reply else None
        users = [message for message in call.messages if message.role == "user"]
        doc["prompt"] = (users or call.messages)[-1].content if call.messages else None
        doc["system"] = call.system
        doc["messages"] = [message.model_dump() for message in call.messages]
        if call.tools or item.tools:
            # A tool loop: the last turn was sent every turn before it, and its
            # reply ends the conversation.
            conversation = list(call.messages)
            if reply is not None:
                conversation.append(ChatMessage.tool_request(reply.text, reply.tool_calls))
            doc["conversation"] = [
                message.model_dump(exclude_defaults=True) for message in conversation
            ]
            doc["tools_offered"] = [tool.name for tool in call.tools]
        doc["parameters"] = call.model_dump(
            include={
                "max_tokens",
                "temperature",
                "top_p",
                "stop",
                "response_format",
                "json_schema",
                "api",
                "base_url",
                "provider_options",
                "timeout_s",
            }
        )
        doc["dry_run"] = bool(reply.dry_run) if reply else call.dry_run
        doc["finish_reason"] = reply.finish_reason if reply else None
    elif final is not None and isinstance(final.call, AgentCall):
        agent = final.call
        doc["agent"] = agent.agent
        doc["prompt"] = agent.prompt
        # Not its env: values there may be secrets the spec passed to the agent.
        doc["parameters"] = agent.model_dump(
            include={"agent", "args", "cwd", "worktree", "timeout_s", "max_output_bytes"}
        )
        if final.command is not None:
            doc["exit_code"] = final.command.exit_code
            doc["mode"] = final.command.mode
            doc["diff"] = final.command.diff
    elif final is not None and isinstance(final.call, CommandCall):
        command = final.call
        doc["prompt"] = " ".join(command.argv)
        doc["parameters"] = command.model_dump(
            include={"argv", "cwd", "timeout_s", "success_codes", "max_output_bytes"}
        )
        if final.command is not None:
            doc["exit_code"] = final.command.exit_code
            doc["mode"] = final.command.mode
    return doc


def _attempts(activity: _Activity) -> list[dict[str, Any]]:
    """One entry per execution of this activity (Temporal retries included)."""
    call = activity.call
    provider = call.provider if isinstance(call, LlmCall) else None
    model = call.model if isinstance(call, LlmCall) else None
    last = activity.attempt or 1
    entries: list[dict[str, Any]] = []
    for number in range(1, last + 1):
        is_last = number == last
        entries.append(
            {
                "provider": provider,
                "model": model,
                "attempt": number,
                "scheduled": _iso(activity.scheduled),
                "started": _iso(activity.started) if is_last else None,
                "ended": _iso(activity.ended) if is_last else None,
                "outcome": activity.outcome if is_last else "failed",
                "error": activity.error
                if is_last
                else (activity.previous_error if number == last - 1 else None),
                "error_type": activity.error_type if is_last else None,
                # Only the last attempt's times (and the one before's error) are
                # written to Temporal history; see the module docstring.
                "recorded": is_last or number == last - 1,
                "run_id": activity.run_id,
            }
        )
    return entries


def _enum_name(enum: Any, value: int) -> str:
    # A newer server may send values this SDK's enums do not have yet.
    try:
        return str(enum.Name(value))
    except ValueError:
        return f"unknown ({int(value)})"


def _time(event: HistoryEvent) -> datetime | None:
    if not event.HasField("event_time"):
        return None
    return event.event_time.ToDatetime(tzinfo=UTC)


def _iso(when: datetime | None) -> str | None:
    return when.isoformat().replace("+00:00", "Z") if when else None


# ---- markdown --------------------------------------------------------------------


def render_markdown(document: dict[str, Any]) -> str:
    """A readable report of the audit document (outputs shortened; JSON has them whole)."""
    lines = [
        f"# Audit of {document['workflow_id']}",
        "",
        f"- run: `{document['run_id']}`" + (f" ({document['name']})" if document["name"] else ""),
        f"- status: **{document['status']}**",
        f"- started: {document['started']} · ended: {document['ended'] or '—'}",
    ]
    usage = document["usage"]
    cost = f"${usage['cost_usd']:.6f}" + ("" if usage["cost_complete"] else " (lower bound)")
    lines.append(
        f"- usage: {usage['input_tokens']} input / {usage['output_tokens']} output tokens, {cost}"
    )
    if len(document["runs"]) > 1:
        runs = ", ".join(f"`{run_id}`" for run_id in document["runs"])
        lines.append(f"- runs (continued as new, in order): {runs}")
    if document["error"]:
        lines.append(f"- error: {document['error']}")
    for warning in document["warnings"]:
        lines.append(f"- **warning**: {warning}")
    for event in document["unhandled"]:
        name = f" `{event['name']}`" if event["name"] else ""
        lines.append(
            f"- **not understood**: {event['event_type']}{name} "
            f"(run `{event['run_id']}`, event {event['event_id']}, {event['time']})"
        )
    for failure in document["workflow_task_failures"]:
        lines.append(
            f"- workflow task failed at {failure['time']}: {failure['cause']}: {failure['message']}"
        )
    for entry in document["interventions"]:
        lines.append(f"- {_intervention_line(entry)}")
    for check in document["checks"]:
        lines.append(f"- {_check_line(check)}")
    lines += ["", "| step | kind | status | provider/model | attempts | cost |", "|---" * 6 + "|"]
    for step_id, step in document["steps"].items():
        model = f"{step['provider']}/{step['model']}" if step.get("provider") else "—"
        step_cost = "unknown" if step["cost_usd"] is None else f"${step['cost_usd']:.6f}"
        lines.append(
            f"| {step_id} | {step['kind']} | {step['status']} | {model} "
            f"| {len(step['attempts'])} | {step_cost} |"
        )
    lines += _forecast_lines(document.get("forecast"))
    for step_id, step in document["steps"].items():
        lines += ["", f"## {step_id}", ""]
        if step.get("reused_from"):
            lines += [f"Reused from `{step['reused_from']}`: nothing ran, nothing was paid.", ""]
        if step.get("prompt") is not None:
            lines += ["Prompt (as sent):", "", *_fenced(step["prompt"]), ""]
        if step.get("conversation"):
            lines += ["Conversation:", "", *_conversation_lines(step["conversation"]), ""]
        for tool in step.get("tool_calls", []):
            lines.append(f"- {_tool_line(tool)}")
        if step.get("tool_calls"):
            lines.append("")
        if step["attempts"]:
            lines.append("Attempts:")
            lines.append("")
            for attempt in step["attempts"]:
                who = f"{attempt['provider']}/{attempt['model']} " if attempt["provider"] else ""
                when = (
                    f"{attempt['started']} → {attempt['ended']}"
                    if attempt["started"]
                    else "times not in history"
                )
                error = f" — {attempt['error']}" if attempt["error"] else ""
                lines.append(
                    f"- {who}attempt {attempt['attempt']}: {attempt['outcome']} ({when}){error}"
                )
            lines.append("")
        for entry in step["interventions"]:
            lines.append(f"- {_intervention_line(entry)}")
        for check in step.get("checks", []):
            lines.append(f"- {_check_line(check)}")
        if step["output"] is not None:
            lines += ["", "Output:", "", *_fenced(step["output"])]
    return "\n".join(lines) + "\n"


def _conversation_lines(conversation: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for message in conversation:
        role = message.get("role", "?")
        if role == "tool":
            error = " (error)" if message.get("is_error") else ""
            lines.append(f"**tool `{message.get('tool_name')}`**{error}:")
        else:
            lines.append(f"**{role}**:")
        if message.get("content"):
            lines += ["", *_fenced(str(message["content"]))]
        for call in message.get("tool_calls", []):
            arguments = json.dumps(call.get("arguments", {}), ensure_ascii=False)
            lines.append(f"- calls `{call.get('name')}` {arguments}")
        lines.append("")
    return lines


def _tool_line(tool: dict[str, Any]) -> str:
    arguments = json.dumps(tool["arguments"], ensure_ascii=False)
    size = f", result {len(tool['result'])} chars" if tool["result"] is not None else ""
    error = f" — {tool['error']}" if tool["error"] else ""
    return f"tool {tool['kind']} `{tool['name']}` {arguments}: {tool['outcome']}{size}{error}"


def _forecast_lines(forecast: dict[str, Any] | None) -> list[str]:
    """The forecast (``llmmixer estimate``) next to the actual cost and tokens."""
    if not forecast:
        return []
    lines = ["", "## Forecast against actual", ""]
    if forecast.get("error"):
        return [*lines, forecast["error"]]
    lines += [
        "| step | forecast min | expected | max | actual | forecast tokens | actual tokens |",
        "|---" * 7 + "|",
    ]
    rows = [*forecast["steps"].items(), ("**total**", forecast["total"])]
    for step_id, row in rows:
        cost, tokens = row["cost_usd"], row["tokens"]
        actual = row["actual_cost_usd"]
        shown = "unknown" if actual is None else f"${actual:.6f}"
        outside = actual is not None and not cost["min"] <= actual <= cost["max"]
        if outside and not forecast["dry_run"]:
            shown += " (outside)"
        lines.append(
            f"| {step_id} | ${cost['min']:.6f} | ${cost['expected']:.6f} | ${cost['max']:.6f} "
            f"| {shown} | {tokens['min']}-{tokens['max']} | {row['actual_tokens']} |"
        )
    lines.append("")
    lines.append(f"Prices: {forecast['prices']}.")
    if forecast["dry_run"]:
        lines.append("A dry run: the forecast is of running the spec for real; nothing was spent.")
    if forecast["unforecast_steps"]:
        lines.append(
            "Not forecast (no step of the spec): " + ", ".join(forecast["unforecast_steps"])
        )
    return lines


def _intervention_line(entry: dict[str, Any]) -> str:
    verdict = {True: "applied", False: "refused", None: "sent"}[entry["accepted"]]
    reason = f": {entry['reason']}" if entry["reason"] else ""
    argument = json.dumps(entry["argument"], ensure_ascii=False)
    return f"{entry['time']} {entry['type']} via {entry['via']} {argument} ({verdict}{reason})"


def _check_line(check: dict[str, Any]) -> str:
    where = f"plan of {check['step']}" if check["step"] else "spec"
    if check["outcome"] != "completed":
        verdict = f"{check['outcome']}: {check['error']}"
    elif check["issues"]:
        verdict = "; ".join(
            f"step {i['step']}: {i['field']}: {i['message']}" for i in check["issues"]
        )
    else:
        verdict = "passed"
    return f"{check['ended'] or '—'} check of the {where}: {verdict}"


def _fenced(text: str) -> Sequence[str]:
    if len(text) > _MD_TEXT_LIMIT:
        cut = len(text) - _MD_TEXT_LIMIT
        text = text[:_MD_TEXT_LIMIT] + f"\n[… {cut} more characters: see --format json]"
    return ["```text", text.replace("```", "` ` `"), "```"]


# ---- the command -----------------------------------------------------------------


def add_audit_parser(sub: Any) -> None:
    """``llmmixer audit ID [--format json|md] [--history FILE ...] [--run-id RUN]``."""
    audit = sub.add_parser("audit", help="a run's full record, rebuilt from its Temporal history")
    audit.add_argument("id", help="workflow id")
    audit.add_argument("--format", choices=("json", "md"), default="json")
    audit.add_argument(
        "--history",
        metavar="FILE",
        action="append",
        default=None,
        help="read a history exported with `temporal workflow show -o json` (no server "
        "needed); give it once per run of a run that continued as new",
    )
    audit.add_argument(
        "--run-id",
        default=None,
        help="a run other than the latest: the audit covers every run of its chain",
    )


async def cmd_audit(args: Any) -> int:
    from llmmixer.client.mixer import MixerClient
    from llmmixer.runtime.connection import data_converter

    try:
        if args.history:
            histories = [load_history(path, args.id) for path in args.history]
            document = await audit_histories(histories, data_converter())
        else:
            mixer = await MixerClient.connect()
            document = await audit_from_client(mixer.temporal, args.id, args.run_id)
    except AuditError as error:
        print(f"audit {args.id}: {error}", file=sys.stderr)
        return 1
    if args.format == "md":
        sys.stdout.write(render_markdown(document))
    else:
        sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return 0
