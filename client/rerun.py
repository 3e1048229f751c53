"""Re-running a closed run (``llmmixer rerun``): what its history lets a new run reuse.

The source run's outputs come from its history (and the payload store its
history points into, through the client's data converter), never from a side
database: every activity that ran a step is there with its input and result,
and the memo entries a run writes (``workflows/reuse.py``) say which gates a
person approved and which steps took an earlier run's output. For each step
that completed, the digest of its *effective call* is computed here with the
same functions the workflow uses, from the calls the history holds; the new
run takes that output for a step whose call, built afresh, has the same
digest. When a step's history is not one this reads with certainty (an old
run, a step that failed after its last reply), it is left out: it runs again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client
from temporalio.converter import DataConverter

from llmmixer.client.audit import fetch_chain
from llmmixer.client.specfile import prepare_spec, read_spec
from llmmixer.core.contracts import (
    AGENT_ACTIVITY,
    CHECK_PLAN_ACTIVITY,
    LLM_ACTIVITY,
    PTY_ACTIVITY,
    AgentCall,
    ChatMessage,
    CommandCall,
    CommandResult,
    LlmCall,
    LlmReply,
    PlanCheck,
    PlanCheckResult,
)
from llmmixer.core.spec import DecomposeStep, LlmStep, Spec
from llmmixer.core.validation import SpecError, parse_spec_shape
from llmmixer.workflows.calls import StepModel, planned_step
from llmmixer.workflows.carry import Carried
from llmmixer.workflows.records import InterventionRequest, ReusedStep, ReuseTable
from llmmixer.workflows.reuse import (
    APPROVED_MEMO,
    REUSED_MEMO,
    best_of_hash,
    call_hash,
    chain_hash,
    downstream,
    planner_hash,
)

__all__ = ["RerunError", "SourceRun", "read_source", "rerun_inputs", "reuse_table"]

_CLOSED = frozenset(
    {
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
    }
)
_APPROVALS = frozenset({"approve", "approve_step"})
# What the judge of a best_of step is sent after its instruction (steps/llm.py).
_JUDGE_TASK = "\n\n## Task\n"


class RerunError(ValueError):
    """The re-run cannot start (an open source run, an unknown ``--from`` step); nothing started."""


class SourceOpen(RerunError):
    """The source run has not ended: a re-run starts only from a closed run."""


@dataclass(frozen=True)
class SourceRun:
    """What a closed run leaves for a re-run: its spec as started, and its reusable outputs."""

    workflow_id: str
    spec: dict[str, Any]
    steps: dict[str, ReusedStep]


@dataclass
class _Call:
    call: LlmCall | CommandCall | AgentCall
    reply: LlmReply | CommandResult | None = None


@dataclass
class _History:
    """What a source run's history says, step by step, in the order it happened."""

    calls: dict[str, list[_Call]] = field(default_factory=dict)
    planners: dict[str, list[LlmCall]] = field(default_factory=dict)
    # decompose step -> (its planner's call the accepted plan answered, the plan's steps)
    plans: dict[str, tuple[LlmCall, list[dict[str, Any]]]] = field(default_factory=dict)
    approvals: dict[str, dict[str, Any]] = field(default_factory=dict)
    approvers: dict[str, str] = field(default_factory=dict)
    reused: dict[str, str] = field(default_factory=dict)
    carried: dict[str, ReusedStep] = field(default_factory=dict)


