"""One step's task: its attempts, its ``on_failure`` policy, and a person's decisions.

``run_step`` is what ``MixerWorkflow`` starts for a step; it hands the step
to the handler of its kind and applies the outcome through ``RunState``.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import FailureError, TemporalError, is_cancelled_exception

from llmmixer.core.contracts import EventType
from llmmixer.core.spec import AgentStep, ApprovalStep, DecomposeStep, LlmStep, PtyStep
from llmmixer.workflows.calls import StepModel
from llmmixer.workflows.patches import STEP_ERRORS_PATCH
from llmmixer.workflows.reuse import REUSED_MEMO
from llmmixer.workflows.steps.agent import run_agent
from llmmixer.workflows.steps.approval import await_approval
from llmmixer.workflows.steps.base import (
    Completed,
    Failed,
    Outcome,
    Reused,
    StepContext,
    StepFailed,
)
from llmmixer.workflows.steps.command import run_command
from llmmixer.workflows.steps.decompose import run_decompose
from llmmixer.workflows.steps.llm import run_llm


async def run_step(ctx: StepContext, step_id: str, *, resume: bool = False) -> None:
    """Run ``step_id`` until it settles: completed, skipped, failed, or handed over.

    ``resume``: in a continuation, the step waited for a person in the run
    before and waits again. The workflow's loop wakes when this task ends,
    however it ends.
    """
    await _StepTask(ctx, step_id).run(resume)


def belongs_to_temporal(error: BaseException) -> bool:
    """Errors a step must let through: cancellation, and the SDK's own.

    Non-determinism, sandbox restrictions, a read-only context, "not in the
    workflow event loop": the SDK raises these (TemporalError, but not a
    FailureError that describes a failed operation) to fail the workflow
    task, and catching them would hide a broken replay. BaseExceptions
    (asyncio.CancelledError, continue-as-new, eviction) never reach an
    ``except Exception``.
    """
    return is_cancelled_exception(error) or (
        isinstance(error, TemporalError) and not isinstance(error, FailureError)
    )


class _StepTask:
    def __init__(self, ctx: StepContext, step_id: str) -> None:
        self.ctx = ctx
        self.state = ctx.state
        self.step_id = step_id
        # A continuation's approval that already asked its question: it is
        # neither announced nor counted again.
        self.resumed_approval = False

    async def run(self, resume: bool) -> None:
        while True:
            try:
                await self._attempt(resume)
                return
            except Exception as error:
                # Histories recorded before the patch left such a step
                # running; their replays must do the same.
                if belongs_to_temporal(error) or not (
                    self.ctx.checks_recorded or workflow.patched(STEP_ERRORS_PATCH)
                ):
                    raise
                if not await self._fail_unexpectedly(error):
                    return
                resume = False  # a person asked for a retry

    async def _attempt(self, resume: bool) -> None:
        """Run the step until it settles; ``on_failure`` applies to each failure."""
        step_id, state = self.step_id, self.state
        step = self.ctx.step(step_id)
        record = state.records[step_id]
        if resume and record.kind == "approval" and not record.error:
            self.resumed_approval = True
        elif resume and (
            record.budget_hold is not None
            # Records carried over by a continue-as-new from before
            # budget_hold existed say it only in words.
            or (record.waiting_reason or "").startswith("budget:")
        ):
            pass  # held by a budget: its gate holds it again, and raise_budget frees it
        elif resume and not await self._pause(step, record.error or "", announce=False):
            return  # decided while it waited again; nothing more to run
        while True:
            state.start(step_id, workflow.now())
            if not self.resumed_approval:
                self.ctx.events.publish(
                    EventType.STEP_STARTED, step_id, state.records[step_id].attempts + 1
                )
            outcome = await self._execute(step)
            if isinstance(outcome, Failed):
                if state.cancelling:
                    state.cancel(step_id, workflow.now(), outcome.error)
                    return
                if not await self._apply_on_failure(step, outcome.error):
                    return
                continue  # a person asked for a retry
            if isinstance(outcome, Completed):
                self._complete(outcome.output)
            elif isinstance(outcome, Reused):
                self._reuse(outcome)
            return

    async def _execute(self, step: StepModel) -> Outcome:
        ctx = self.ctx
        try:
            match step:
                case LlmStep():
                    return await run_llm(ctx, step)
                case PtyStep():
                    return await run_command(ctx, step)
                case ApprovalStep():
                    resumed, self.resumed_approval = self.resumed_approval, False
                    return await await_approval(ctx, step, resumed=resumed)
                case AgentStep():
                    return await run_agent(ctx, step)
                case DecomposeStep():
                    return await run_decompose(ctx, step)
        except StepFailed as failure:
            return Failed(str(failure))
        return Failed(
            f"kind {step.kind!r} is not supported by this worker's version of llmmixer: "
            "upgrade the workers, then retry this step"
        )

    def _complete(self, output: str) -> None:
        self.state.complete(self.step_id, output, workflow.now())
        record = self.state.records[self.step_id]
        self.ctx.events.publish(
            EventType.STEP_COMPLETED,
            self.step_id,
            record.attempts,
            {"output_chars": len(output), "provider": record.provider, "model": record.model},
        )

    def _reuse(self, reused: Reused) -> None:
        self.state.reuse(
            self.step_id, reused.output, reused.source, workflow.now(), reused.approval
        )
        self.ctx.mark(REUSED_MEMO + self.step_id, reused.source)
        self.ctx.events.publish(
            EventType.STEP_COMPLETED,
            self.step_id,
            self.state.records[self.step_id].attempts,
            {"output_chars": len(reused.output), "reused_from": reused.source},
        )

    async def _apply_on_failure(self, step: StepModel, error: str) -> bool:
        """Apply ``on_failure``; True when the step should run again."""
        state, attempts = self.state, self.state.records[step.id].attempts
        policy = self.ctx.spec.on_failure(step)
        if policy == "skip":
            state.skip(
                step.id, f"failed and on_failure is skip: {error}", workflow.now(), error=error
            )
            self.ctx.events.publish(EventType.STEP_SKIPPED, step.id, attempts, {"error": error})
            return False
        if policy == "fail":
            state.fail(step.id, workflow.now(), error)
            self.ctx.events.publish(EventType.STEP_FAILED, step.id, attempts, {"error": error})
            state.doom(f"step {step.id} failed: {error}")
            return False
        return await self._pause(step, error, announce=True)

    async def _pause(self, step: StepModel, error: str, *, announce: bool) -> bool:
        """Wait for a person after a failure; True when they asked for a retry."""
        state, events = self.state, self.ctx.events
        if announce:
            state.wait(step.id, f"failed: {error}", error=error)
            events.publish(
                EventType.STEP_WAITING, step.id, state.records[step.id].attempts, {"error": error}
            )
        timeout = self.ctx.spec.pause_timeout_s(step)
        decision = await self.ctx.decision(step.id, timeout)
        while decision is not None and decision.type == "reject":
            # Rejecting a paused approval again only updates the reason it waits.
            rejected = f"rejected: {decision.argument.get('reason') or 'no reason given'}"
            state.rewait(step.id, f"failed: {rejected}", error=rejected)
            decision = await self.ctx.decision(step.id, timeout)
        if decision is None:
            fatal = (
                f"step {step.id} waited {timeout:g} s for a person (pause_timeout_s) "
                f"after it failed: {error}"
            )
            state.fail(step.id, workflow.now())
            state.doom(fatal)
            events.publish(
                EventType.STEP_FAILED, step.id, state.records[step.id].attempts, {"error": fatal}
            )
            return False
        if decision.type == "retry":
            return True
        if decision.type == "approve":
            self._complete(decision.argument.get("comment") or "approved")
        # skip and override were applied to the record when they were accepted.
        return False

    async def _fail_unexpectedly(self, error: Exception) -> bool:
        """A bug, or a plan the workflow could not handle, fails the step; True: retry it.

        Without this the step's task would end with the error and the step
        would stay `running` for ever, holding up everything after it.
        """
        step_id, state = self.step_id, self.state
        detail = " ".join(str(error).split())
        reason = (
            f"llmmixer could not run this step ({type(error).__name__}"
            f"{': ' + detail[:300] if detail else ''}); retry or skip it, and report this "
            "to the llmmixer maintainers"
        )
        workflow.logger.error("step %s: %s", step_id, reason, exc_info=error)
        if state.cancelling:
            state.cancel(step_id, workflow.now(), reason)
            return False
        step: StepModel
        try:
            step = self.ctx.step(step_id)
        except Exception as unreadable:
            if belongs_to_temporal(unreadable):
                raise
            # Its definition is what failed: the spec's defaults decide.
            step = ApprovalStep.model_construct(id=step_id)
        try:
            return await self._apply_on_failure(step, reason)
        except Exception as again:
            if belongs_to_temporal(again):
                raise
            # Set first: even if the step cannot be marked failed, the run fails.
            state.doom(f"step {step_id} failed: {reason}")
            state.fail(step_id, workflow.now(), reason)
            return False
