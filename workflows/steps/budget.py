"""The budget gate: a step whose budget is spent waits before it spends more."""

from __future__ import annotations

from temporalio import workflow

from llmmixer.core.contracts import EventType
from llmmixer.core.spec import AgentStep, DecomposeStep, LlmStep
from llmmixer.workflows.steps.base import Settled, StepContext

# Steps that spend on a provider account.
SpendingStep = LlmStep | DecomposeStep | AgentStep


async def budget_gate(ctx: StepContext, step: SpendingStep) -> Settled | None:
    """Hold ``step`` while its budget is spent, until a person raises it (or settles the step).

    ``Settled``: a person skipped or overrode the step meanwhile; it must not run.
    """
    state = ctx.state
    hold = state.over_budget(step.id)
    if hold is None:
        return None
    state.hold(step.id, hold)
    record = state.records[step.id]
    ctx.events.publish(EventType.STEP_WAITING, step.id, record.attempts, {"budget": hold.reason()})
    while True:
        await workflow.wait_condition(
            lambda: step.id in state.decisions or state.over_budget(step.id) is None
        )
        decision = state.take_decision(step.id)
        if decision is not None and decision.type in ("skip", "override"):
            return Settled(decision.type)  # the intervention has moved the record
        if state.over_budget(step.id) is None:
            break
        # A retry while the budget is still spent changes nothing: keep waiting.
        state.rehold(step.id, state.over_budget(step.id))
    state.resume(step.id)
    ctx.events.publish(EventType.STEP_STARTED, step.id, record.attempts + 1)
    return None
