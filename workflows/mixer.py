"""``MixerWorkflow``: interprets a spec's DAG on Temporal. Nothing else lives here.

Determinism: this module does no I/O and reads no clock but ``workflow.now()``.
Every effect (a provider call, a command) is an activity; the rules of the
run (what may start, what a person may do, every change of a step's state)
are in ``dag.py``; what each activity is called with is in ``calls.py``;
validation is in ``validation.py``. History is the checkpoint: a finished step is never run
again after a crash because its result is replayed from history.

Compatibility with runs in flight: the names of the workflow, its signals,
updates, query and activities are contract; the order of commands issued for a
given history must never change without ``workflow.patched``.
"""

from __future__ import annotations

import asyncio
import builtins
import json
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    FailureError,
    RetryState,
    TemporalError,
    TimeoutError,
    is_cancelled_exception,
)

from llmmixer.core.plans import (
    PlanContext,
    PlanLimits,
    check_plan,
    limits_for,
    plan_request,
    planner_prompt,
)
from llmmixer.core.templates import render
from llmmixer.core.validation import (
    SpecError,
    SpecIssue,
    parse_spec_shape,
    validate_spec,
)
from llmmixer.workflows.calls import (
    CHECK_OPTIONS,
    Settled,
    StepActivityOptions,
    StepModel,
    command_options,
    falls_back,
    llm_call,
    llm_options,
    planned_step,
    target_chain,
)
from llmmixer.workflows.carry import (
    CARRIED_EVENT_BYTES,
    DEFAULT_HISTORY_BYTES,
    DEFAULT_HISTORY_EVENTS,
    Carried,
)
from llmmixer.workflows.dag import RunState, StepNode

# Types that cross the data converter: one class for the worker and every run
# (see sandbox_runner in workers/plugin.py). The run's logic above loads
# inside the sandbox, so the sandbox's restrictions apply to it.
with workflow.unsafe.imports_passed_through():
    from temporalio.contrib.workflow_streams import WorkflowStream, WorkflowStreamState

    from llmmixer.core.contracts import (
        AGENT_ACTIVITY,
        CHECK_PLAN_ACTIVITY,
        CHECK_SPEC_ACTIVITY,
        EVENTS_TOPIC,
        LLM_ACTIVITY,
        PTY_ACTIVITY,
        AgentCall,
        ChatMessage,
        CheckIssue,
        CommandCall,
        CommandResult,
        EventType,
        FailureDetails,
        LlmCall,
        LlmReply,
        MixerEvent,
        PlanCheck,
        PlanCheckLimits,
        PlanCheckResult,
        PlanRequest,
        SpecCheck,
        SpecCheckResult,
    )
    from llmmixer.core.spec import (
        AgentStep,
        ApprovalStep,
        Budget,
        DecomposeStep,
        FallbackTarget,
        LlmStep,
        PtyStep,
        RetrySpec,
        Spec,
    )
    from llmmixer.workflows.records import (
        BudgetLimits,
        BudgetRaise,
        Candidate,
        FallbackNote,
        Intervention,
        InterventionOutcome,
        InterventionRequest,
        InterventionType,
        RunProgress,
        RunStatus,
        StepRecord,
        StepStatus,
    )


WORKFLOW_NAME = "MixerWorkflow"

ActivityResult = TypeVar("ActivityResult", LlmReply, CommandResult)

# workflow.patched() ids: each marks a change in which commands a run issues,
# so histories recorded before it still replay. Never rename or reuse one.
#
# A run recorded with CHECKS_RECORDED_PATCH (every run started since) calls no
# other patch: every change below is on for it, and any later change must be
# decided in __init__ too. A patch called later could follow a local activity,
# and replay may resolve a local activity one workflow task earlier than the
# run did (when a query arrived meanwhile), before the marker that task wrote
# is known: the patch would then read as absent and the replay fail.
AGENT_BUDGET_GATE_PATCH = "agent-steps-budget-gated"
# A run checks its spec once, in a local activity at its start, and each plan
# in an activity: history records every verdict, so a replay never re-runs
# rules that a release tightened; __init__ then reads only the spec's shape.
# Histories recorded before keep validating in the workflow.
CHECKS_RECORDED_PATCH = "checks-recorded"
# Histories recorded before CHECKS_RECORDED_PATCH check plans in the workflow;
# from their first plan check after this marker on, plans there may not set
# the fields `allow_fields` guards either.
PLAN_FIELDS_PATCH = "plans-refuse-unlisted-fields"
# An unexpected error while running a step fails that step (its on_failure
# applies) instead of ending its task and leaving it `running` for ever.
STEP_ERRORS_PATCH = "step-errors-fail-the-step"


class StepFailed(Exception):
    """A step ended without an output; ``on_failure`` decides what happens next."""


