"""Re-running a closed run (``llmmixer rerun``): what its history lets a new run reuse.

The source run's outputs come from its history (and the payload store its
history points into, through the client's data converter), never from a side
database: every activity that ran a step is there with its input and result.
For each step, the last call that completed is kept with ``call_hash`` of its
input; the new run takes that output for a step whose call, built afresh,
has the same digest (``workflows/reuse.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    LLM_ACTIVITY,
    PTY_ACTIVITY,
    AgentCall,
    CommandCall,
    CommandResult,
    LlmCall,
    LlmReply,
)
from llmmixer.core.spec import DecomposeStep, Spec
from llmmixer.workflows.records import ReusedStep, ReuseTable
from llmmixer.workflows.reuse import call_hash, downstream

__all__ = ["RerunError", "SourceRun", "read_source", "rerun_inputs", "reuse_table"]

_CALLS: Mapping[str, tuple[type[LlmCall] | type[CommandCall] | type[AgentCall], type[Any]]] = {
    LLM_ACTIVITY: (LlmCall, LlmReply),
    PTY_ACTIVITY: (CommandCall, CommandResult),
    AGENT_ACTIVITY: (AgentCall, CommandResult),
}
_CLOSED = frozenset(
    {
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
    }
)


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
    steps: dict[str, ReusedStep] = {}
    for history in chain:
        calls: dict[int, LlmCall | CommandCall | AgentCall] = {}
        for event in history.events:
            if not spec and event.HasField("workflow_execution_started_event_attributes"):
                payloads = event.workflow_execution_started_event_attributes.input.payloads
                if payloads:
                    decoded = await _decode(converter, payloads[0], dict)
                    spec = decoded if isinstance(decoded, dict) else {}
            elif event.HasField("activity_task_scheduled_event_attributes"):
                await _scheduled(converter, event, calls)
            elif event.HasField("activity_task_completed_event_attributes"):
                attrs = event.activity_task_completed_event_attributes
                call = calls.get(attrs.scheduled_event_id)
                if call is None or not attrs.result.payloads:
                    continue
                output = await _output(converter, call, attrs.result.payloads[0])
                steps[call.step_id] = ReusedStep(
                    call_hash=call_hash(call),
                    output=output,
                    source=f"{workflow_id}/{call.step_id}",
                )
    if not spec:
        raise RerunError(f"run {workflow_id}: its history has no spec to run again")
    return SourceRun(workflow_id=workflow_id, spec=spec, steps=steps)


async def _scheduled(
    converter: DataConverter,
    event: HistoryEvent,
    calls: dict[int, LlmCall | CommandCall | AgentCall],
) -> None:
    attrs = event.activity_task_scheduled_event_attributes
    types = _CALLS.get(attrs.activity_type.name)
    if types is None or not attrs.input.payloads:
        return  # checks and other bookkeeping: no step output
    call = await _decode(converter, attrs.input.payloads[0], types[0])
    # A decompose step's planner answers with a plan, not a step's output.
    if isinstance(call, LlmCall) and call.plan is not None:
        return
    calls[event.event_id] = call


async def _output(
    converter: DataConverter, call: LlmCall | CommandCall | AgentCall, payload: Payload
) -> str:
    if isinstance(call, LlmCall):
        reply = await _decode(converter, payload, LlmReply)
        return str(reply.text)
    result = await _decode(converter, payload, CommandResult)
    return str(result.output)


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
