"""``llmmixer audit ID``: what happened in a run, rebuilt from its Temporal history alone.

Nothing here asks the workflow (no query) or the worker: the record is read
from the history events, so it can be made for a run whose workers are gone,
from the server or from a file exported with
``temporal workflow show --workflow-id ID -o json > run.json`` (``--history``).
Where each part comes from::

    step prompt, provider, model,     ActivityTaskScheduled: the activity's input, i.e.
    parameters                        the LlmCall / CommandCall exactly as sent
    attempts: start, end, error       ActivityTaskStarted (attempt number, last_failure),
                                      ActivityTaskCompleted / Failed / TimedOut / Canceled
    output, usage, cost               ActivityTaskCompleted: the LlmReply / CommandResult
    interventions                     WorkflowExecutionSignaled, WorkflowExecutionUpdate-
                                      Accepted / -Completed (refused updates carry the reason)
    step status, accepted signals     the result in WorkflowExecutionCompleted, when the
                                      run completed (it records which signals applied)

Temporal writes one ActivityTaskStarted event per activity, for its last
attempt, carrying the previous attempt's failure. So the last attempt of each
activity has its start and end times, the one before it its error, and earlier
ones only their existence (``"recorded": false``). Nothing is invented.

Payloads are decoded with the same data converter as clients and workers, so
outputs kept in external storage (``workers/storage.py``) come back whole and
encrypted payloads are read with ``LLMMIXER_PAYLOAD_KEY``.

The JSON document is CONTRACT section 8's shape; fields beyond it are extra.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from temporalio.api.common.v1 import Payload, Payloads
from temporalio.api.enums.v1 import EventType
from temporalio.api.failure.v1 import Failure
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowHistory
from temporalio.converter import DataConverter

from llmmixer.activities.contracts import (
    LLM_ACTIVITY,
    PTY_ACTIVITY,
    CommandCall,
    CommandResult,
    LlmCall,
    LlmReply,
)
from llmmixer.workflows.records import RunProgress

__all__ = [
    "AuditError",
    "add_audit_parser",
    "audit_from_client",
    "audit_history",
    "cmd_audit",
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
    """Fetch the run's history from the server and rebuild its record."""
    history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
    return await audit_history(history, client.data_converter)


