"""What a step's activities are called with, built by pure functions.

The step handlers (``workflows/steps``) decide *when* to call; this module
decides *what*: the ``LlmCall``, ``CommandCall`` or ``AgentCall`` a step
sends, and how each kind of activity is scheduled (timeouts, retries,
cancellation). No Temporal workflow context is
needed, so each rule is unit-tested directly.

Compatibility with runs in flight: the calls and options built here are the
content of commands in recorded histories. Change what they hold for a given
spec only behind a ``workflow.patched`` id (``patches.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Literal, TypedDict

from temporalio.common import RetryPolicy
from temporalio.workflow import ActivityCancellationType

from llmmixer.core.contracts import (
    AgentCall,
    ChatMessage,
    CommandCall,
    ErrorType,
    LlmCall,
    PlanCheck,
    PlanCheckLimits,
    PlanRequest,
)
from llmmixer.core.plans import PlanContext
from llmmixer.core.spec import (
    STEP_MODELS,
    AgentStep,
    ApprovalStep,
    Budget,
    DecomposeStep,
    FallbackTarget,
    Hedge,
    LlmStep,
    PtyStep,
    RetrySpec,
    Spec,
)
from llmmixer.workflows.records import BudgetLimits

# Any step of a spec or a plan, as its model.
StepModel = LlmStep | PtyStep | ApprovalStep | DecomposeStep | AgentStep
# Steps that ask a model: an llm step, and a decompose step's planner.
ModelStep = LlmStep | DecomposeStep
# Steps whose activity runs a command on a terminal worker.
CommandStep = PtyStep | AgentStep

# Errors no Temporal retry can fix; the step fails at once and on_failure applies.
NON_RETRYABLE = [
    ErrorType.REJECTED,
    ErrorType.AUTH,
    ErrorType.COMMAND_REFUSED,
    ErrorType.COMMAND_TIMEOUT,
]


def planned_step(kind: str, definition: dict[str, Any]) -> StepModel:
    """The model of a step a plan created, from its definition (checked before)."""
    step = STEP_MODELS[kind].model_validate(definition)
    if not isinstance(step, StepModel):
        raise TypeError(f"kind {kind!r} has no step model in this version of llmmixer")
    return step


def target_chain(spec: Spec, step: ModelStep) -> list[FallbackTarget]:
    """Who ``step`` asks, in order: its role's route or its own target, then its fallbacks.

    Only an llm step has fallbacks and a ``base_url`` of its own; a step
    without provider or model takes the spec's defaults.
    """
    match step:
        case LlmStep():
            fallback, base_url = step.fallback, step.base_url
        case DecomposeStep():
            fallback, base_url = [], None
    if step.role is not None:
        route = [FallbackTarget.model_validate(t.model_dump()) for t in spec.routes[step.role]]
        return [*route, *fallback]
    primary = FallbackTarget(
        provider=step.provider or spec.defaults.provider or "",
        model=step.model or spec.defaults.model or "",
        base_url=base_url,
    )
    return [primary, *fallback]


class _Shared(TypedDict):
    workflow_id: str
    step_id: str
    provider: str
    model: str
    messages: list[ChatMessage]
    system: str | None
    max_tokens: int | None
    temperature: float | None
    base_url: str | None
    timeout_s: float
    dry_run: bool
    has_fallback: bool
    plan: PlanRequest | None
    on_truncation: Literal["continue", "fail", "accept"] | None
    max_continuations: int
    cache: Literal["auto", "off"]


def falls_back(step: ModelStep, error_type: str | None) -> bool:
    """Whether a failure of type ``error_type`` moves ``step`` to its next target.

    Every failure does, except a refusal: another model may answer what one
    refused, but whether that is wanted is the step's call (`fallback_on`).
    """
    if error_type != ErrorType.REFUSED:
        return True
    return isinstance(step, LlmStep) and "refused" in step.fallback_on


def llm_call(
    spec: Spec,
    step: ModelStep,
    target: FallbackTarget,
    messages: list[ChatMessage],
    system: str | None,
    *,
    workflow_id: str,
    has_fallback: bool,
    plan: PlanRequest | None = None,
) -> LlmCall:
    """The call ``step`` sends to ``target``: its own settings over the spec's defaults.

    ``plan`` marks a decompose step's planner call, whose reply must be JSON;
    a decompose step sets nothing else an llm step can (sampling, API,
    provider options), so those stay at their defaults.
    """
    shared = _Shared(
        workflow_id=workflow_id,
        step_id=step.id,
        provider=target.provider,
        model=target.model,
        messages=messages,
        system=system,
        max_tokens=step.max_tokens or spec.defaults.max_tokens,
        temperature=spec.defaults.temperature if step.temperature is None else step.temperature,
        base_url=target.base_url,
        timeout_s=spec.timeout_s(step),
        dry_run=spec.dry_run,
        has_fallback=has_fallback,
        plan=plan,
        on_truncation=spec.on_truncation(step),
        max_continuations=spec.max_continuations(step),
        cache=spec.cache(step),
    )
    match step:
        case LlmStep():
            return LlmCall(
                **shared,
                top_p=step.top_p,
                stop=step.stop,
                response_format="json" if plan is not None else step.response_format,
                json_schema=step.json_schema,
                api=step.api,
                provider_options=step.provider_options,
            )
        case DecomposeStep():
            return LlmCall(**shared, response_format="json")


def command_call(
    spec: Spec, step: PtyStep, render: Callable[[str], str], *, workflow_id: str
) -> CommandCall:
    """The command ``step`` runs, its templates filled by ``render``.

    Each argv element is rendered on its own: a template value can never
    split into several arguments or reach a shell.
    """
    return CommandCall(
        workflow_id=workflow_id,
        step_id=step.id,
        argv=[render(part) for part in step.command],
        cwd=render(step.cwd) if step.cwd else None,
        env={key: render(value) for key, value in step.env.items()},
        timeout_s=spec.timeout_s(step),
        respond=step.respond,
        stdin=render(step.stdin) if step.stdin else None,
        success_codes=step.success_codes,
        max_output_bytes=step.max_output_bytes,
    )


def agent_call(
    spec: Spec, step: AgentStep, prompt: str, render: Callable[[str], str], *, workflow_id: str
) -> AgentCall:
    """The agent ``step`` starts with ``prompt`` (its own, or a person's retry)."""
    return AgentCall(
        workflow_id=workflow_id,
        step_id=step.id,
        agent=step.agent,
        prompt=render(prompt),
        args=[render(part) for part in step.args],
        cwd=render(step.cwd) if step.cwd else None,
        env={key: render(value) for key, value in step.env.items()},
        worktree=step.worktree,
        timeout_s=spec.timeout_s(step),
    )


def plan_check(spec_body: dict[str, Any], text: str, context: PlanContext) -> PlanCheck:
    """What the plan check activity decides on: a planner's ``text`` in its ``context``."""
    limits = context.limits
    return PlanCheck(
        text=text,
        spec=spec_body,
        step_id=context.step_id,
        limits=PlanCheckLimits(
            max_steps=limits.max_steps,
            max_depth=limits.max_depth,
            kinds=list(limits.kinds),
            fields=list(limits.fields),
        ),
        taken_ids=sorted(context.taken_ids),
        context_ids=list(context.context_ids),
    )


def budget_limits(budget: Budget) -> BudgetLimits:
    """A spec's (or decompose step's) ``budget`` as the run keeps it."""
    return BudgetLimits(max_tokens=budget.max_tokens, max_cost_usd=budget.max_cost_usd)


def retry_policy(retry: RetrySpec) -> RetryPolicy:
    """A step's ``retry`` as Temporal's policy; errors no retry can fix are never retried."""
    return RetryPolicy(
        initial_interval=timedelta(seconds=retry.initial_interval_s),
        backoff_coefficient=retry.backoff,
        maximum_interval=timedelta(seconds=retry.max_interval_s),
        maximum_attempts=retry.max_attempts,
        non_retryable_error_types=NON_RETRYABLE,
    )


@dataclass(frozen=True)
class StepActivityOptions:
    """How one kind of step activity is scheduled: all but its input and summary."""

    start_to_close_timeout: timedelta
    """How long one attempt may take before Temporal retries it."""

    heartbeat_timeout: timedelta
    """How soon an attempt that stopped heartbeating counts as lost (a dead worker)."""

    retry_policy: RetryPolicy
    """The step's ``retry``; errors no retry can fix are never retried."""

    task_queue: str | None = None
    """The queue a worker must poll to run it; None is the run's own queue."""

    cancellation_type: ActivityCancellationType = (
        ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
    )
    """Waiting for the cancellation to complete means a cancelled run reports
    itself cancelled only once its processes are dead and streams closed."""


def llm_options(spec: Spec, step: ModelStep) -> StepActivityOptions:
    """A provider call (an llm step, a best_of candidate or judge, a planner):
    the step's timeout bounds each attempt, on the run's own queue."""
    return StepActivityOptions(
        start_to_close_timeout=timedelta(seconds=spec.timeout_s(step)),
        heartbeat_timeout=timedelta(seconds=spec.defaults.heartbeat_timeout_s),
        retry_policy=retry_policy(spec.retry(step)),
    )


def hedge_target(chain: list[FallbackTarget], index: int, hedge: Hedge) -> FallbackTarget:
    """Who a hedge of ``chain[index]`` asks: the next target, or the same one."""
    if hedge.target == "next" and index + 1 < len(chain):
        return chain[index + 1]
    return chain[index]


def hedged_options(spec: Spec, step: ModelStep) -> StepActivityOptions:
    """The two calls of a hedge: as ``llm_options``, but the loser is let go at once.

    Waiting for a cancellation to complete would hold the step until the
    loser's next heartbeat (a quarter of the heartbeat timeout before its
    first token), which is the very tail a hedge is there to cut. The
    cancelled call stops at that heartbeat all the same; an LLM call holds
    no process, only a stream.
    """
    return replace(llm_options(spec, step), cancellation_type=ActivityCancellationType.TRY_CANCEL)


@dataclass(frozen=True)
class HedgeActivityOptions:
    """How the price of a hedge's cancelled loser is asked for."""

    start_to_close_timeout: timedelta = timedelta(seconds=10)
    """It answers from memory: seconds are only for a busy worker."""

    retry_policy: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(
            initial_interval=timedelta(milliseconds=200), maximum_attempts=3
        )
    )
    """A retry is only for a worker that died meanwhile."""


HEDGE_OPTIONS = HedgeActivityOptions()


def command_options(spec: Spec, step: CommandStep) -> StepActivityOptions:
    """A command or agent, on the spec's terminal queue.

    The command's own ``timeout_s`` is enforced by the activity (so it can
    report the output so far); the attempt's timeout is only a backstop a
    minute later. There is no schedule-to-start timeout, so with no terminal
    worker polling yet the step waits rather than fails.
    """
    return StepActivityOptions(
        start_to_close_timeout=timedelta(seconds=spec.timeout_s(step) + 60),
        heartbeat_timeout=timedelta(seconds=spec.defaults.heartbeat_timeout_s),
        retry_policy=retry_policy(spec.retry(step)),
        task_queue=spec.pty_task_queue,
    )


@dataclass(frozen=True)
class CheckActivityOptions:
    """How the spec and plan checks are scheduled."""

    start_to_close_timeout: timedelta = timedelta(seconds=60)
    """The checks are pure and quick: a minute is only for a slow worker."""

    retry_policy: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(
            initial_interval=timedelta(seconds=1), maximum_attempts=3
        )
    )
    """A retry is only for a worker that died meanwhile; a verdict is never retried."""


CHECK_OPTIONS = CheckActivityOptions()