async def read_source(client: Client, workflow_id: str) -> SourceRun:
    """The run ``workflow_id`` (its whole continue-as-new chain), read from history."""
    chain = await fetch_chain(client, workflow_id)
    last = chain[-1].events[-1] if chain[-1].events else None
    if last is None or last.event_type not in _CLOSED:
        raise SourceOpen(
            f"run {workflow_id} is still open: a re-run starts from a closed run; "
            f"cancel it (`llmmixer cancel {workflow_id}`) or wait for it to end"
        )
    converter = client.data_converter
    spec: dict[str, Any] = {}
    seen = _History()
    for history in chain:
        scheduled: dict[int, LlmCall | CommandCall | AgentCall | PlanCheck] = {}
        for event in history.events:
            if event.HasField("workflow_execution_started_event_attributes"):
                payloads = event.workflow_execution_started_event_attributes.input.payloads
                if not spec and payloads:
                    decoded = await _decode(converter, payloads[0], dict)
                    spec = decoded if isinstance(decoded, dict) else {}
                if len(payloads) > 2 and not seen.carried:
                    carried = await _decode(converter, payloads[2], Carried)
                    if isinstance(carried, Carried) and carried.reuse is not None:
                        seen.carried = dict(carried.reuse.steps)
            elif event.HasField("activity_task_scheduled_event_attributes"):
                await _scheduled(converter, event, scheduled, seen)
            elif event.HasField("activity_task_completed_event_attributes"):
                attrs = event.activity_task_completed_event_attributes
                call = scheduled.get(attrs.scheduled_event_id)
                if call is not None and attrs.result.payloads:
                    await _completed(converter, call, attrs.result.payloads[0], seen)
            elif event.HasField("workflow_properties_modified_event_attributes"):
                await _memo(converter, event, seen)
            else:
                await _decision(converter, event, seen)
    if not spec:
        raise RerunError(f"run {workflow_id}: its history has no spec to run again")
    return SourceRun(workflow_id=workflow_id, spec=spec, steps=_reusable(workflow_id, spec, seen))


async def _scheduled(
    converter: DataConverter,
    event: HistoryEvent,
    scheduled: dict[int, LlmCall | CommandCall | AgentCall | PlanCheck],
    seen: _History,
) -> None:
    attrs = event.activity_task_scheduled_event_attributes
    name = attrs.activity_type.name
    if not attrs.input.payloads:
        return
    payload = attrs.input.payloads[0]
    if name == LLM_ACTIVITY:
        llm = await _decode(converter, payload, LlmCall)
        if llm.plan is not None:
            seen.planners.setdefault(llm.step_id, []).append(llm)
        else:
            seen.calls.setdefault(llm.step_id, []).append(_Call(llm))
        scheduled[event.event_id] = llm
    elif name in (PTY_ACTIVITY, AGENT_ACTIVITY):
        command = await _decode(
            converter, payload, CommandCall if name == PTY_ACTIVITY else AgentCall
        )
        seen.calls.setdefault(command.step_id, []).append(_Call(command))
        scheduled[event.event_id] = command
    elif name == CHECK_PLAN_ACTIVITY:
        scheduled[event.event_id] = await _decode(converter, payload, PlanCheck)
    # other checks and bookkeeping: no step output


async def _completed(
    converter: DataConverter,
    call: LlmCall | CommandCall | AgentCall | PlanCheck,
    payload: Payload,
    seen: _History,
) -> None:
    if isinstance(call, PlanCheck):
        result = await _decode(converter, payload, PlanCheckResult)
        planners = seen.planners.get(call.step_id) or []
        if not result.issues and planners:
            seen.plans[call.step_id] = (planners[-1], result.steps)
        return
    if isinstance(call, LlmCall) and call.plan is not None:
        return  # a planner's reply is read through its check
    for entry in reversed(seen.calls.get(call.step_id, [])):
        if entry.call is call:
            entry.reply = await _decode(
                converter, payload, LlmReply if isinstance(call, LlmCall) else CommandResult
            )
            return


async def _memo(converter: DataConverter, event: HistoryEvent, seen: _History) -> None:
    fields = event.workflow_properties_modified_event_attributes.upserted_memo.fields
    for key, payload in fields.items():
        if key.startswith(APPROVED_MEMO):
            value = await _decode(converter, payload, dict)
            if isinstance(value, dict):
                seen.approvals[key.removeprefix(APPROVED_MEMO)] = value
        elif key.startswith(REUSED_MEMO):
            value = await _decode(converter, payload, str)
            seen.reused[key.removeprefix(REUSED_MEMO)] = str(value)


