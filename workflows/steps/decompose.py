"""``kind: decompose``: ask a planner for steps, check the plan, add its steps to the DAG."""

from __future__ import annotations

import json
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

from llmmixer.core.contracts import (
    CHECK_PLAN_ACTIVITY,
    ChatMessage,
    PlanCheckResult,
)
from llmmixer.core.plans import (
    PlanContext,
    PlanLimits,
    check_plan,
    limits_for,
    plan_request,
    planner_prompt,
)
from llmmixer.core.spec import DecomposeStep
from llmmixer.core.validation import SpecIssue
from llmmixer.workflows.calls import budget_limits, plan_check, target_chain
from llmmixer.workflows.patches import PLAN_FIELDS_PATCH
from llmmixer.workflows.records import StepNode
from llmmixer.workflows.reuse import planner_call, planner_hash
from llmmixer.workflows.steps.base import Completed, Failed, Outcome, StepContext
from llmmixer.workflows.steps.budget import budget_gate
from llmmixer.workflows.steps.llm import ask


async def run_decompose(ctx: StepContext, step: DecomposeStep) -> Outcome:
    """Ask for a plan until one validates, then add its steps to the DAG."""
    settled = await budget_gate(ctx, step)
    if settled is not None:
        return settled
    state = ctx.state
    task = ctx.render(ctx.prompt(step.id, step.prompt), step.id)
    system = ctx.render(step.system, step.id) if step.system else None
    context = PlanContext(
        step_id=step.id,
        limits=_plan_limits(ctx, step),
        spec=ctx.spec,
        taken_ids=frozenset(state.nodes),
        context_ids=tuple(i for i in state.nodes if i in state.ancestors(step.id)),
    )
    first = planner_prompt(task, context, None)
    digest = planner_hash(planner_call(ctx.spec, step, first, system, plan_request(context)))
    reused = ctx.reuse_or_note_digest(step.id, digest)
    if reused is not None:
        planned = _reused_plan(reused.output, context)
        if planned is not None:
            state.note_prompt(step.id, first)
            _adopt(ctx, step, planned)
            return reused
    feedback: str | None = None
    tries = ctx.spec.retry(step).max_attempts
    for _ in range(tries):
        prompt = planner_prompt(task, context, feedback)
        state.note_prompt(step.id, prompt)
        reply = await ask(
            ctx,
            step,
            target_chain(ctx.spec, step),
            [ChatMessage(role="user", content=prompt)],
            system,
            plan=plan_request(context),
        )
        checked = await _check_plan(ctx, reply.text, context)
        if isinstance(checked, Failed):
            return checked
        steps, issues = checked
        if not issues:
            break
        # Retried like any retryable step error, with the validator's
        # message given to the planner.
        feedback = "\n".join(str(issue) for issue in issues)
        state.refuse_plan(step.id, f"plan refused: {feedback}")
    else:
        return Failed(f"no valid plan in {tries} tries; the last one was refused:\n{feedback}")
    _adopt(ctx, step, steps)
    return Completed(json.dumps({"steps": steps}, indent=2))


def _reused_plan(output: str, context: PlanContext) -> list[dict[str, Any]] | None:
    """The plan a source run accepted, from its output; None: plan again.

    The planner's call included the ids taken then; an id taken now too
    (an edited spec added it) would clash, so such a plan is not taken.
    """
    try:
        steps = json.loads(output)["steps"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(steps, list) or not all(
        isinstance(planned, dict) and isinstance(planned.get("id"), str) for planned in steps
    ):
        return None
    if any(planned["id"] in context.taken_ids for planned in steps):
        return None
    return steps


def _adopt(ctx: StepContext, step: DecomposeStep, steps: list[dict[str, Any]]) -> None:
    """The plan's steps join the DAG (a plan accepted now, or reused from a source run)."""
    state = ctx.state
    nodes = [
        StepNode(
            id=planned["id"],
            kind=planned["kind"],
            needs=(*[n for n in planned.get("needs", []) if n != step.id], step.id),
            parent=step.id,
            definition=planned,
        )
        for planned in steps
    ]
    state.accept_plan(step.id, nodes)
    for planned in steps:
        if planned["kind"] == "decompose":
            budget = DecomposeStep.model_validate(planned).budget
            if budget is not None:
                state.set_budget(planned["id"], budget_limits(budget))


async def _check_plan(
    ctx: StepContext, text: str, context: PlanContext
) -> tuple[list[dict[str, Any]], list[SpecIssue]] | Failed:
    """The plan's steps, or why it cannot run: decided once and recorded in history."""
    if not ctx.checks_recorded:
        # A run recorded by an older version checks its plans here, as it
        # did, so its replays decide the same.
        return check_plan(text, context, field_rule=workflow.patched(PLAN_FIELDS_PATCH))
    request = plan_check(ctx.spec_body, text, context)
    try:
        # An activity, not a local one: planners of parallel decompose steps
        # answer together, and local activities that run side by side may
        # resolve in another order on replay than they did (sdk-python#1578);
        # an activity's result has its own place in history.
        result = await workflow.execute_activity(
            CHECK_PLAN_ACTIVITY,
            request,
            result_type=PlanCheckResult,
            start_to_close_timeout=ctx.check_options.start_to_close_timeout,
            retry_policy=ctx.check_options.retry_policy,
            summary=f"{context.step_id}: check the plan",
        )
    except ActivityError as error:
        return Failed(f"the plan could not be checked: {error.cause or error}")
    return result.steps, [SpecIssue(i.step, i.field, i.message) for i in result.issues]


def _plan_limits(ctx: StepContext, step: DecomposeStep) -> PlanLimits:
    """``step``'s limits under those of every plan above it."""
    parent: PlanLimits | None = None
    for above in reversed(ctx.state.lineage(step.id)):
        model = ctx.step(above)
        if isinstance(model, DecomposeStep):  # only a decompose step has a plan
            parent = limits_for(model, parent)
    return limits_for(step, parent)
