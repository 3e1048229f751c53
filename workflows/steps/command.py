"""``kind: pty``: run a command on a terminal worker."""

from __future__ import annotations

from temporalio.exceptions import ActivityError

from llmmixer.core.contracts import PTY_ACTIVITY, AgentCall, CommandCall, CommandResult
from llmmixer.core.spec import AgentStep, PtyStep
from llmmixer.workflows.calls import command_call, command_options
from llmmixer.workflows.steps.base import (
    Completed,
    Failed,
    Outcome,
    StepContext,
    describe_failure,
    execute_activity,
)


async def run_command(ctx: StepContext, step: PtyStep) -> Outcome:
    call = command_call(
        ctx.spec,
        step,
        lambda text: ctx.render(text, step.id),
        workflow_id=ctx.state.workflow_id,
    )
    ctx.state.note_prompt(step.id, " ".join(call.argv))
    reused = ctx.reuse_or_note(step.id, call)
    if reused is not None:
        return reused
    return await command_activity(
        ctx, step, PTY_ACTIVITY, call, f"{step.id}: {' '.join(call.argv)}"
    )


async def command_activity(
    ctx: StepContext,
    step: PtyStep | AgentStep,
    activity_name: str,
    call: CommandCall | AgentCall,
    summary: str,
) -> Outcome:
    """Run ``call`` on the spec's terminal queue; what it printed is the step's output."""
    try:
        result = await execute_activity(
            activity_name,
            call,
            CommandResult,
            command_options(ctx.spec, step),
            summary[:200],
        )
    except ActivityError as error:
        attempts, message, _ = describe_failure(error, ctx.spec.retry(step))
        ctx.state.count_attempts(step.id, attempts)
        return Failed(message)
    ctx.state.account_command(step.id, result)
    return Completed(result.output)