async def _decision(converter: DataConverter, event: HistoryEvent, seen: _History) -> None:
    """Who sent an approval (a signal or an update): the re-run's record names them."""
    if event.HasField("workflow_execution_signaled_event_attributes"):
        attrs = event.workflow_execution_signaled_event_attributes
        name, identity, payloads = attrs.signal_name, attrs.identity, attrs.input.payloads
    elif event.HasField("workflow_execution_update_accepted_event_attributes"):
        request = event.workflow_execution_update_accepted_event_attributes.accepted_request
        name, identity = request.input.name, request.meta.identity
        payloads = request.input.args.payloads
    else:
        return
    if name not in _APPROVALS or not payloads:
        return
    argument = await _decode(converter, payloads[0], InterventionRequest)
    if argument.step:
        seen.approvers[argument.step] = identity or "unknown"


def _reusable(workflow_id: str, body: dict[str, Any], seen: _History) -> dict[str, ReusedStep]:
    try:
        spec = parse_spec_shape(body)
    except SpecError:
        return {}
    models: dict[str, StepModel] = {}
    for step in spec.steps:
        models[step.id] = step
    for _, planned in seen.plans.values():
        for definition in planned:
            try:
                models.setdefault(definition["id"], planned_step(definition["kind"], definition))
            except (KeyError, TypeError, ValueError):
                continue
    found: dict[str, ReusedStep] = {}
    for step_id, model in models.items():
        entry = _entry(spec, model, seen)
        if entry is not None:
            found[step_id] = entry.model_copy(update={"source": f"{workflow_id}/{step_id}"})
        elif step_id in seen.reused and step_id in seen.carried:
            # Reused by the source itself: the output its own source had.
            found[step_id] = seen.carried[step_id]
    return found


def _entry(spec: Spec, model: StepModel, seen: _History) -> ReusedStep | None:
    step_id = model.id
    if model.kind == "approval":
        approval = seen.approvals.get(step_id)
        if approval is None or not isinstance(approval.get("call_hash"), str):
            return None
        when = approval.get("time")
        return ReusedStep(
            call_hash=approval["call_hash"],
            output=str(approval.get("output") or "approved"),
            source="",
            approved_by=seen.approvers.get(step_id, "unknown"),
            approved_at=datetime.fromisoformat(when) if isinstance(when, str) else None,
        )
    if isinstance(model, DecomposeStep):
        if step_id not in seen.plans:
            return None
        accepted, steps = seen.plans[step_id]
        first = _first_planner(seen.planners.get(step_id, []), accepted)
        return ReusedStep(
            call_hash=planner_hash(first),
            output=json.dumps({"steps": steps}, indent=2),
            source="",
        )
    calls = seen.calls.get(step_id, [])
    if not calls or calls[-1].reply is None:
        return None  # the step's last call did not answer: it did not complete by it
    last = calls[-1]
    if isinstance(last.reply, CommandResult):
        return ReusedStep(call_hash=call_hash(last.call), output=last.reply.output, source="")
    if not isinstance(model, LlmStep) or not isinstance(last.call, LlmCall):
        return None
    assert isinstance(last.reply, LlmReply)
    if last.reply.tool_calls:
        return None  # a tool loop that stopped before its final answer
    llm_calls = [entry.call for entry in calls if isinstance(entry.call, LlmCall)]
    if model.best_of is not None:
        digest = _best_of_digest(spec, model, llm_calls)
    else:
        first = _first_turn(llm_calls)
        digest = chain_hash(spec, model, first.messages, first.system)
    if digest is None:
        return None
    return ReusedStep(call_hash=digest, output=last.reply.text, source="")


def _first_turn(calls: list[LlmCall]) -> LlmCall:
    """The first call of the attempt that ended with ``calls[-1]``.

    Going back, a fallback target is sent the same messages and a tool
    loop's earlier turn a shorter start of them; anything else (a person's
    retry with another prompt) began another attempt.
    """
    first = calls[-1]
    for earlier in reversed(calls[:-1]):
        if not _starts(first.messages, earlier.messages) or earlier.system != first.system:
            break
        first = earlier
    return first


