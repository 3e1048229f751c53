"""An llm step's tool loop: model turn, the tool calls it asked for, results, next turn.

The loop is workflow code. Each model turn is an activity (``steps.llm.ask``:
fallbacks, the breaker and budgets apply per turn), each tool call its own
activity or child workflow, the calls of one turn side by side. History
records every turn and call, so a worker killed mid-loop loses nothing: a
replay takes finished turns and calls from history and never runs them again.

A call of a tool marked ``approve: true`` waits for a person first (the step
is ``waiting`` with the call in its record's ``tool_approval``): ``approve``
runs it, ``reject`` sends the person's reason back to the model as the
tool's result, ``retry`` starts the loop again from its first turn, and
``skip`` or ``override`` end the step. The calls of a turn that need
approval are asked one after the other, before any call of that turn runs.

What a failing call does:

* the worker refuses it by policy (``CommandRefused``: LLMMIXER_PTY_ALLOW
  or cwd; ``McpRefused``: the server is not allowed): the step fails with
  that message and its ``on_failure`` applies, since no other call of the
  same tool could fare better and the operator has to act;
* anything else (an exit code, a timeout, bad arguments, an unknown tool, a
  server error, a child spec that failed): the model reads the error as the
  tool's result and may try again.

Determinism: no I/O here; every effect is an activity or a child workflow.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ChildWorkflowError

from llmmixer.core.contracts import (
    MCP_CALL_ACTIVITY,
    MCP_LIST_ACTIVITY,
    TOOL_COMMAND_ACTIVITY,
    ChatMessage,
    ErrorType,
    EventType,
    LlmReply,
    McpListResult,
    McpToolInfo,
    ToolCall,
    ToolDeclaration,
    ToolResult,
    ToolRunResult,
)
from llmmixer.core.spec import LlmStep
from llmmixer.core.tools import CommandTool, McpTool, SpecTool, Tool
from llmmixer.workflows.calls import (
    ToolRoute,
    ToolSet,
    child_spec,
    mcp_call_request,
    mcp_list_request,
    route_approval,
    tool_options,
    tool_run_request,
    tool_set,
)
from llmmixer.workflows.dag import cut_text
from llmmixer.workflows.records import (
    RunProgress,
    ToolApproval,
    ToolCallNote,
    ToolTurn,
)
from llmmixer.workflows.steps.base import (
    Completed,
    Outcome,
    Settled,
    StepContext,
    StepFailed,
    describe_failure,
    execute_activity,
)
from llmmixer.workflows.steps.budget import budget_gate

__all__ = ["MAX_CHILD_OUTPUT_CHARS", "TurnAsker", "run_tool_loop"]

# A child spec's output as the model reads it; its whole output is in the
# child workflow's result.
MAX_CHILD_OUTPUT_CHARS = 64 * 1024
# Arguments kept in the step's record; the whole call is in history.
_MAX_RECORDED_ARGUMENT_CHARS = 2048
# Errors the worker raises by policy: the step fails rather than the model retrying.
_POLICY_REFUSALS = frozenset({ErrorType.COMMAND_REFUSED, ErrorType.MCP_REFUSED})
# MixerWorkflow by name: this package cannot import the workflow class.
_CHILD_WORKFLOW = "MixerWorkflow"

# One model turn: (conversation, system, tools offered, label for the Web UI).
TurnAsker = Callable[
    [list[ChatMessage], str | None, list[ToolDeclaration], str], Awaitable[LlmReply]
]
Compose = Callable[[], tuple[list[ChatMessage], str | None]]


class _Restart(Exception):
    """A person retried the step while a tool call waited: the loop starts again."""


class _Settle(Exception):
    """A person skipped or overrode the step while a tool call waited."""

    def __init__(self, settled: Settled) -> None:
        super().__init__(settled.action)
        self.settled = settled


async def run_tool_loop(
    ctx: StepContext, step: LlmStep, tools: list[Tool], compose: Compose, turn: TurnAsker
) -> Outcome:
    """Turns until the model answers without calling a tool, or ``max_turns`` is reached.

    Raises ``StepFailed`` at ``max_turns`` (the step's ``on_failure`` applies),
    and when the worker refuses a tool by policy.
    """
    while True:
        try:
            return await _loop(ctx, step, tools, compose, turn)
        except _Restart:
            ctx.events.publish(
                EventType.STEP_STARTED, step.id, ctx.state.records[step.id].attempts + 1
            )
        except _Settle as settle:
            return settle.settled


async def _loop(
    ctx: StepContext, step: LlmStep, tools: list[Tool], compose: Compose, turn: TurnAsker
) -> Outcome:
    state = ctx.state
    messages, system = compose()
    state.begin_loop(step.id)
    offered = await _offer(ctx, step, tools)
    conversation = list(messages)
    max_turns = ctx.spec.max_turns(step)
    for number in range(1, max_turns + 1):
        if number > 1:
            # Budgets count every turn: a spent budget holds the loop between turns.
            settled = await budget_gate(ctx, step)
            if settled is not None:
                return settled
        reply = await turn(conversation, system, offered.declarations, f" turn {number}")
        state.note_turn(
            step.id,
            ToolTurn(
                number=number,
                provider=reply.provider,
                model=reply.model,
                usage=reply.usage,
                finish_reason=reply.finish_reason,
                text_chars=len(reply.text),
            ),
        )
        if not reply.tool_calls:
            return Completed(reply.text)
        conversation.append(ChatMessage.tool_request(reply.text, reply.tool_calls))
        results = await _run_turn(ctx, step, number, reply.tool_calls, offered)
        conversation.extend(ChatMessage.tool_result(result) for result in results)
    raise StepFailed(
        f"the model still called tools after {max_turns} turns (max_turns {max_turns}): "
        "raise the step's `max_turns` (up to 100), or ask for fewer steps in the prompt"
    )


async def _offer(ctx: StepContext, step: LlmStep, tools: list[Tool]) -> ToolSet:
    """The step's tools as declarations; each MCP server's tools listed once per loop.

    A dry run lists no MCP server (nothing is started): its offline model
    never calls a tool.
    """
    servers = [tool for tool in tools if isinstance(tool, McpTool)]
    if not servers or ctx.spec.dry_run:
        return tool_set(tools, {})

    async def listed(server: McpTool) -> list[McpToolInfo]:
        options = tool_options(ctx.spec, step, server.timeout_s)
        try:
            result = await execute_activity(
                MCP_LIST_ACTIVITY,
                mcp_list_request(step, server, workflow_id=ctx.state.workflow_id),
                McpListResult,
                options,
                f"{step.id}: list tools of {server.name}",
            )
        except ActivityError as error:
            attempts, message, _ = describe_failure(error, ctx.spec.retry(step))
            ctx.state.count_attempts(step.id, attempts)
            raise StepFailed(f"MCP server `{server.name}`: {message}") from None
        return result.tools

    lists = await asyncio.gather(*(listed(server) for server in servers))
    return tool_set(
        tools, {server.name: found for server, found in zip(servers, lists, strict=True)}
    )


async def _run_turn(
    ctx: StepContext, step: LlmStep, number: int, calls: list[ToolCall], offered: ToolSet
) -> list[ToolResult]:
    """Every call of one turn: approvals first, one by one, then all calls side by side."""
    state = ctx.state
    ready: list[ToolResult | None] = []
    for call in calls:
        state.tool_started(
            step.id,
            number,
            ToolCallNote(
                id=call.id,
                name=call.name,
                arguments=_recorded_arguments(call.arguments),
                started_at=workflow.now(),
            ),
        )
        route = offered.routes.get(call.name)
        problem = _call_problem(call, route, offered)
        if problem is not None:
            ready.append(
                ToolResult(call_id=call.id, name=call.name, content=problem, is_error=True)
            )
        elif route is not None and route_approval(route):
            ready.append(await _approval(ctx, step, number, call))
        else:
            ready.append(None)

    async def one(index: int, call: ToolCall) -> ToolResult:
        done = ready[index]
        if done is not None:
            _ended(ctx, step, number, call, done, duration_ms=0.0)
            return done
        route = offered.routes[call.name]
        return await _run_call(ctx, step, number, call, route)

    outcomes = await asyncio.gather(
        *(one(index, call) for index, call in enumerate(calls)), return_exceptions=True
    )
    results: list[ToolResult] = []
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            # Every call has ended (none is left running); the first failure fails the step.
            raise outcome
        results.append(outcome)
    return results


def _call_problem(call: ToolCall, route: ToolRoute | None, offered: ToolSet) -> str | None:
    """Why ``call`` cannot run at all (the model reads it), or None."""
    if call.error is not None:
        return f"the call was not run: {call.error}"
    if route is None:
        names = ", ".join(sorted(offered.routes)) or "(none)"
        return f"there is no tool named `{call.name}`: call one of {names}"
    return None


async def _approval(
    ctx: StepContext, step: LlmStep, number: int, call: ToolCall
) -> ToolResult | None:
    """Wait for a person's decision on ``call``: None to run it, or the rejection's result."""
    state = ctx.state
    approval = ToolApproval(
        turn=number, call_id=call.id, name=call.name, arguments=_recorded_arguments(call.arguments)
    )
    state.await_tool(step.id, approval)
    ctx.events.publish(
        EventType.STEP_WAITING,
        step.id,
        state.records[step.id].attempts,
        {"tool": call.name, "call_id": call.id, "arguments": approval.arguments},
    )
    while True:
        decision = await ctx.decision(step.id, None)
        if decision is None:  # no timeout: only a decision ends the wait
            continue
        if decision.type == "approve":
            state.tool_decided(step.id, "approved", decision.argument.get("comment"))
            return None
        if decision.type == "reject":
            reason = decision.argument.get("reason") or "no reason given"
            state.tool_decided(step.id, "rejected", reason)
            return ToolResult(
                call_id=call.id,
                name=call.name,
                content=f"a person rejected this call, it did not run: {reason}",
                is_error=True,
            )
        if decision.type == "retry":
            state.tool_decided(step.id, "retried", None)
            raise _Restart()
        # skip / override: the intervention has moved the record.
        raise _Settle(Settled(decision.type))


async def _run_call(
    ctx: StepContext, step: LlmStep, number: int, call: ToolCall, route: ToolRoute
) -> ToolResult:
    spec, state = ctx.spec, ctx.state
    started = workflow.now()
    ctx.events.publish(
        EventType.TOOL_STARTED,
        step.id,
        state.records[step.id].attempts,
        {"turn": number, "call_id": call.id, "tool": call.name},
    )
    summary = f"{step.id}: tool {call.name}"
    duration_ms: float | None = None
    try:
        if isinstance(route, CommandTool):
            ran = await execute_activity(
                TOOL_COMMAND_ACTIVITY,
                tool_run_request(step, route, call, workflow_id=state.workflow_id),
                ToolRunResult,
                tool_options(spec, step, route.timeout_s),
                summary,
            )
            result, duration_ms = ran.as_result(), ran.duration_ms
        elif isinstance(route, SpecTool):
            result = await _run_child(ctx, step, route, call, summary)
        else:
            server, name = route
            ran = await execute_activity(
                MCP_CALL_ACTIVITY,
                mcp_call_request(step, server, name, call, workflow_id=state.workflow_id),
                ToolRunResult,
                tool_options(spec, step, server.timeout_s),
                summary,
            )
            result = ran.as_result().model_copy(update={"name": call.name})
            duration_ms = ran.duration_ms
    except ActivityError as error:
        attempts, message, error_type = describe_failure(error, spec.retry(step))
        if error_type in _POLICY_REFUSALS:
            state.count_attempts(step.id, attempts)
            _ended(ctx, step, number, call, None, duration_ms=None, failed=message)
            raise StepFailed(f"tool `{call.name}`: {message}") from None
        result = ToolResult(
            call_id=call.id, name=call.name, content=f"the tool failed: {message}", is_error=True
        )
    if not duration_ms:
        duration_ms = (workflow.now() - started).total_seconds() * 1000
    _ended(ctx, step, number, call, result, duration_ms=duration_ms)
    return result


async def _run_child(
    ctx: StepContext, step: LlmStep, tool: SpecTool, call: ToolCall, summary: str
) -> ToolResult:
    """A ``spec`` tool: the spec runs as a child MixerWorkflow with the arguments as inputs."""
    try:
        body = child_spec(tool, call.arguments, ctx.spec_body)
    except TypeError as error:
        return ToolResult(call_id=call.id, name=call.name, content=str(error), is_error=True)
    child_id = f"{ctx.state.workflow_id}/{step.id}/{tool.name}-{workflow.uuid4().hex[:12]}"
    try:
        progress = await workflow.execute_child_workflow(
            _CHILD_WORKFLOW,
            args=[body],
            id=child_id,
            task_queue=workflow.info().task_queue,
            result_type=RunProgress,
            static_summary=summary,
        )
    except ChildWorkflowError as error:
        cause = error.cause
        message = str(getattr(cause, "message", None) or cause or error)
        return ToolResult(
            call_id=call.id,
            name=call.name,
            content=f"the spec `{tool.name}` failed ({child_id}): {message}",
            is_error=True,
        )
    output = progress.output or ""
    return ToolResult(
        call_id=call.id,
        name=call.name,
        content=cut_text(output, MAX_CHILD_OUTPUT_CHARS, f"llmmixer audit {child_id}"),
    )


def _ended(
    ctx: StepContext,
    step: LlmStep,
    number: int,
    call: ToolCall,
    result: ToolResult | None,
    *,
    duration_ms: float | None,
    failed: str | None = None,
) -> None:
    state = ctx.state
    chars = len(result.content) if result is not None else 0
    is_error = result.is_error if result is not None else True
    state.tool_ended(
        step.id,
        number,
        call.id,
        result_chars=chars,
        is_error=is_error,
        duration_ms=duration_ms,
        now=workflow.now(),
        failed=failed is not None,
    )
    data: dict[str, Any] = {
        "turn": number,
        "call_id": call.id,
        "tool": call.name,
        "result_chars": chars,
        "is_error": is_error,
        "duration_ms": duration_ms,
        **({"error": failed} if failed is not None else {}),
    }
    ctx.events.publish(EventType.TOOL_ENDED, step.id, state.records[step.id].attempts, data)


def _recorded_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    text = json.dumps(arguments, ensure_ascii=False, sort_keys=True)
    if len(text) <= _MAX_RECORDED_ARGUMENT_CHARS:
        return dict(arguments)
    return {"(cut)": text[:_MAX_RECORDED_ARGUMENT_CHARS]}
