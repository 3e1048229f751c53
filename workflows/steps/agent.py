"""``kind: agent``: a coding agent's command on a terminal worker."""

from __future__ import annotations

from temporalio import workflow

from llmmixer.core.contracts import AGENT_ACTIVITY
from llmmixer.core.spec import AgentStep
from llmmixer.workflows.calls import agent_call
from llmmixer.workflows.patches import AGENT_BUDGET_GATE_PATCH
from llmmixer.workflows.steps.base import Outcome, StepContext
from llmmixer.workflows.steps.budget import budget_gate
from llmmixer.workflows.steps.command import command_activity


async def run_agent(ctx: StepContext, step: AgentStep) -> Outcome:
    # An agent spends on its own provider account, so a spent budget holds
    # it too. Runs recorded before this gate existed started agent steps
    # regardless; the patch marker keeps their replays on that path.
    if ctx.checks_recorded or workflow.patched(AGENT_BUDGET_GATE_PATCH):
        settled = await budget_gate(ctx, step)
        if settled is not None:
            return settled
    call = agent_call(
        ctx.spec,
        step,
        ctx.prompt(step.id, step.prompt),
        lambda text: ctx.render(text, step.id),
        workflow_id=ctx.state.workflow_id,
    )
    ctx.state.note_prompt(step.id, call.prompt)
    reused = ctx.reuse_or_note(step.id, call)
    if reused is not None:
        return reused
    return await command_activity(ctx, step, AGENT_ACTIVITY, call, f"{step.id}: {step.agent}")