def _starts(messages: Sequence[ChatMessage], prefix: Sequence[ChatMessage]) -> bool:
    return len(prefix) <= len(messages) and list(messages[: len(prefix)]) == list(prefix)


def _first_planner(planners: list[LlmCall], accepted: LlmCall) -> LlmCall:
    """The planner's first call of the attempt whose plan was accepted.

    A try after a refused plan sends the first prompt with the refusal
    appended, so going back each earlier prompt is a start of the later one.
    """
    index = next((i for i, call in enumerate(planners) if call is accepted), len(planners) - 1)
    first = accepted
    for earlier in reversed(planners[:index]):
        if not _text(first).startswith(_text(earlier)):
            break
        first = earlier
    return first


def _text(call: LlmCall) -> str:
    return call.messages[0].content if call.messages else ""


def _best_of_digest(spec: Spec, step: LlmStep, calls: list[LlmCall]) -> str | None:
    """The effective call of a best_of step from its last judge and candidates."""
    if len(calls) < 2 or not calls[-1].messages:
        return None
    judge, candidate = calls[-1], calls[-2]
    task = candidate.messages[-1].content if candidate.messages else ""
    marker = f"{_JUDGE_TASK}{task}\n\n"
    content = judge.messages[-1].content
    if marker not in content:
        return None
    instruction = content[: content.index(marker)]
    return best_of_hash(spec, step, candidate.messages, candidate.system, instruction)


async def _decode(converter: DataConverter, payload: Payload, type_hint: type) -> Any:
    try:
        [value] = await converter.decode([payload], [type_hint])
    except Exception as error:
        raise RerunError(
            f"cannot decode the source run's history ({type(error).__name__}: {error}); "
            "re-run with the same LLMMIXER_PAYLOAD_* settings (store, directory or bucket, "
            "key) as the workers that ran it"
        ) from error
    return value


def prepare_rerun(
    source: SourceRun,
    *,
    spec: Mapping[str, Any] | str | Path | None,
    inputs: Mapping[str, Any] | None,
    from_steps: Sequence[str],
) -> tuple[dict[str, Any], Spec, ReuseTable]:
    """The body, model and reuse table of a re-run of ``source`` (``spec``: an edited one).

    CPU work on a possibly hostile document, so ``llmmixer serve`` calls it in
    a thread. Raises ``SpecError`` or ``RerunError``.
    """
    edited = read_spec(spec) if spec is not None else None
    body, parsed = prepare_spec(
        edited if edited is not None else source.spec,
        inputs=rerun_inputs(source, edited, inputs),
    )
    return body, parsed, reuse_table(source, parsed, from_steps)


def rerun_inputs(
    source: SourceRun, edited: Mapping[str, Any] | None, inputs: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The inputs of the re-run: the source run's, then those given now.

    With an edited spec only the inputs it still declares carry over, so a
    renamed or dropped input is not forced on it.
    """
    carried = dict(source.spec.get("inputs") or {})
    if edited is not None:
        declared = edited.get("inputs") or {}
        carried = {key: value for key, value in carried.items() if key in declared}
    return {**carried, **(inputs or {})}


def reuse_table(source: SourceRun, spec: Spec, from_steps: Sequence[str]) -> ReuseTable:
    """The source's outputs that the re-run of ``spec`` may take.

    The ``from_steps`` and every step downstream of them run again whatever
    their calls are. A forced decompose step may plan other steps this time,
    so then no planned step (absent from the spec) is reused either.
    """
    known = [step.id for step in spec.steps]
    unknown = [step_id for step_id in from_steps if step_id not in known]
    if unknown:
        raise RerunError(
            f"from_steps: no step {', '.join(map(repr, unknown))} in the spec; "
            f"use one of {', '.join(known)}"
        )
    forced = downstream({step.id: step.needs for step in spec.steps}, from_steps)
    planned_again = any(isinstance(spec.step(i), DecomposeStep) for i in forced)
    steps = {
        step_id: entry
        for step_id, entry in source.steps.items()
        if step_id not in forced and (step_id in known or not planned_again)
    }
    return ReuseTable(source=source.workflow_id, steps=steps)
