"""``kind: approval``: wait for a person's decision (or the step's default after ``timeout_s``)."""

from __future__ import annotations

from llmmixer.core.contracts import EventType
from llmmixer.core.spec import ApprovalStep
from llmmixer.workflows.reuse import APPROVED_MEMO, approval_hash
from llmmixer.workflows.steps.base import Completed, Failed, Outcome, Settled, StepContext


async def await_approval(ctx: StepContext, step: ApprovalStep, *, resumed: bool) -> Outcome:
    """``resumed``: a continuation waits again for a question the run before already asked.

    A rejection is a ``Failed`` outcome: the step's ``on_failure`` applies to it.
    """
    state = ctx.state
    question = ctx.render(step.prompt, step.id) if step.prompt else f"Approve {step.id}?"
    state.note_prompt(step.id, question)
    upstream = {i: text for i, text in state.outputs().items() if i in state.ancestors(step.id)}
    digest = approval_hash(step, question, ctx.spec.inputs, upstream)
    if not resumed:
        # A re-run takes a gate a person approved on the same question and inputs.
        reused = ctx.reuse_or_note_digest(step.id, digest)
        if reused is not None and reused.approval is not None:
            return reused
    state.wait(step.id, f"approval: {question}")
    if not resumed:
        state.count_attempts(step.id, 1)
        ctx.events.publish(
            EventType.STEP_WAITING,
            step.id,
            state.records[step.id].attempts,
            {"approval": question},
        )
    decision = await ctx.decision(step.id, step.timeout_s)
    while decision is not None and decision.type == "retry":
        # Nothing ran yet, so a retry of a pending decision just keeps waiting.
        decision = await ctx.decision(step.id, step.timeout_s)
    if decision is None:
        assert step.timeout_s is not None
        if step.default == "approve":
            return Completed(f"approved by default after {step.timeout_s:g} s without a decision")
        if step.default == "reject":
            return Failed(f"rejected by default after {step.timeout_s:g} s without a decision")
        return Failed(f"no decision within {step.timeout_s:g} s (timeout_s)")
    if decision.type == "approve":
        output = decision.argument.get("comment") or "approved"
        # Only a person's approval is written for later re-runs: a rejected
        # gate, or one approved by its default, asks again.
        ctx.mark(
            APPROVED_MEMO + step.id,
            {
                "call_hash": digest,
                "output": output,
                "time": decision.time.isoformat() if decision.time else None,
            },
        )
        return Completed(output)
    if decision.type == "reject":
        return Failed(f"rejected: {decision.argument.get('reason') or 'no reason given'}")
    # skip / override: the intervention has moved the record.
    return Settled(decision.type)
