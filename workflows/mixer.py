"""``MixerWorkflow``: the Temporal shell around a run. Nothing else lives here.

Determinism: this module does no I/O and reads no clock but ``workflow.now()``.
Every effect (a provider call, a command) is an activity. The workflow
interprets, the state machine decides: the rules of the run (what may start,
what a person may do, every change of a step's state) are in ``dag.py``;
each kind of step is run by its handler in ``steps/``; what each activity is
called with is in ``calls.py``; validation is in ``validation.py``. This
module holds the signal, update and query handlers, the main loop and
continue-as-new. History is the checkpoint: a finished step is never run
again after a crash because its result is replayed from history.

Compatibility with runs in flight: the names of the workflow, its signals,
updates, query and activities are contract; the order of commands issued for a
given history must never change without ``workflow.patched`` (``patches.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio import workflow
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    is_cancelled_exception,
)

from llmmixer.core.templates import render
from llmmixer.core.validation import SpecError, SpecIssue, parse_spec_shape, validate_spec
from llmmixer.workflows.calls import CHECK_OPTIONS, budget_limits
from llmmixer.workflows.dag import RunState
from llmmixer.workflows.patches import (
    CHECKS_RECORDED_PATCH,
    RELEASE_2026_11_PATCH,
    REUSE_MARKERS_PATCH,
    SEARCH_ON_STATE_PATCH,
    TOOL_LOOP_PATCH,
)
from llmmixer.workflows.search import SEARCH_ATTRIBUTES_PATCH, RunSearch, with_scheduled_time
from llmmixer.workflows.steps.base import EventPublisher, StepContext
from llmmixer.workflows.steps.runner import run_step

# Types that cross the data converter: one class for the worker and every run.
# MixerWorkflow runs outside the sandbox (below) and all of llmmixer.core and
# llmmixer.workflows passes through it anyway (SANDBOX_PASSTHROUGH_MODULES in
# workers/plugin.py), so this block only says which imports must pass through
# under any sandbox. tests/test_determinism.py checks this code statically.
with workflow.unsafe.imports_passed_through():
    from temporalio.contrib.workflow_streams import WorkflowStream, WorkflowStreamState

    from llmmixer.core.contracts import (
        CHECK_SPEC_ACTIVITY,
        EVENTS_TOPIC,
        EventType,
        MixerEvent,
        SpecCheck,
        SpecCheckResult,
    )
    from llmmixer.core.spec import ApprovalStep, DecomposeStep, Spec
    from llmmixer.workflows.carry import (
        CARRIED_EVENT_BYTES,
        DEFAULT_HISTORY_BYTES,
        DEFAULT_HISTORY_EVENTS,
        WAITING_HANDOVER_EVENTS,
        Carried,
    )
    from llmmixer.workflows.records import (
        BudgetLimits,
        BudgetRaise,
        Intervention,
        InterventionOutcome,
        InterventionRequest,
        InterventionType,
        RunProgress,
        RunStatus,
        StepNode,
        StepStatus,
    )

__all__ = ["CHECKS_RECORDED_PATCH", "WAITING_EXTERN", "WORKFLOW_NAME", "MixerWorkflow"]

WORKFLOW_NAME = "MixerWorkflow"
# The worker function a run calls, with its run id and True or False, after
# each change: True when nothing of it runs and it only waits for people (an
# approval, a paused step, a spent budget). A worker that offers it
# (workers.worker.WaitingRunEviction) evicts such runs from its workflow
# cache, so a run that waits for days costs no memory; the decision that
# wakes it replays its history. Calling it issues no command.
WAITING_EXTERN = "llmmixer.waiting_only"


# Outside Temporal's sandbox. Every module it runs already passes through the
# sandbox (workers/plugin.py), so the sandbox guarded little but cost a lot:
# each workflow task entered it once per payload converted (summaries, inputs,
# results), which made a chained step's replay about a third slower than
# without it and kept a waiting run's wake-up above 100 ms. Determinism is
# checked statically instead, on every module the workflow loads
# (tests/test_determinism.py), and by replaying recorded histories
# (tests/test_replay.py). Changing this issues no different command, so runs
# in flight are unaffected either way.
@workflow.defn(name=WORKFLOW_NAME, sandboxed=False)
class MixerWorkflow:
    @workflow.init
    def __init__(
        self,
        spec: dict[str, Any],
        stream_state: WorkflowStreamState | None = None,
        carried: Carried | None = None,
    ) -> None:
        # The stream must be created here (its handlers register at init) so a
        # reader that subscribes the moment the run starts misses nothing.
        self._stream = WorkflowStream(prior_state=stream_state)
        self._events = EventPublisher(self._stream.topic(EVENTS_TOPIC, type=MixerEvent))
        self._spec: Spec | None = None
        self._invalid: str | None = None
        # Here, not in run(): a history without the marker must rebuild this
        # object exactly as the version that recorded it did, before any
        # handler of the first workflow task reads it. A run recorded with
        # the release's patch has every earlier one on and asks none of them
        # (patches.py): each would cost it two history events.
        current = workflow.patched(RELEASE_2026_11_PATCH)
        self._checks_recorded = current or workflow.patched(CHECKS_RECORDED_PATCH)
        # Decided here for the same reason (patches.py): llm steps with tools loop.
        self._tool_loop = current or workflow.patched(TOOL_LOOP_PATCH)
        # Search attributes (LlmmixerState, ...) for runs started from here on.
        search = current or workflow.patched(SEARCH_ATTRIBUTES_PATCH)
        # Memo entries for re-runs and audits (workflows/reuse.py).
        self._reuse_markers = current or workflow.patched(REUSE_MARKERS_PATCH)
        # ... written when the run's state changes, not after every step (patches.py).
        self._search = RunSearch(search, current or workflow.patched(SEARCH_ON_STATE_PATCH))
        # Runs that wait for people on a long history continue as new first.
        self._hand_over_waits = current
        # A scheduled run's time, read from its start event (workflows/search.py).
        spec = with_scheduled_time(spec, workflow.info().typed_search_attributes)
        try:
            # Replay reads only the shape: the rules ran once, when the run
            # started (run() asks the check activity), and history has the verdict.
            self._spec = parse_spec_shape(spec) if self._checks_recorded else validate_spec(spec)
        except SpecError as error:
            self._invalid = str(error)
        self._reset_state(spec)
        self._spec_body = spec
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._continuations = 0
        # A re-run's source outputs (llmmixer rerun) ride in ``carried``, the
        # input's optional part: runs started otherwise have none, so every
        # step runs as it always did. A re-run starts with a ``Carried`` that
        # has no continuation count and nothing to restore.
        self._reuse = carried.reuse if carried is not None else None
        self._fork_of = self._reuse.source if self._reuse is not None else ""
        if carried is not None and carried.continuations > 0 and self._spec is not None:
            self._state.restore(carried.state, carried.prompt_overrides, carried.decisions)
            self._continuations = carried.continuations

    def _reset_state(self, raw: dict[str, Any]) -> None:
        spec_model = self._spec
        self._state = RunState(
            name=spec_model.name if spec_model else str(raw.get("name", "")),
            nodes=[
                StepNode(step.id, step.kind, tuple(step.needs))
                for step in (spec_model.steps if spec_model else [])
            ],
            dry_run=spec_model.dry_run if spec_model else False,
            workflow_id=workflow.info().workflow_id,
        )
        if spec_model is not None:
            budgets = [("", spec_model.budget)] + [
                (step.id, step.budget)
                for step in spec_model.steps
                if isinstance(step, DecomposeStep)
            ]
            for scope, budget in budgets:
                if budget is not None:
                    self._state.set_budget(scope, budget_limits(budget))

    # ---- the run ----------------------------------------------------------

    @workflow.run
    async def run(
        self,
        spec: dict[str, Any],
        stream_state: WorkflowStreamState | None = None,
        carried: Carried | None = None,
    ) -> RunProgress:
        if self._spec is not None and self._checks_recorded and self._continuations == 0:
            # A continuation's spec was checked by the run that started it.
            await self._check_spec(spec)
        if self._spec is None:
            # Raising ApplicationError fails the run itself: a bad spec must not
            # leave the workflow task retrying forever.
            raise ApplicationError(
                f"invalid spec, nothing was started:\n{self._invalid}\n"
                "Fix these (`llmmixer validate SPEC` lists them) and start a new run.",
                type="InvalidSpec",
                non_retryable=True,
            )
        await self._search.check()
        steps = StepContext(
            state=self._state,
            spec=self._spec,
            spec_body=self._spec_body,
            events=self._events,
            checks_recorded=self._checks_recorded,
            reuse=self._reuse,
            markers=self._reuse_markers,
            tool_loop=self._tool_loop,
        )
        if self._continuations == 0:
            self._events.publish(EventType.WORKFLOW_STARTED, data={"name": self._spec.name})
        else:
            self._resume_waiting(steps)
        try:
            await self._drive(steps)
        except (asyncio.CancelledError, CancelledError):
            await self._cancel_running()
            self._state.cancel_unfinished(workflow.now())
            self._state.end(RunStatus.CANCELLED)
            self._finish()
            raise
        except ApplicationError:
            await self._cancel_running()
            self._state.end(RunStatus.FAILED, error=self._state.fatal)
            self._finish()
            raise
        self._state.end(
            RunStatus.COMPLETED,
            output=render(
                self._spec.output, self._spec.inputs, self._state.outputs(), self._state.children()
            )
            if self._spec.output is not None
            else self._state.last_output(),
        )
        self._finish()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._state.progress()

    async def _check_spec(self, raw: dict[str, Any]) -> None:
        """Every rule of validation.py, once, with the verdict recorded in history."""
        try:
            result = await workflow.execute_local_activity(
                CHECK_SPEC_ACTIVITY,
                SpecCheck(spec=raw),
                result_type=SpecCheckResult,
                start_to_close_timeout=CHECK_OPTIONS.start_to_close_timeout,
                retry_policy=CHECK_OPTIONS.retry_policy,
                summary="check the spec",
            )
        except ActivityError as error:
            raise ApplicationError(
                f"the spec could not be checked, nothing was started: {error.cause or error}. "
                "Check that this worker registers llmmixer's check activities "
                "(workers.worker.mixer_worker does), then start a new run.",
                type="SpecCheckFailed",
                non_retryable=True,
            ) from None
        if result.issues:
            issues = [SpecIssue(issue.step, issue.field, issue.message) for issue in result.issues]
            self._invalid = str(SpecError(issues))
            self._spec = None
            self._reset_state(raw)

    async def _drive(self, steps: StepContext) -> None:
        while True:
            self._raise_from_steps()
            if self._history_is_long(steps.spec):
                # No new step starts; once only steps that wait for a person
                # are left, the run continues as new with its state.
                if not self._busy_ids():
                    await self._hand_over("history is long")
            else:
                self._launch_ready(steps)
            if self._state.fatal is not None:
                raise ApplicationError(self._state.fatal, type="StepFailed", non_retryable=True)
            if self._state.all_done() and not self._running_ids():
                return
            if self._waits_on_long_history(steps):
                await self._hand_over("only people are awaited")
            # Progress for the Web UI, published on every change of the state.
            workflow.set_current_details(self._state.summary())
            self._search.update(self._state, self._fork_of)
            self._report_waiting()
            await self._until_changed()

    def _report_waiting(self) -> None:
        """Tell the worker whether this run now only waits for people (``WAITING_EXTERN``)."""
        if workflow.unsafe.is_replaying():
            return  # a replay catches up on the past; only the present state counts
        note = workflow.extern_functions().get(WAITING_EXTERN)
        if note is None:
            return
        running = self._running_ids()
        # A handler still in flight (an update, a watcher's long poll of the
        # event stream) keeps the run in memory: it is being talked to.
        note(
            workflow.info().run_id,
            bool(running) and not self._busy_ids() and workflow.all_handlers_finished(),
        )

    def _raise_from_steps(self) -> None:
        """Re-raise what a step's task let through: the SDK's own errors.

        A step handles every other error itself (the step fails). Sandbox
        restrictions and non-determinism must fail the workflow task so the
        run waits for fixed code; left in a task nobody awaits, they were lost
        and the step stayed running forever.
        """
        for task in self._tasks.values():
            if task.done() and not task.cancelled():
                error = task.exception()
                if error is not None and not is_cancelled_exception(error):
                    raise error

    async def _until_changed(self) -> None:
        """Until the run's state changes or a step's task ends.

        Exactly the points where runs recorded before ``RunState.version``
        existed woke their loop, so their replays issue the same commands.
        """
        seen = self._state.version
        busy = [task for task in self._tasks.values() if not task.done()]
        await workflow.wait_condition(
            lambda: self._state.version != seen or any(task.done() for task in busy)
        )

    def _launch_ready(self, steps: StepContext) -> None:
        for step_id in self._state.ready(self._running_ids(), steps.spec.max_parallel):
            self._state.launch(step_id)
            self._tasks[step_id] = asyncio.create_task(run_step(steps, step_id))

    def _resume_waiting(self, steps: StepContext) -> None:
        """In a continuation: steps that waited for a person wait again."""
        for step_id, record in self._state.records.items():
            if record.status == StepStatus.WAITING:
                self._tasks[step_id] = asyncio.create_task(run_step(steps, step_id, resume=True))

    def _running_ids(self) -> list[str]:
        return [step_id for step_id, task in self._tasks.items() if not task.done()]

    async def _cancel_running(self) -> None:
        self._state.begin_cancel()
        running = [task for task in self._tasks.values() if not task.done()]
        for task in running:
            task.cancel()
        # Step activities are cancelled with WAIT_CANCELLATION_COMPLETED
        # (calls.StepActivityOptions), so awaiting here means processes are
        # dead and streams closed before the run reports itself cancelled.
        await asyncio.gather(*running, return_exceptions=True)

    def _finish(self) -> None:
        self._events.publish(EventType.WORKFLOW_ENDED, data={"status": self._state.status.value})
        workflow.set_current_details(f"{self._state.status.value}: {self._state.summary()}")
        self._search.update(self._state, self._fork_of)

    # ---- long histories: continue as new ------------------------------------

    def _history_is_long(self, spec: Spec) -> bool:
        # Our own bounds rather than the server's suggestion, which comes at a
        # few MB: every continuation cuts the event stream it carries, so it
        # should happen no sooner than needed (the hard limit is 50 MB).
        info = workflow.info()
        limit = spec.continue_as_new_after_events or DEFAULT_HISTORY_EVENTS
        return (
            info.get_current_history_length() >= limit
            or info.get_current_history_size() >= DEFAULT_HISTORY_BYTES
        )

    def _waits_on_long_history(self, steps: StepContext) -> bool:
        """Only people are awaited, and waking the run would replay a long history.

        Continuing as new now lets the wake-up replay the continuation's few
        events instead, and leaves nothing of the run on the worker. Not while
        a wait has a deadline: the continuation would start its clock again.
        """
        waiting = self._running_ids()
        return (
            self._hand_over_waits
            and bool(waiting)
            and not self._busy_ids()
            and not any(self._has_deadline(steps, step_id) for step_id in waiting)
            and workflow.info().get_current_history_length() >= WAITING_HANDOVER_EVENTS
        )

    @staticmethod
    def _has_deadline(steps: StepContext, step_id: str) -> bool:
        """Whether the step's wait ends on its own: an approval's or a pause's timeout."""
        step = steps.step(step_id)
        if isinstance(step, ApprovalStep):
            return step.timeout_s is not None
        return steps.spec.pause_timeout_s(step) is not None

    def _busy_ids(self) -> list[str]:
        """Steps whose activity is in flight (those waiting for a person can be carried).

        A tool loop waiting for a call's approval cannot be carried: its
        conversation lives in this run's history, so it is waited out here.
        """
        return [
            step_id
            for step_id in self._running_ids()
            if self._state.records[step_id].status != StepStatus.WAITING
            or self._state.records[step_id].tool_approval is not None
        ]

    async def _hand_over(self, why: str) -> None:
        waiting = [task for task in self._tasks.values() if not task.done()]
        for task in waiting:
            task.cancel()  # they only wait for a decision; the next run waits again
        await asyncio.gather(*waiting, return_exceptions=True)
        carried = Carried(
            state=self._state.snapshot(),
            prompt_overrides=self._state.prompt_overrides,
            decisions=self._state.decisions,
            continuations=self._continuations + 1,
            reuse=self._reuse,
        )
        workflow.logger.info("%s: continuing as new (run %d)", why, carried.continuations)
        self._stream.truncate(self._events_to_keep_from())
        await self._stream.continue_as_new(lambda stream_state: self._carry(stream_state, carried))

    def _carry(self, stream_state: WorkflowStreamState, carried: Carried) -> list[Any]:
        """The next run's input, built right before it starts.

        Its search attributes are this run's: they are brought up to date
        here, in the workflow task that continues, after every handler ended.
        """
        self._search.before_continue_as_new(self._state, self._fork_of)
        return [self._spec_body, stream_state, carried]

    def _events_to_keep_from(self) -> int:
        """The oldest offset the next run keeps: the newest events within a byte budget.

        The stream's log rides in the continue-as-new input, which must stay
        far below Temporal's payload limit; a reader further behind than this
        starts again from the oldest event kept.
        """
        state = self._stream.get_state()
        keep_from = state.base_offset + len(state.log)
        size = 0
        for index in range(len(state.log) - 1, -1, -1):
            size += len(state.log[index].data)
            if size > CARRIED_EVENT_BYTES:
                break
            keep_from = state.base_offset + index
        return keep_from

    # ---- interventions (public names: docs/interventions.md) -----------------

    @workflow.signal(name="retry")
    async def retry(self, request: InterventionRequest) -> None:
        await self._intervene_from_signal("retry", request)

    @workflow.signal(name="skip")
    async def skip(self, request: InterventionRequest) -> None:
        await self._intervene_from_signal("skip", request)

    @workflow.signal(name="override")
    async def override(self, request: InterventionRequest) -> None:
        await self._intervene_from_signal("override", request)

    @workflow.signal(name="approve")
    async def approve(self, request: InterventionRequest) -> None:
        await self._intervene_from_signal("approve", request)

    @workflow.signal(name="reject")
    async def reject(self, request: InterventionRequest) -> None:
        await self._intervene_from_signal("reject", request)

    @workflow.update(name="retry_step")
    async def retry_step(self, request: InterventionRequest) -> InterventionOutcome:
        return await self._intervene_when_settled("retry", request)

    @workflow.update(name="skip_step")
    async def skip_step(self, request: InterventionRequest) -> InterventionOutcome:
        return await self._intervene_when_settled("skip", request)

    @workflow.update(name="override_step")
    async def override_step(self, request: InterventionRequest) -> InterventionOutcome:
        return await self._intervene_when_settled("override", request)

    @workflow.update(name="approve_step")
    async def approve_step(self, request: InterventionRequest) -> InterventionOutcome:
        return await self._intervene_when_settled("approve", request)

    @workflow.update(name="reject_step")
    async def reject_step(self, request: InterventionRequest) -> InterventionOutcome:
        return await self._intervene_when_settled("reject", request)

    @retry_step.validator
    def _validate_retry(self, request: InterventionRequest) -> None:
        self._validate("retry", request)

    @skip_step.validator
    def _validate_skip(self, request: InterventionRequest) -> None:
        self._validate("skip", request)

    @override_step.validator
    def _validate_override(self, request: InterventionRequest) -> None:
        self._validate("override", request)

    @approve_step.validator
    def _validate_approve(self, request: InterventionRequest) -> None:
        self._validate("approve", request)

    @reject_step.validator
    def _validate_reject(self, request: InterventionRequest) -> None:
        self._validate("reject", request)

    @workflow.query(name="progress")
    def progress(self) -> RunProgress:
        # A query on an evicted waiting run replays it into the cache: it
        # leaves again, as after any other workflow task.
        self._report_waiting()
        return self._state.progress()

    @workflow.update(name="raise_budget")
    def raise_budget(self, request: BudgetRaise) -> BudgetLimits:
        """Raise the spec's budget (or a decompose step's); held steps then start."""
        raised = self._state.raise_budget(request)
        self._events.publish(
            EventType.INTERVENTION_ACCEPTED,
            request.step or None,
            data={"action": "raise_budget", "argument": request.model_dump(exclude_none=True)},
        )
        return raised

    @raise_budget.validator
    def _validate_raise_budget(self, request: BudgetRaise) -> None:
        # Budgets change only through this update, so reading them here is
        # not subject to the one-task lag that step states have.
        refusal = (
            "this run has an invalid spec and never started"
            if self._spec is None
            else self._state.budget_refusal(request)
        )
        if refusal is not None:
            raise ApplicationError(refusal, type="InterventionRefused", non_retryable=True)

    def _static_refusal(self, action: InterventionType, request: InterventionRequest) -> str | None:
        """What makes an intervention wrong whatever the steps' states are."""
        if self._spec is None:
            return "this run has an invalid spec and never started"
        if action == "override" and request.output is None:
            return 'override needs the output to use: {"step": "...", "output": "..."}'
        return self._state.refusal(action, request.step, check_state=False)

    def _validate(self, action: InterventionType, request: InterventionRequest) -> None:
        # Raising in a validator refuses the update before it reaches history.
        # Only state-independent checks belong here: a validator runs before the
        # activity results that arrived in the same workflow task are applied,
        # so the steps' states it sees can be one task behind.
        refusal = self._static_refusal(action, request)
        if refusal is not None:
            raise ApplicationError(refusal, type="InterventionRefused", non_retryable=True)

    async def _settled_refusal(
        self, action: InterventionType, request: InterventionRequest
    ) -> str | None:
        # Let the step coroutines apply this workflow task's activity results
        # first, so the decision is taken on the states a person just saw.
        await workflow.wait_condition(lambda: True)
        return self._static_refusal(action, request) or self._state.refusal(action, request.step)

    async def _intervene_when_settled(
        self, action: InterventionType, request: InterventionRequest
    ) -> InterventionOutcome:
        refusal = await self._settled_refusal(action, request)
        if refusal is not None:
            raise ApplicationError(refusal, type="InterventionRefused", non_retryable=True)
        return self._intervene(action, request)

    async def _intervene_from_signal(
        self, action: InterventionType, request: InterventionRequest
    ) -> None:
        refusal = await self._settled_refusal(action, request)
        if refusal is None:
            self._intervene(action, request)
            return
        # A signal cannot be refused to its sender; it is recorded and ignored.
        argument = request.model_dump(exclude_none=True)
        if request.step in self._state.records:
            self._state.note_refused(
                request.step,
                Intervention(
                    type=action,
                    argument=argument,
                    time=workflow.now(),
                    accepted=False,
                    reason=refusal,
                ),
            )
        self._events.publish(
            EventType.INTERVENTION_REJECTED,
            request.step or None,
            data={"action": action, "argument": argument, "reason": refusal},
        )

    def _intervene(
        self, action: InterventionType, request: InterventionRequest
    ) -> InterventionOutcome:
        outcome = self._state.decide(action, request, workflow.now())
        step_id = request.step
        record = self._state.records[step_id]
        if action == "skip":
            self._events.publish(
                EventType.STEP_SKIPPED, step_id, record.attempts, {"reason": request.reason}
            )
        elif action == "override":
            self._events.publish(EventType.STEP_OVERRIDDEN, step_id, record.attempts, {})
        self._events.publish(
            EventType.INTERVENTION_ACCEPTED,
            step_id,
            record.attempts,
            {"action": action, "argument": record.interventions[-1].argument},
        )
        return outcome
