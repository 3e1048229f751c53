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

import re
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
    McpCallRequest,
    McpListRequest,
    McpToolInfo,
    PlanCheck,
    PlanCheckLimits,
    PlanRequest,
    ToolCall,
    ToolDeclaration,
    ToolRunRequest,
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
from llmmixer.core.tools import TOOL_NAME_PATTERN, CommandTool, McpTool, SpecTool, Tool
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
    tools: list[ToolDeclaration] | None = None,
) -> LlmCall:
    """The call ``step`` sends to ``target``: its own settings over the spec's defaults.

    ``tools``: what a tool loop's turn offers the model (``tool_declarations``).

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
                **({"tools": tools} if tools else {}),
            )
        case DecomposeStep():
            return LlmCall(**shared, response_format="json")


# ---- tool loops -------------------------------------------------------------

# What a tool name routes to: a command or spec tool, or an MCP server with
# the name of its own tool.
ToolRoute = CommandTool | SpecTool | tuple[McpTool, str]


@dataclass(frozen=True)
class ToolSet:
    """What a tool loop offers its model, and what each declared name runs."""

    declarations: list[ToolDeclaration]
    routes: dict[str, ToolRoute]
    # MCP tools that could not be offered (a name or schema no provider takes).
    dropped: list[str] = field(default_factory=list)


def tool_set(tools: list[Tool], listed: dict[str, list[McpToolInfo]]) -> ToolSet:
    """The declarations of ``tools``, with each MCP server's tools as ``listed``.

    An MCP server's tools are offered under their own names; a name already
    taken (by the step's own tools, or an earlier server) is dropped rather
    than guessed at, and so is a name or schema the providers refuse.
    """
    declarations: list[ToolDeclaration] = []
    routes: list[tuple[str, ToolRoute]] = []
    dropped: list[str] = []
    for tool in tools:
        if isinstance(tool, CommandTool | SpecTool):
            declarations.append(
                ToolDeclaration(
                    name=tool.name, description=tool.description or "", parameters=tool.parameters
                )
            )
            routes.append((tool.name, tool))
    for tool in tools:
        if not isinstance(tool, McpTool):
            continue
        for info in listed.get(tool.name, []):
            parameters = {"type": "object", **info.parameters}
            if (
                any(name == info.name for name, _ in routes)
                or not re.match(TOOL_NAME_PATTERN, info.name)
                or parameters.get("type") != "object"
                or not isinstance(parameters.get("properties", {}), dict)
            ):
                dropped.append(f"{tool.name}/{info.name}")
                continue
            description = info.description or ""
            if tool.description:
                description = (
                    f"{tool.description}: {description}" if description else tool.description
                )
            declarations.append(
                ToolDeclaration(name=info.name, description=description, parameters=parameters)
            )
            routes.append((info.name, (tool, info.name)))
    return ToolSet(declarations=declarations, routes=dict(routes), dropped=dropped)


def route_approval(route: ToolRoute) -> bool:
    """Whether a call through ``route`` waits for a person first (its tool's ``approve``)."""
    return route[0].approve if isinstance(route, tuple) else route.approve


def tool_run_request(
    step: LlmStep, tool: CommandTool, call: ToolCall, *, workflow_id: str
) -> ToolRunRequest:
    return ToolRunRequest(workflow_id=workflow_id, step_id=step.id, tool=tool, call=call)


def mcp_list_request(step: LlmStep, server: McpTool, *, workflow_id: str) -> McpListRequest:
    return McpListRequest(workflow_id=workflow_id, step_id=step.id, server=server)


def mcp_call_request(
    step: LlmStep, server: McpTool, tool_name: str, call: ToolCall, *, workflow_id: str
) -> McpCallRequest:
    """The call as the server knows it: under its own tool name."""
    return McpCallRequest(
        workflow_id=workflow_id,
        step_id=step.id,
        server=server,
        call=call.model_copy(update={"name": tool_name}),
    )


def tool_options(spec: Spec, step: LlmStep, timeout_s: float) -> StepActivityOptions:
    """A tool call (command or MCP), where commands run: the spec's terminal queue.

    The tool's own ``timeout_s`` is enforced by the activity; the attempt's
    timeout is a backstop a minute later. The step's ``retry`` applies; a
    worker's refusal is never retried.
    """
    return StepActivityOptions(
        start_to_close_timeout=timedelta(seconds=timeout_s + 60),
        heartbeat_timeout=timedelta(seconds=spec.defaults.heartbeat_timeout_s),
        retry_policy=retry_policy(spec.retry(step)),
        task_queue=spec.pty_task_queue,
    )


def child_spec(tool: SpecTool, arguments: dict[str, Any], parent: dict[str, Any]) -> dict[str, Any]:
    """The spec a ``spec`` tool's call runs as a child workflow.

    The tool's arguments are the child's inputs (over its own defaults). The
    child runs where its parent runs: the parent's terminal queue and dry
    run carry over unless the child sets its own.
    """
    if not isinstance(tool.spec, dict):
        raise TypeError(f"tool {tool.name}: the child spec was not read when the run started")
    inherited: dict[str, Any] = {
        key: parent[key]
        for key in ("pty_task_queue", "dry_run")
        if key in parent and key not in tool.spec
    }
    return {
        **tool.spec,
        **inherited,
        "inputs": {**dict(tool.spec.get("inputs") or {}), **arguments},
    }


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


def hedge_target(
    chain: list[FallbackTarget], index: int, hedge: Hedge, number: int = 1
) -> FallbackTarget:
    """Who the ``number``-th hedge of ``chain[index]`` asks.

    ``target: next`` walks the chain (the first hedge asks the next target,
    the second the one after), back to ``chain[index]`` itself once the chain
    has no more; ``target: same`` always asks ``chain[index]``.
    """
    if hedge.target == "next" and index + number < len(chain):
        return chain[index + number]
    return chain[index]


def hedged_options(spec: Spec, step: ModelStep) -> StepActivityOptions:
    """The calls of a hedge: as ``llm_options``, but the losers are let go at once.

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
