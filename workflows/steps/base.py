"""What every step handler shares: its context, its outcomes, and helpers.

Determinism: like all of ``workflows/``, this runs inside the workflow
sandbox; it does no I/O and reads no clock but ``workflow.now()``.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from pydantic import BaseModel
from temporalio import workflow
from temporalio.contrib.workflow_streams import WorkflowTopicHandle
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    RetryState,
    TimeoutError,
)

from llmmixer.core.contracts import (
    EventType,
    FailureDetails,
    MixerEvent,
)
from llmmixer.core.spec import RetrySpec, Spec
from llmmixer.core.templates import render
from llmmixer.workflows.calls import (
    CHECK_OPTIONS,
    CheckActivityOptions,
    StepActivityOptions,
    StepModel,
    planned_step,
)
from llmmixer.workflows.dag import RunState
from llmmixer.workflows.records import Intervention, InterventionType, ReuseTable
from llmmixer.workflows.reuse import call_hash, reused_output

ActivityResult = TypeVar("ActivityResult", bound=BaseModel)
OwnPrompt = TypeVar("OwnPrompt", str, str | None)


@dataclass(frozen=True)
class Completed:
    """The step produced ``output``."""

    output: str


@dataclass(frozen=True)
class Failed:
    """The step ended without an output; its ``on_failure`` decides what comes next."""

    error: str


@dataclass(frozen=True)
class Reused:
    """The step's call is the one a source run made: its output is taken, nothing runs."""

    output: str
    source: str
    # An approval gate: the source run's approval, recorded on the re-run's step.
    approval: Intervention | None = None


@dataclass(frozen=True)
class Settled:
    """A person skipped or overrode the step while it waited.

    The intervention has already moved the step's record (``RunState.decide``),
    so there is nothing left to run and nothing to record.
    """

    action: InterventionType


Outcome = Completed | Failed | Settled | Reused


class StepFailed(Exception):
    """An activity of the step failed; the handler's outcome is ``Failed``.

    Only for failures of what a step runs: a person's decision is never
    raised, it is a transition of ``RunState`` and an outcome.
    """