def load_history(path: str | Path, workflow_id: str) -> WorkflowHistory:
    """A history exported with ``temporal workflow show -o json``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        return WorkflowHistory.from_json(workflow_id, text)
    except (OSError, ValueError) as error:
        raise AuditError(
            f"{path}: not a history exported with `temporal workflow show -o json`: {error}"
        ) from error


# ---- rebuilding ------------------------------------------------------------------


@dataclass
class _Activity:
    step_id: str
    kind: str
    scheduled: datetime | None
    call: LlmCall | CommandCall
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
class _Step:
    step_id: str
    kind: str | None = None
    activities: list[_Activity] = field(default_factory=list)
    interventions: list[dict[str, Any]] = field(default_factory=list)
    # What changed the step, in history order: ("activity", _Activity) once it
    # closed, ("intervention", entry). Folded at the end, when it is known
    # which signals applied.
    timeline: list[tuple[str, Any]] = field(default_factory=list)
    status: str = "pending"
    output: str | None = None
    overridden: bool = False


async def audit_history(history: WorkflowHistory, converter: DataConverter) -> dict[str, Any]:
    """The audit document (CONTRACT 8) of one run's history."""
    decoder = _Decoder(converter)
    steps: dict[str, _Step] = {}
    by_scheduled_id: dict[int, _Activity] = {}
    updates: dict[str, dict[str, Any]] = {}
    spec: dict[str, Any] = {}
    status = "running"
    started_at: datetime | None = None
    ended_at: datetime | None = None
    error: str | None = None
    result: RunProgress | None = None

    def step(step_id: str) -> _Step:
        return steps.setdefault(step_id, _Step(step_id))

    for event in history.events:
        kind = event.event_type
        when = _time(event)
        if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            started_at = when
            attrs = event.workflow_execution_started_event_attributes
            if attrs.input.payloads:
                decoded = await decoder.value(attrs.input.payloads[0], dict)
                spec = decoded if isinstance(decoded, dict) else {}
            for item in spec.get("steps") or []:
                if isinstance(item, dict) and isinstance(item.get("id"), str):
                    step(item["id"]).kind = str(item.get("kind", "llm"))
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled = event.activity_task_scheduled_event_attributes
            activity = await _scheduled(decoder, scheduled.activity_type.name, scheduled, when)
            if activity is not None:
                by_scheduled_id[event.event_id] = activity
                target = step(activity.step_id)
                target.kind = target.kind or activity.kind
                target.activities.append(activity)
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started = event.activity_task_started_event_attributes
            activity_or_none = by_scheduled_id.get(started.scheduled_event_id)
            if activity_or_none is not None:
                activity_or_none.started = when
                activity_or_none.attempt = started.attempt or 1
                if started.HasField("last_failure"):
                    activity_or_none.previous_error = started.last_failure.message
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            completed = event.activity_task_completed_event_attributes
            activity_or_none = by_scheduled_id.get(completed.scheduled_event_id)
            if activity_or_none is not None:
                await _completed(decoder, activity_or_none, completed.result, when)
                step(activity_or_none.step_id).timeline.append(("activity", activity_or_none))
        elif kind in (
            EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED,
            EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT,
        ):
            if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED:
                failed = event.activity_task_failed_event_attributes
                scheduled_id, failure = failed.scheduled_event_id, failed.failure
                outcome = "failed"
            else:
                timed_out = event.activity_task_timed_out_event_attributes
                scheduled_id, failure = timed_out.scheduled_event_id, timed_out.failure
                outcome = "timed_out"
            activity_or_none = by_scheduled_id.get(scheduled_id)
            if activity_or_none is not None:
                await _failed(decoder, activity_or_none, failure, outcome, when)
                step(activity_or_none.step_id).timeline.append(("activity", activity_or_none))
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED:
            canceled = event.activity_task_canceled_event_attributes
            activity_or_none = by_scheduled_id.get(canceled.scheduled_event_id)
            if activity_or_none is not None:
                activity_or_none.outcome, activity_or_none.ended = "cancelled", when
                activity_or_none.error = "cancelled"
                step(activity_or_none.step_id).timeline.append(("activity", activity_or_none))
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            signaled = event.workflow_execution_signaled_event_attributes
            if signaled.signal_name in _INTERVENTIONS:
                argument = await _argument(decoder, signaled.input)
                entry = _intervention(signaled.signal_name, argument, when, "signal")
                target = step(str(argument.get("step", "")))
                target.interventions.append(entry)
                # Whether a signal applied is not in history; the run's result
                # says, when it completed; otherwise it counts as applied.
                target.timeline.append(("intervention", entry))
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            accepted = event.workflow_execution_update_accepted_event_attributes
            request = accepted.accepted_request
            name = request.input.name
            if name.endswith("_step") and name[: -len("_step")] in _INTERVENTIONS:
                argument = await _argument(decoder, request.input.args)
                entry = _intervention(name[: -len("_step")], argument, when, "update")
                entry["accepted"] = None  # until its completion event says
                step(str(argument.get("step", ""))).interventions.append(entry)
                updates[request.meta.update_id] = entry
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED:
            done = event.workflow_execution_update_completed_event_attributes
            entry_or_none = updates.get(done.meta.update_id)
            if entry_or_none is not None:
                if done.outcome.HasField("failure"):
                    entry_or_none["accepted"] = False
                    entry_or_none["reason"] = done.outcome.failure.message
                else:
                    entry_or_none["accepted"] = True
                    target = step(str(entry_or_none["argument"].get("step", "")))
                    target.timeline.append(("intervention", entry_or_none))
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
            status, ended_at = "completed", when
            completed_run = event.workflow_execution_completed_event_attributes
            if completed_run.result.payloads:
                value = await decoder.value(completed_run.result.payloads[0], RunProgress)
                result = value if isinstance(value, RunProgress) else None
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED:
            status, ended_at = "failed", when
            error = event.workflow_execution_failed_event_attributes.failure.message
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED:
            status, ended_at = "cancelled", when
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED:
            status, ended_at = "failed", when
            reason = event.workflow_execution_terminated_event_attributes.reason
            error = f"terminated: {reason or 'no reason given'}"
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT:
            status, ended_at = "failed", when
            error = "the run timed out (workflow execution timeout)"
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
            status, ended_at = "continued_as_new", when

    steps.pop("", None)  # interventions naming no step
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
    return {
        "workflow_id": history.workflow_id,
        "run_id": history.run_id,
        "name": spec.get("name"),
        "status": status,
        "started": _iso(started_at),
        "ended": _iso(ended_at),
        "error": error,
        "dry_run": bool(spec.get("dry_run", False)),
        "steps": documents,
        "usage": {
            "input_tokens": total_in,
            "output_tokens": total_out,
            "cost_usd": round(sum(c for c in costs if c is not None), 8),
            # False when some model's price is unknown: the total is a lower bound.
            "cost_complete": all(c is not None for c in costs),
        },
    }


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