@workflow.defn(name=WORKFLOW_NAME)
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
        self._events = self._stream.topic(EVENTS_TOPIC, type=MixerEvent)
        self._spec: Spec | None = None
        self._invalid: str | None = None
        # Here, not in run(): a history without the marker must rebuild this
        # object exactly as the version that recorded it did, before any
        # handler of the first workflow task reads it.
        self._checks_recorded = workflow.patched(CHECKS_RECORDED_PATCH)
        try:
            # Replay reads only the shape: the rules ran once, when the run
            # started (run() asks the check activity), and history has the verdict.
            self._spec = parse_spec_shape(spec) if self._checks_recorded else validate_spec(spec)
        except SpecError as error:
            self._invalid = str(error)
        self._reset_state(spec)
        # Steps created by plans, parsed once from their nodes' definitions.
        self._planned: dict[str, StepModel] = {}
        self._spec_body = spec
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._decisions: dict[str, Intervention] = {}
        self._prompt_overrides: dict[str, str] = {}
        self._continuations = 0
        # Approval steps of a continuation that were already waiting: their
        # attempt was counted by the run before.
        self._resumed_approvals: set[str] = set()
        if carried is not None and self._spec is not None:
            self._state.restore(carried.state)
            self._prompt_overrides = dict(carried.prompt_overrides)
            self._decisions = dict(carried.decisions)
            self._continuations = carried.continuations
        self._fatal: str | None = None
        self._cancelling = False

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
            self._set_budget("", spec_model.budget)
            for step in spec_model.steps:
                if isinstance(step, DecomposeStep):
                    self._set_budget(step.id, step.budget)

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
        if self._continuations == 0:
            self._publish(EventType.WORKFLOW_STARTED, data={"name": self._spec.name})
        else:
            self._resume_waiting(self._spec)
        try:
            await self._drive(self._spec)
        except (asyncio.CancelledError, CancelledError):
            await self._cancel_running()
            self._state.cancel_unfinished(workflow.now())
            self._state.end(RunStatus.CANCELLED)
            self._finish()
            raise
        except ApplicationError:
            await self._cancel_running()
            self._state.end(RunStatus.FAILED, error=self._fatal)
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
            self._invalid = str(SpecError([_spec_issue(issue) for issue in result.issues]))
            self._spec = None
            self._reset_state(raw)

    async def _drive(self, spec: Spec) -> None:
        while True:
            self._raise_from_steps()
            if self._history_is_long(spec):
                # No new step starts; once only steps that wait for a person
                # are left, the run continues as new with its state.
                if not self._busy_ids():
                    await self._hand_over()
            else:
                self._launch_ready(spec)
            if self._fatal is not None:
                raise ApplicationError(self._fatal, type="StepFailed", non_retryable=True)
            if self._state.all_done() and not self._running_ids():
                return
            workflow.set_current_details(self._state.summary())
            await self._until_changed()

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

    def _launch_ready(self, spec: Spec) -> None:
        for step_id in self._state.ready(self._running_ids(), spec.max_parallel):
            self._state.launch(step_id)
            self._tasks[step_id] = asyncio.create_task(self._run_step(spec, step_id))

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

    def _busy_ids(self) -> list[str]:
        """Steps whose activity is in flight (those waiting for a person can be carried)."""
        return [
            step_id
            for step_id in self._running_ids()
            if self._state.records[step_id].status != StepStatus.WAITING
        ]

    async def _hand_over(self) -> None:
        waiting = [task for task in self._tasks.values() if not task.done()]
        for task in waiting:
            task.cancel()  # they only wait for a decision; the next run waits again
        await asyncio.gather(*waiting, return_exceptions=True)
        carried = Carried(
            state=self._state.snapshot(),
            prompt_overrides=self._prompt_overrides,
            decisions=self._decisions,
            continuations=self._continuations + 1,
        )
        workflow.logger.info("history is long: continuing as new (run %d)", carried.continuations)
        self._stream.truncate(self._events_to_keep_from())
        await self._stream.continue_as_new(
            lambda stream_state: [self._spec_body, stream_state, carried]
        )

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

    def _resume_waiting(self, spec: Spec) -> None:
        """In a continuation: steps that waited for a person wait again."""
        for step_id, record in self._state.records.items():
            if record.status == StepStatus.WAITING:
                self._tasks[step_id] = asyncio.create_task(
                    self._run_step(spec, step_id, resume=True)
                )

    def _running_ids(self) -> list[str]:
        return [step_id for step_id, task in self._tasks.items() if not task.done()]

    async def _cancel_running(self) -> None:
        self._cancelling = True
        running = [task for task in self._tasks.values() if not task.done()]
        for task in running:
            task.cancel()
        # Activities are cancelled with WAIT_CANCELLATION_COMPLETED below, so
        # awaiting here means processes are dead and streams closed before the
        # run reports itself cancelled.
        await asyncio.gather(*running, return_exceptions=True)

    def _finish(self) -> None:
        self._publish(EventType.WORKFLOW_ENDED, data={"status": self._state.status.value})
        workflow.set_current_details(f"{self._state.status.value}: {self._state.summary()}")

    # ---- one step ---------------------------------------------------------

    async def _run_step(self, spec: Spec, step_id: str, resume: bool = False) -> None:
        # The loop in _drive wakes when this task ends, however it ends.
        record = self._state.records[step_id]
        while True:
            try:
                await self._attempt(spec, step_id, record, resume)
                return
            except Exception as error:
                # Histories recorded before the patch left such a step
                # running; their replays must do the same.
                if _belongs_to_temporal(error) or not (
                    self._checks_recorded or workflow.patched(STEP_ERRORS_PATCH)
                ):
                    raise
                if not await self._fail_unexpectedly(spec, step_id, record, error):
                    return
                resume = False  # a person asked for a retry

    async def _fail_unexpectedly(
        self, spec: Spec, step_id: str, record: StepRecord, error: Exception
    ) -> bool:
        """A bug, or a plan the workflow could not handle, fails the step; True: retry it.

        Without this the step's task would end with the error and the step
        would stay `running` for ever, holding up everything after it.
        """
        detail = " ".join(str(error).split())
        reason = (
            f"llmmixer could not run this step ({type(error).__name__}"
            f"{': ' + detail[:300] if detail else ''}); retry or skip it, and report this "
            "to the llmmixer maintainers"
        )
        workflow.logger.error("step %s: %s", step_id, reason, exc_info=error)
        if self._cancelling:
            self._state.cancel(step_id, workflow.now(), reason)
            return False
        try:
            step = self._step(spec, step_id)
        except Exception as unreadable:
            if _belongs_to_temporal(unreadable):
                raise
            # Its definition is what failed: the spec's defaults decide.
            step = ApprovalStep.model_construct(id=step_id)
        try:
            return await self._handle_failure(spec, step, record, reason)
        except Exception as again:
            if _belongs_to_temporal(again):
                raise
            # Set first: even if the step cannot be marked failed, the run fails.
            self._fatal = f"step {step_id} failed: {reason}"
            self._state.fail(step_id, workflow.now(), reason)
            return False

    async def _attempt(self, spec: Spec, step_id: str, record: StepRecord, resume: bool) -> None:
        """Run the step until it settles; ``on_failure`` applies to each StepFailed."""
        step = self._step(spec, step_id)
        if resume and record.kind == "approval" and not record.error:
            self._resumed_approvals.add(step_id)
        elif resume and (
            record.budget_hold is not None
            # Records carried over by a continue-as-new from before
            # budget_hold existed say it only in words.
            or (record.waiting_reason or "").startswith("budget:")
        ):
            pass  # held by a budget: its gate holds it again, and raise_budget frees it
        elif resume and not await self._pause(spec, step, record, record.error or "", False):
            return  # decided while it waited again; nothing more to run
        while True:
            self._state.start(step_id, workflow.now())
            if step_id not in self._resumed_approvals:
                self._publish(EventType.STEP_STARTED, step_id, record.attempts + 1)
            try:
                output = await self._execute(spec, step, record)
            except StepFailed as failure:
                if self._cancelling:
                    self._state.cancel(step_id, workflow.now(), str(failure))
                    return
                if not await self._handle_failure(spec, step, record, str(failure)):
                    return
                continue  # a person asked for a retry
            if not isinstance(output, Settled):
                self._complete(step_id, record, output)
            return

    def _complete(self, step_id: str, record: StepRecord, output: str) -> None:
        self._state.complete(step_id, output, workflow.now())
        self._publish(
            EventType.STEP_COMPLETED,
            step_id,
            record.attempts,
            {"output_chars": len(output), "provider": record.provider, "model": record.model},
        )

    async def _handle_failure(
        self, spec: Spec, step: StepModel, record: StepRecord, error: str
    ) -> bool:
        """Apply ``on_failure``; True when the step should run again."""
        policy = spec.on_failure(step)
        if policy == "skip":
            self._state.skip(
                step.id, f"failed and on_failure is skip: {error}", workflow.now(), error=error
            )
            self._publish(EventType.STEP_SKIPPED, step.id, record.attempts, {"error": error})
            return False
        if policy == "fail":
            self._state.fail(step.id, workflow.now(), error)
            self._publish(EventType.STEP_FAILED, step.id, record.attempts, {"error": error})
            self._fatal = f"step {step.id} failed: {error}"
            return False
        return await self._pause(spec, step, record, error, True)

    async def _pause(
        self, spec: Spec, step: StepModel, record: StepRecord, error: str, announce: bool
    ) -> bool:
        """Wait for a person after a failure; True when they asked for a retry."""
        if announce:
            self._state.wait(step.id, f"failed: {error}", error=error)
            self._publish(EventType.STEP_WAITING, step.id, record.attempts, {"error": error})
            workflow.set_current_details(self._state.summary())
        timeout = spec.pause_timeout_s(step)
        decision = await self._await_decision(step.id, timeout)
        while decision is not None and decision.type == "reject":
            # Rejecting a paused approval again only updates the reason it waits.
            rejected = f"rejected: {decision.argument.get('reason') or 'no reason given'}"
            self._state.rewait(step.id, f"failed: {rejected}", error=rejected)
            decision = await self._await_decision(step.id, timeout)
        if decision is None:
            self._state.fail(step.id, workflow.now())
            self._fatal = (
                f"step {step.id} waited {timeout:g} s for a person (pause_timeout_s) "
                f"after it failed: {error}"
            )
            self._publish(EventType.STEP_FAILED, step.id, record.attempts, {"error": self._fatal})
            return False
        if decision.type == "retry":
            return True
        if decision.type == "approve":
            self._complete(step.id, record, decision.argument.get("comment") or "approved")
        # skip and override were applied to the record by the handler.
        return False

    async def _await_decision(self, step_id: str, timeout_s: float | None) -> Intervention | None:
        try:
            await workflow.wait_condition(
                lambda: step_id in self._decisions,
                timeout=timedelta(seconds=timeout_s) if timeout_s else None,
                timeout_summary=f"pause timeout of step {step_id}",
            )
        except builtins.TimeoutError:
            return None
        return self._decisions.pop(step_id)

    async def _execute(self, spec: Spec, step: StepModel, record: StepRecord) -> str | Settled:
        if isinstance(step, LlmStep):
            return await self._call_llm(spec, step, record)
        if isinstance(step, PtyStep):
            return await self._run_command(spec, step, record)
        if isinstance(step, ApprovalStep):
            return await self._await_approval(spec, step, record)
        if isinstance(step, AgentStep):
            return await self._run_agent(spec, step, record)
        if isinstance(step, DecomposeStep):
            return await self._decompose(spec, step, record)
        raise StepFailed(
            f"kind {step.kind!r} is not supported by this worker's version of llmmixer: "
            "upgrade the workers, then retry this step"
        )

    # ---- kinds ------------------------------------------------------------

    def _render(self, spec: Spec, text: str, step_id: str | None = None) -> str:
        outputs = self._state.outputs()
        if step_id is not None:
            # Only what the step waited for: a `join` must not depend on which
            # unrelated steps happened to finish first.
            scope = self._state.ancestors(step_id)
            outputs = {i: text for i, text in outputs.items() if i in scope}
        return render(text, spec.inputs, outputs, self._state.children())

    def _step(self, spec: Spec, step_id: str) -> StepModel:
        """The step's model: from the spec, or from the plan that created it."""
        node = self._state.nodes.get(step_id)
        if node is None or node.definition is None:
            return spec.step(step_id)
        if step_id not in self._planned:
            self._planned[step_id] = planned_step(node.kind, node.definition)
        return self._planned[step_id]

    async def _call_llm(self, spec: Spec, step: LlmStep, record: StepRecord) -> str | Settled:
        settled = await self._budget_gate(step, record)
        if settled is not None:
            return settled
        prompt = self._prompt_overrides.get(step.id, step.prompt)
        messages = [
            ChatMessage.model_validate(
                {
                    "role": message["role"],
                    "content": self._render(spec, message["content"], step.id),
                }
            )
            for message in step.messages or []
        ]
        if prompt is not None:
            messages.append(ChatMessage(role="user", content=self._render(spec, prompt, step.id)))
        record.prompt = messages[-1].content if messages else None
        system = self._render(spec, step.system, step.id) if step.system else None
        if step.best_of is not None:
            return await self._best_of(spec, step, record, messages, system)
        reply = await self._ask(spec, step, record, target_chain(spec, step), messages, system)
        return reply.text

    async def _ask(
        self,
        spec: Spec,
        step: LlmStep | DecomposeStep,
        record: StepRecord,
        chain: list[FallbackTarget],
        messages: list[ChatMessage],
        system: str | None,
        *,
        plan: PlanRequest | None = None,
        label: str = "",
        track: bool = True,
    ) -> LlmReply:
        """One answer through ``chain`` (primary, then fallbacks), accounted on ``record``.

        With ``track=False`` (best_of candidates, which run side by side) the
        record's provider/model/latency are left for the caller to set.
        """
        for index, target in enumerate(chain):
            has_next = index < len(chain) - 1
            call = llm_call(
                spec,
                step,
                target,
                messages,
                system,
                workflow_id=workflow.info().workflow_id,
                has_fallback=has_next,
                plan=plan,
            )
            if track:
                record.provider, record.model = target.provider, target.model
            try:
                reply = await self._execute_activity(
                    LLM_ACTIVITY,
                    call,
                    LlmReply,
                    llm_options(spec, step),
                    f"{step.id}{label}: {target.provider}/{target.model}",
                )
            except ActivityError as error:
                attempts, message, error_type = _describe_failure(error, spec.retry(step))
                record.attempts += attempts
                if not has_next or not falls_back(step, error_type):
                    raise StepFailed(message) from None
                self._state.note_fallback(
                    step.id,
                    FallbackNote(
                        provider=target.provider,
                        model=target.model,
                        error=message,
                        error_type=error_type,
                    ),
                )
                continue
            record.attempts += reply.attempt
            record.usage = record.usage + reply.usage
            record.cost_usd = (
                None
                if reply.cost_usd is None or record.cost_usd is None
                else round(record.cost_usd + reply.cost_usd, 8)
            )
            record.dry_run = reply.dry_run
            if track:
                record.provider, record.model = reply.provider, reply.model
                record.latency_ms = reply.latency_ms
                record.finish_reason, record.truncated = reply.finish_reason, reply.truncated
            if reply.unsent_text:
                self._publish(
                    EventType.STEP_DELTA, step.id, reply.attempt, {"text": reply.unsent_text}
                )
            return reply
        raise StepFailed("no provider in the chain answered")  # unreachable: chain is non-empty

    # ---- best_of ------------------------------------------------------------

    async def _best_of(
        self,
        spec: Spec,
        step: LlmStep,
        record: StepRecord,
        messages: list[ChatMessage],
        system: str | None,
    ) -> str:
        """N candidates side by side (one activity each), then a judge picks or merges."""
        assert step.best_of is not None
        best = step.best_of
        own = target_chain(spec, step)
        targets = [
            FallbackTarget.model_validate(best.targets[i % len(best.targets)].model_dump())
            if best.targets
            else own[0]
            for i in range(best.n)
        ]

        async def candidate(number: int, target: FallbackTarget) -> Candidate:
            try:
                reply = await self._ask(
                    spec, step, record, [target], messages, system, label=f" #{number}", track=False
                )
            except StepFailed as failure:
                return Candidate(provider=target.provider, model=target.model, error=str(failure))
            return Candidate(
                provider=reply.provider,
                model=reply.model,
                output=reply.text,
                usage=reply.usage,
                cost_usd=reply.cost_usd,
            )

        # gather keeps the candidates in their numbered order whatever order
        # they finish in, so the judge's prompt is the same on every replay.
        self._state.set_candidates(
            step.id, await asyncio.gather(*(candidate(i + 1, t) for i, t in enumerate(targets)))
        )
        answered = [(i + 1, c) for i, c in enumerate(record.candidates) if c.output is not None]
        if not answered:
            errors = "; ".join(f"#{i + 1}: {c.error}" for i, c in enumerate(record.candidates))
            raise StepFailed(f"every best_of candidate failed: {errors}")
        judge = best.judge
        instruction = (
            self._render(spec, judge.prompt, step.id)
            if judge is not None and judge.prompt
            else "Several answers to the same task follow. Pick the best one, or merge the best "
            "parts of them into one answer. Reply with the final answer only."
        )
        task = messages[-1].content if messages else ""
        numbered = "\n\n".join(
            f"### Candidate {number} ({c.provider}/{c.model})\n{c.output}" for number, c in answered
        )
        judge_messages = [
            ChatMessage(role="user", content=f"{instruction}\n\n## Task\n{task}\n\n{numbered}")
        ]
        judge_chain = (
            [FallbackTarget(provider=judge.provider, model=judge.model)] if judge else own[:1]
        )
        reply = await self._ask(
            spec, step, record, judge_chain, judge_messages, None, label=" judge"
        )
        return reply.text

    # ---- decompose ----------------------------------------------------------

    async def _decompose(
        self, spec: Spec, step: DecomposeStep, record: StepRecord
    ) -> str | Settled:
        """Ask for a plan until one validates, then add its steps to the DAG."""
        settled = await self._budget_gate(step, record)
        if settled is not None:
            return settled
        task = self._render(spec, self._prompt_overrides.get(step.id, step.prompt), step.id)
        system = self._render(spec, step.system, step.id) if step.system else None
        context = PlanContext(
            step_id=step.id,
            limits=self._plan_limits(spec, step),
            spec=spec,
            taken_ids=frozenset(self._state.nodes),
            context_ids=tuple(i for i in self._state.nodes if i in self._state.ancestors(step.id)),
        )
        feedback: str | None = None
        tries = spec.retry(step).max_attempts
        for _ in range(tries):
            prompt = planner_prompt(task, context, feedback)
            record.prompt = prompt
            reply = await self._ask(
                spec,
                step,
                record,
                target_chain(spec, step),
                [ChatMessage(role="user", content=prompt)],
                system,
                plan=plan_request(context),
            )
            steps, issues = await self._check_plan(reply.text, context)
            if not issues:
                break
            # Retried like any retryable step error, with the validator's
            # message given to the planner.
            feedback = "\n".join(str(issue) for issue in issues)
            self._state.refuse_plan(step.id, f"plan refused: {feedback}")
        else:
            raise StepFailed(
                f"no valid plan in {tries} tries; the last one was refused:\n{feedback}"
            )
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
        self._state.accept_plan(step.id, nodes)
        for planned in steps:
            if planned["kind"] == "decompose":
                self._set_budget(planned["id"], DecomposeStep.model_validate(planned).budget)
        return json.dumps({"steps": steps}, indent=2)

    async def _check_plan(
        self, text: str, context: PlanContext
    ) -> tuple[list[dict[str, Any]], list[SpecIssue]]:
        """The plan's steps, or why it cannot run: decided once and recorded in history."""
        if not self._checks_recorded:
            # A run recorded by an older version checks its plans here, as it
            # did, so its replays decide the same.
            return check_plan(text, context, field_rule=workflow.patched(PLAN_FIELDS_PATCH))
        limits = context.limits
        request = PlanCheck(
            text=text,
            spec=self._spec_body,
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
        try:
            # An activity, not a local one: planners of parallel decompose steps
            # answer together, and local activities that run side by side may
            # resolve in another order on replay than they did (sdk-python#1578);
            # an activity's result has its own place in history.
            result = await workflow.execute_activity(
                CHECK_PLAN_ACTIVITY,
                request,
                result_type=PlanCheckResult,
                start_to_close_timeout=CHECK_OPTIONS.start_to_close_timeout,
                retry_policy=CHECK_OPTIONS.retry_policy,
                summary=f"{context.step_id}: check the plan",
            )
        except ActivityError as error:
            raise StepFailed(f"the plan could not be checked: {error.cause or error}") from None
        return result.steps, [_spec_issue(issue) for issue in result.issues]

    def _plan_limits(self, spec: Spec, step: DecomposeStep) -> PlanLimits:
        """``step``'s limits under those of every plan above it."""
        parent: PlanLimits | None = None
        for above in reversed(self._state.lineage(step.id)):
            model = self._step(spec, above)
            if isinstance(model, DecomposeStep):  # only a decompose step has a plan
                parent = limits_for(model, parent)
        return limits_for(step, parent)

    # ---- budgets ------------------------------------------------------------

    def _set_budget(self, scope: str, budget: Budget | None) -> None:
        if budget is not None:
            self._state.set_budget(
                scope, BudgetLimits(max_tokens=budget.max_tokens, max_cost_usd=budget.max_cost_usd)
            )

    async def _budget_gate(
        self, step: LlmStep | DecomposeStep | AgentStep, record: StepRecord
    ) -> Settled | None:
        """Hold a step whose budget is spent until a person raises it (or settles the step).

        ``Settled``: a person skipped or overrode the step meanwhile; it must not run.
        """
        hold = self._state.over_budget(step.id)
        if hold is None:
            return None
        self._state.hold(step.id, hold)
        self._publish(EventType.STEP_WAITING, step.id, record.attempts, {"budget": hold.reason()})
        workflow.set_current_details(self._state.summary())
        while True:
            await workflow.wait_condition(
                lambda: step.id in self._decisions or self._state.over_budget(step.id) is None
            )
            decision = self._decisions.pop(step.id, None)
            if decision is not None and decision.type in ("skip", "override"):
                return Settled(decision.type)  # the intervention has moved the record
            if self._state.over_budget(step.id) is None:
                break
            # A retry while the budget is still spent changes nothing: keep waiting.
            self._state.rehold(step.id, self._state.over_budget(step.id))
        self._state.resume(step.id)
        self._publish(EventType.STEP_STARTED, step.id, record.attempts + 1)
        return None

    async def _run_command(self, spec: Spec, step: PtyStep, record: StepRecord) -> str:
        call = CommandCall(
            workflow_id=workflow.info().workflow_id,
            step_id=step.id,
            # Each argv element is rendered on its own: a template value can
            # never split into several arguments or reach a shell.
            argv=[self._render(spec, part, step.id) for part in step.command],
            cwd=self._render(spec, step.cwd, step.id) if step.cwd else None,
            env={key: self._render(spec, value, step.id) for key, value in step.env.items()},
            timeout_s=spec.timeout_s(step),
            respond=step.respond,
            stdin=self._render(spec, step.stdin, step.id) if step.stdin else None,
            success_codes=step.success_codes,
            max_output_bytes=step.max_output_bytes,
        )
        record.prompt = " ".join(call.argv)
        return await self._command_activity(
            spec, step, record, PTY_ACTIVITY, call, f"{step.id}: {' '.join(call.argv)}"
        )

    async def _run_agent(self, spec: Spec, step: AgentStep, record: StepRecord) -> str | Settled:
        # An agent spends on its own provider account, so a spent budget holds
        # it too. Runs recorded before this gate existed started agent steps
        # regardless; the patch marker keeps their replays on that path.
        if self._checks_recorded or workflow.patched(AGENT_BUDGET_GATE_PATCH):
            settled = await self._budget_gate(step, record)
            if settled is not None:
                return settled
        call = AgentCall(
            workflow_id=workflow.info().workflow_id,
            step_id=step.id,
            agent=step.agent,
            prompt=self._render(spec, self._prompt_overrides.get(step.id, step.prompt), step.id),
            args=[self._render(spec, part, step.id) for part in step.args],
            cwd=self._render(spec, step.cwd, step.id) if step.cwd else None,
            env={key: self._render(spec, value, step.id) for key, value in step.env.items()},
            worktree=step.worktree,
            timeout_s=spec.timeout_s(step),
        )
        record.prompt = call.prompt
        return await self._command_activity(
            spec, step, record, AGENT_ACTIVITY, call, f"{step.id}: {step.agent}"
        )

    async def _command_activity(
        self,
        spec: Spec,
        step: PtyStep | AgentStep,
        record: StepRecord,
        activity_name: str,
        call: CommandCall | AgentCall,
        summary: str,
    ) -> str:
        try:
            result = await self._execute_activity(
                activity_name, call, CommandResult, command_options(spec, step), summary[:200]
            )
        except ActivityError as error:
            attempts, message, _ = _describe_failure(error, spec.retry(step))
            record.attempts += attempts
            raise StepFailed(message) from None
        record.attempts += result.attempt
        record.mode = result.mode
        record.exit_code = result.exit_code
        record.latency_ms = result.duration_ms
        return result.output

    async def _await_approval(
        self, spec: Spec, step: ApprovalStep, record: StepRecord
    ) -> str | Settled:
        question = (
            self._render(spec, step.prompt, step.id) if step.prompt else f"Approve {step.id}?"
        )
        record.prompt = question
        self._state.wait(step.id, f"approval: {question}")
        if step.id in self._resumed_approvals:
            self._resumed_approvals.discard(step.id)
        else:
            record.attempts += 1
            self._publish(EventType.STEP_WAITING, step.id, record.attempts, {"approval": question})
        workflow.set_current_details(self._state.summary())
        decision = await self._await_decision(step.id, step.timeout_s)
        while decision is not None and decision.type == "retry":
            # Nothing ran yet, so a retry of a pending decision just keeps waiting.
            decision = await self._await_decision(step.id, step.timeout_s)
        if decision is None:
            assert step.timeout_s is not None
            if step.default == "approve":
                return f"approved by default after {step.timeout_s:g} s without a decision"
            if step.default == "reject":
                raise StepFailed(
                    f"rejected by default after {step.timeout_s:g} s without a decision"
                )
            raise StepFailed(f"no decision within {step.timeout_s:g} s (timeout_s)")
        if decision.type == "approve":
            return decision.argument.get("comment") or "approved"
        if decision.type == "reject":
            raise StepFailed(f"rejected: {decision.argument.get('reason') or 'no reason given'}")
        # skip / override: the intervention has moved the record.
        return Settled(decision.type)

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
        return self._state.progress()

    @workflow.update(name="raise_budget")
    def raise_budget(self, request: BudgetRaise) -> BudgetLimits:
        """Raise the spec's budget (or a decompose step's); held steps then start."""
        limits = self._state.budgets[request.step]
        raised = BudgetLimits(
            max_tokens=request.max_tokens or limits.max_tokens,
            max_cost_usd=request.max_cost_usd
            if request.max_cost_usd is not None
            else limits.max_cost_usd,
        )
        self._state.set_budget(request.step, raised)
        self._publish(
            EventType.INTERVENTION_ACCEPTED,
            request.step or None,
            data={"action": "raise_budget", "argument": request.model_dump(exclude_none=True)},
        )
        return raised

    @raise_budget.validator
    def _validate_raise_budget(self, request: BudgetRaise) -> None:
        # Budgets change only through this update, so reading them here is
        # not subject to the one-task lag that step states have.
        refusal = _budget_refusal(self._state.budgets, request, self._spec is not None)
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
        self._publish(
            EventType.INTERVENTION_REJECTED,
            request.step or None,
            data={"action": action, "argument": argument, "reason": refusal},
        )

    def _intervene(
        self, action: InterventionType, request: InterventionRequest
    ) -> InterventionOutcome:
        step_id = request.step
        record = self._state.records[step_id]
        intervention = Intervention(
            type=action, argument=request.model_dump(exclude_none=True), time=workflow.now()
        )
        self._state.intervene(step_id, intervention)
        was = record.status
        if action == "retry":
            if request.prompt is not None:
                self._prompt_overrides[step_id] = request.prompt
            if was == StepStatus.FAILED:
                # The step's task has ended; the scheduler starts it again.
                self._state.reopen(step_id)
            message = "will run again"
        elif action == "skip":
            self._state.skip(step_id, request.reason or "skipped by a person", workflow.now())
            self._publish(
                EventType.STEP_SKIPPED, step_id, record.attempts, {"reason": request.reason}
            )
            message = "skipped; its dependants go on with an empty output"
        elif action == "override":
            self._state.override(step_id, request.output or "", workflow.now())
            self._publish(EventType.STEP_OVERRIDDEN, step_id, record.attempts, {})
            message = "completed with the given output"
        elif action == "approve":
            message = "approved"
        else:
            message = "rejected; its on_failure policy applies"
        if was in (StepStatus.WAITING, StepStatus.RUNNING):
            self._decisions[step_id] = intervention
        self._publish(
            EventType.INTERVENTION_ACCEPTED,
            step_id,
            record.attempts,
            {"action": action, "argument": intervention.argument},
        )
        return InterventionOutcome(
            step=step_id, action=action, status=record.status, message=message
        )

    async def _execute_activity(
        self,
        activity: str,
        arg: LlmCall | CommandCall | AgentCall,
        result_type: type[ActivityResult],
        options: StepActivityOptions,
        summary: str,
    ) -> ActivityResult:
        return await workflow.execute_activity(
            activity,
            arg,
            result_type=result_type,
            task_queue=options.task_queue,
            start_to_close_timeout=options.start_to_close_timeout,
            heartbeat_timeout=options.heartbeat_timeout,
            retry_policy=options.retry_policy,
            cancellation_type=options.cancellation_type,
            summary=summary,
        )

    # ---- events -----------------------------------------------------------

    def _publish(
        self,
        event_type: EventType,
        step: str | None = None,
        attempt: int | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        self._events.publish(
            MixerEvent(
                type=event_type, step=step, attempt=attempt, time=workflow.now(), data=data or {}
            )
        )


def _budget_refusal(
    budgets: dict[str, BudgetLimits], request: BudgetRaise, valid_spec: bool
) -> str | None:
    """Why ``raise_budget`` cannot apply, or None."""
    if not valid_spec:
        return "this run has an invalid spec and never started"
    where = f"decompose step {request.step!r}" if request.step else "the spec"
    current = budgets.get(request.step)
    if current is None:
        scopes = ", ".join(repr(s) if s else '"" (the spec)' for s in budgets) or "none"
        return f"{where} has no budget to raise (budgets in this run: {scopes})"
    if request.max_tokens is None and request.max_cost_usd is None:
        return 'give max_tokens and/or max_cost_usd: {"max_tokens": 200000}'
    if request.max_tokens is not None and (
        request.max_tokens < 1
        or (current.max_tokens is not None and request.max_tokens <= current.max_tokens)
        or current.max_tokens is None
    ):
        return (
            f"max_tokens must be above the current limit of {where} ({current.max_tokens}); "
            "raise_budget only raises"
        )
    if request.max_cost_usd is not None and (
        request.max_cost_usd <= 0
        or current.max_cost_usd is None
        or request.max_cost_usd <= current.max_cost_usd
    ):
        return (
            f"max_cost_usd must be above the current limit of {where} ({current.max_cost_usd}); "
            "raise_budget only raises"
        )
    return None


def _belongs_to_temporal(error: BaseException) -> bool:
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


def _spec_issue(issue: CheckIssue) -> SpecIssue:
    return SpecIssue(issue.step, issue.field, issue.message)


def _describe_failure(error: ActivityError, retry: RetrySpec) -> tuple[int, str, str | None]:
    """(attempts used, message for people, error type) of a failed activity."""
    cause = error.cause
    attempts = retry.max_attempts if error.retry_state == RetryState.MAXIMUM_ATTEMPTS_REACHED else 1
    if isinstance(cause, ApplicationError):
        if cause.details and isinstance(cause.details[0], dict):
            details = FailureDetails.model_validate(cause.details[0])
            attempts = details.attempt
        return attempts, cause.message, cause.type
    if isinstance(cause, TimeoutError):
        return (
            attempts,
            f"activity timed out ({cause.type.name if cause.type else 'timeout'})",
            "Timeout",
        )
    if isinstance(cause, CancelledError):
        return attempts, "cancelled", "Cancelled"
    return attempts, str(cause or error), None