class EventPublisher:
    """Publishes the run's events (docs/interventions.md) to its stream."""

    def __init__(self, topic: WorkflowTopicHandle[MixerEvent]) -> None:
        self._topic = topic

    def publish(
        self,
        event_type: EventType,
        step: str | None = None,
        attempt: int | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        self._topic.publish(
            MixerEvent(
                type=event_type, step=step, attempt=attempt, time=workflow.now(), data=data or {}
            )
        )


@dataclass
class StepContext:
    """What a step handler is handed: the run it belongs to.

    One per run; handlers of steps running side by side share it, and read
    or change the run only through ``state``.
    """

    state: RunState
    """The run's state machine: every change of a step goes through it."""

    spec: Spec
    """The run's spec, checked."""

    spec_body: dict[str, Any]
    """The spec as the run received it: the plan check reads it whole."""

    events: EventPublisher
    """The run's event stream."""

    checks_recorded: bool
    """The run records its checks' verdicts (``patches.CHECKS_RECORDED_PATCH``),
    decided when the run started; every later patch is on for such a run."""

    tool_loop: bool = True
    """An llm step with tools runs its tool loop (``patches.TOOL_LOOP_PATCH``);
    runs recorded before it asked once, without tools."""

    check_options: CheckActivityOptions = CHECK_OPTIONS
    """How plan checks are scheduled; step activities take theirs from
    ``calls.llm_options`` and ``calls.command_options``."""

    reuse: ReuseTable | None = None
    """A re-run's outputs of its source run (``llmmixer rerun``); None for other runs."""

    markers: bool = False
    """The run writes the memo entries re-runs and audits read
    (``patches.REUSE_MARKERS_PATCH``), decided when the run started."""

    planned: dict[str, StepModel] = field(default_factory=dict)
    """Steps created by plans, parsed once from their nodes' definitions."""

    def step(self, step_id: str) -> StepModel:
        """The step's model: from the spec, or from the plan that created it."""
        node = self.state.nodes.get(step_id)
        if node is None or node.definition is None:
            return self.spec.step(step_id)
        if step_id not in self.planned:
            self.planned[step_id] = planned_step(node.kind, node.definition)
        return self.planned[step_id]

    def render(self, text: str, step_id: str | None = None) -> str:
        """``text`` with its templates filled from the inputs and the outputs so far."""
        outputs = self.state.outputs()
        if step_id is not None:
            # Only what the step waited for: a `join` must not depend on which
            # unrelated steps happened to finish first.
            scope = self.state.ancestors(step_id)
            outputs = {i: text for i, text in outputs.items() if i in scope}
        return render(text, self.spec.inputs, outputs, self.state.children())

    def prompt(self, step_id: str, own: OwnPrompt) -> OwnPrompt:
        """The step's prompt: the one given with a person's retry, else its own."""
        return self.state.prompt_overrides.get(step_id, own)

    def reuse_or_note(self, step_id: str, call: BaseModel) -> Reused | None:
        """Record the digest of ``call``; the source run's output when it made the same call."""
        return self.reuse_or_note_digest(step_id, call_hash(call))

    def reuse_or_note_digest(self, step_id: str, digest: str) -> Reused | None:
        """Record ``digest`` (a step's effective call, ``workflows/reuse.py``); the
        source run's output when its call had the same digest."""
        self.state.note_call(step_id, digest)
        entry = reused_output(self.reuse, step_id, digest)
        if entry is None:
            return None
        approval = None
        if entry.approved_by is not None or entry.approved_at is not None:
            approval = Intervention(
                type="approve",
                argument={"comment": entry.output, "reused_from": entry.source}
                | ({"by": entry.approved_by} if entry.approved_by else {}),
                time=entry.approved_at,
            )
        return Reused(entry.output, entry.source, approval)

    def mark(self, key: str, value: Any) -> None:
        """A memo entry for later re-runs and audits (``workflows/reuse.py``)."""
        if self.markers:
            workflow.upsert_memo({key: value})

    async def decision(self, step_id: str, timeout_s: float | None) -> Intervention | None:
        """A person's decision on ``step_id``; None when ``timeout_s`` passed first."""
        try:
            await workflow.wait_condition(
                lambda: step_id in self.state.decisions,
                timeout=timedelta(seconds=timeout_s) if timeout_s else None,
                timeout_summary=f"pause timeout of step {step_id}",
            )
        except builtins.TimeoutError:
            return None
        return self.state.take_decision(step_id)


def start_activity(
    activity: str,
    arg: BaseModel,
    result_type: type[ActivityResult],
    options: StepActivityOptions,
    summary: str,
) -> workflow.ActivityHandle[ActivityResult]:
    """Schedule one of a step's activities with its kind's options; ``summary`` labels it."""
    return workflow.start_activity(
        activity,
        arg,
        result_type=result_type,
        task_queue=options.task_queue,
        start_to_close_timeout=options.start_to_close_timeout,
        heartbeat_timeout=options.heartbeat_timeout,
        retry_policy=options.retry_policy,
        cancellation_type=options.cancellation_type,
        summary=summary,
    )


async def execute_activity(
    activity: str,
    arg: BaseModel,
    result_type: type[ActivityResult],
    options: StepActivityOptions,
    summary: str,
) -> ActivityResult:
    return await start_activity(activity, arg, result_type, options, summary)


def describe_failure(error: ActivityError, retry: RetrySpec) -> tuple[int, str, str | None]:
    """(attempts used, message for people, error type) of a failed activity."""
    cause = error.cause
    attempts = retry.max_attempts if error.retry_state == RetryState.MAXIMUM_ATTEMPTS_REACHED else 1
    if isinstance(cause, ApplicationError):
        if cause.details and isinstance(cause.details[0], dict):
            details = FailureDetails.model_validate(cause.details[0])
            attempts = details.attempt
        return attempts, cause.message, cause.type
    if isinstance(cause, TimeoutError):
        return (
            attempts,
            f"activity timed out ({cause.type.name if cause.type else 'timeout'})",
            "Timeout",
        )
    if isinstance(cause, CancelledError):
        return attempts, "cancelled", "Cancelled"
    return attempts, str(cause or error), None