async def _scheduled(
    decoder: _Decoder, activity_type: str, attrs: Any, when: datetime | None
) -> _Activity | None:
    if not attrs.input.payloads:
        return None
    if activity_type == LLM_ACTIVITY:
        llm_call = await decoder.value(attrs.input.payloads[0], LlmCall)
        return _Activity(llm_call.step_id, "llm", when, llm_call)
    if activity_type == PTY_ACTIVITY:
        command_call = await decoder.value(attrs.input.payloads[0], CommandCall)
        return _Activity(command_call.step_id, "pty", when, command_call)
    return None


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
    action: str, argument: dict[str, Any], when: datetime | None, via: str
) -> dict[str, Any]:
    return {
        "type": action,
        "argument": argument,
        "time": _iso(when),
        "via": via,
        "accepted": None,
        "reason": None,
    }


def _fold(target: _Step) -> None:
    """The step's status and output from its timeline (refused interventions skipped)."""
    if any(activity.outcome == "running" for activity in target.activities):
        target.status = "running"
    for what, item in target.timeline:
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


def _step_document(item: _Step) -> dict[str, Any]:
    activities = item.activities
    answered = [a for a in activities if a.reply is not None]
    last = activities[-1] if activities else None
    final = answered[-1] if answered else last
    usage_in = sum(a.reply.usage.input_tokens for a in answered if a.reply)
    usage_out = sum(a.reply.usage.output_tokens for a in answered if a.reply)
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
        "usage": {"input_tokens": usage_in, "output_tokens": usage_out},
        "cost_usd": cost,
        "attempts": [entry for activity in activities for entry in _attempts(activity)],
        "interventions": item.interventions,
    }
    if final is not None and isinstance(final.call, LlmCall):
        call = final.call
        reply = final.reply
        doc["provider"] = reply.provider if reply else call.provider
        doc["model"] = reply.model if reply else call.model
        doc["response_model"] = reply.response_model if reply else None
        doc["prompt"] = call.messages[-1].content if call.messages else None
        doc["system"] = call.system
        doc["messages"] = [message.model_dump() for message in call.messages]
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
            }
        )
    return entries


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
    if document["error"]:
        lines.append(f"- error: {document['error']}")
    lines += ["", "| step | kind | status | provider/model | attempts | cost |", "|---" * 6 + "|"]
    for step_id, step in document["steps"].items():
        model = f"{step['provider']}/{step['model']}" if step.get("provider") else "—"
        step_cost = "unknown" if step["cost_usd"] is None else f"${step['cost_usd']:.6f}"
        lines.append(
            f"| {step_id} | {step['kind']} | {step['status']} | {model} "
            f"| {len(step['attempts'])} | {step_cost} |"
        )
    for step_id, step in document["steps"].items():
        lines += ["", f"## {step_id}", ""]
        if step.get("prompt") is not None:
            lines += ["Prompt (as sent):", "", *_fenced(step["prompt"]), ""]
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
            verdict = {True: "applied", False: "refused", None: "sent"}[entry["accepted"]]
            reason = f": {entry['reason']}" if entry["reason"] else ""
            argument = json.dumps(entry["argument"], ensure_ascii=False)
            lines.append(
                f"- {entry['time']} {entry['type']} via {entry['via']} {argument} "
                f"({verdict}{reason})"
            )
        if step["output"] is not None:
            lines += ["", "Output:", "", *_fenced(step["output"])]
    return "\n".join(lines) + "\n"


def _fenced(text: str) -> Sequence[str]:
    if len(text) > _MD_TEXT_LIMIT:
        cut = len(text) - _MD_TEXT_LIMIT
        text = text[:_MD_TEXT_LIMIT] + f"\n[… {cut} more characters: see --format json]"
    return ["```text", text.replace("```", "` ` `"), "```"]


# ---- the command -----------------------------------------------------------------


def add_audit_parser(sub: Any) -> None:
    """``llmmixer audit ID [--format json|md] [--history FILE] [--run-id RUN]``."""
    audit = sub.add_parser("audit", help="a run's full record, rebuilt from its Temporal history")
    audit.add_argument("id", help="workflow id")
    audit.add_argument("--format", choices=("json", "md"), default="json")
    audit.add_argument(
        "--history",
        metavar="FILE",
        default=None,
        help="read a history exported with `temporal workflow show -o json` (no server needed)",
    )
    audit.add_argument("--run-id", default=None, help="a run other than the latest")


async def cmd_audit(args: Any) -> int:
    from llmmixer.client.mixer import MixerClient
    from llmmixer.runtime.connection import data_converter

    try:
        if args.history:
            document = await audit_history(load_history(args.history, args.id), data_converter())
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
