"""The checks whose verdict a run records: its spec at the start, each plan.

``MixerWorkflow`` runs the spec check as a local activity (on the worker that
runs the workflow, before anything else, so an invalid spec fails the run at
once) and each plan check as an activity on the run's task queue. Either way
the verdict is in the run's history, and a replay reads it instead of
running the rules again: the rules in ``core/validation.py`` and
``core/plans.py`` may be tightened in any release (security work
does) without turning runs in flight into non-determinism errors.

A check never raises for what it reads: a document it cannot even walk (too
deeply nested, say) is reported as an issue like any other, so a hostile
spec fails the run and a hostile plan goes back to its planner.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from temporalio import activity

from llmmixer.core.contracts import (
    CHECK_PLAN_ACTIVITY,
    CHECK_SPEC_ACTIVITY,
    CheckIssue,
    PlanCheck,
    PlanCheckResult,
    SpecCheck,
    SpecCheckResult,
)
from llmmixer.core.plans import PLAN_LOCATION, PlanContext, PlanLimits, check_plan
from llmmixer.core.spec import Spec
from llmmixer.core.validation import SPEC_LOCATION, SpecIssue, find_issues

__all__ = ["CHECK_ACTIVITIES", "check_plan_activity", "check_spec_activity"]

log = logging.getLogger("llmmixer.checks")


@activity.defn(name=CHECK_SPEC_ACTIVITY)
async def check_spec_activity(request: SpecCheck) -> SpecCheckResult:
    """Every issue of the spec a run was started with (none: it may run)."""
    # Off the event loop: a large spec must not stall the worker's other runs.
    return await asyncio.to_thread(_check_spec, request)


@activity.defn(name=CHECK_PLAN_ACTIVITY)
async def check_plan_activity(request: PlanCheck) -> PlanCheckResult:
    """A planner's reply checked against its decompose step's limits and the run."""
    return await asyncio.to_thread(_check_plan, request)


# What every worker polling a run's task queue registers (workers/worker.py).
CHECK_ACTIVITIES: tuple[Callable[..., object], ...] = (check_spec_activity, check_plan_activity)


def _check_spec(request: SpecCheck) -> SpecCheckResult:
    issues = _guarded(lambda: list(find_issues(request.spec)), SPEC_LOCATION)
    return SpecCheckResult(issues=_contract(issues))


def _check_plan(request: PlanCheck) -> PlanCheckResult:
    found: list[dict[str, object]] = []

    def run() -> list[SpecIssue]:
        context = PlanContext(
            step_id=request.step_id,
            limits=PlanLimits(
                max_steps=request.limits.max_steps,
                max_depth=request.limits.max_depth,
                kinds=tuple(request.limits.kinds),
                fields=tuple(request.limits.fields),
            ),
            spec=Spec.model_validate(request.spec),
            taken_ids=frozenset(request.taken_ids),
            context_ids=tuple(request.context_ids),
        )
        steps, issues = check_plan(request.text, context)
        found.extend(steps)
        return issues

    issues = _guarded(run, PLAN_LOCATION)
    return PlanCheckResult(steps=[] if issues else found, issues=_contract(issues))


def _guarded(check: Callable[[], list[SpecIssue]], where: str) -> list[SpecIssue]:
    """The check's issues; an error while checking is an issue too, never a retry."""
    try:
        return check()
    except RecursionError:
        return [SpecIssue(where, "(document)", "nested too deeply to check: flatten the document")]
    except Exception as error:  # a rule's bug must refuse the document, not pass it
        log.exception("checking a %s failed", where)
        return [
            SpecIssue(
                where,
                "(document)",
                f"could not be checked ({type(error).__name__}: {str(error)[:200]}); "
                "simplify it, and report this to the llmmixer maintainers",
            )
        ]


def _contract(issues: Iterable[SpecIssue]) -> list[CheckIssue]:
    return [CheckIssue(step=i.step, field=i.field, message=i.message) for i in issues]
