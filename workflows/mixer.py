"""``MixerWorkflow``: interprets a spec's DAG on Temporal. Nothing else lives here.

Determinism: this module does no I/O and reads no clock but ``workflow.now()``.
Every effect (a provider call, a command) is an activity; the rules of the
run (what may start, what a person may do) are in ``dag.py``; validation is in
``validation.py``. History is the checkpoint: a finished step is never run
again after a crash because its result is replayed from history.

Compatibility with runs in flight: the names of the workflow, its signals,
updates, query and activities are contract; the order of commands issued for a
given history must never change without ``workflow.patched``.
"""

from __future__ import annotations

import asyncio
import builtins
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    RetryState,
    TimeoutError,
)

with workflow.unsafe.imports_passed_through():
    from temporalio.contrib.workflow_streams import WorkflowStream, WorkflowStreamState

    from llmmixer.activities.contracts import (
        AGENT_ACTIVITY,
        EVENTS_TOPIC,
        LLM_ACTIVITY,
        PTY_ACTIVITY,
        AgentCall,
        ChatMessage,
        CommandCall,
        CommandResult,
        ErrorType,
        EventType,
        FailureDetails,
        LlmCall,
        LlmReply,
        MixerEvent,
    )
    from llmmixer.workflows.dag import RunState, StepNode
    from llmmixer.workflows.records import (
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
    from llmmixer.workflows.spec import (
        AgentStep,
        ApprovalStep,
        FallbackTarget,
        LlmStep,
        PtyStep,
        RetrySpec,
        Spec,
    )
    from llmmixer.workflows.templates import render
    from llmmixer.workflows.validation import SpecError, validate_spec

WORKFLOW_NAME = "MixerWorkflow"

# Errors no Temporal retry can fix; the step fails at once and on_failure applies.
_NON_RETRYABLE = [
    ErrorType.REJECTED,
    ErrorType.AUTH,
    ErrorType.COMMAND_REFUSED,
    ErrorType.COMMAND_TIMEOUT,
]


class StepFailed(Exception):
    """A step ended without an output; ``on_failure`` decides what happens next."""


class _InvalidSpec(Exception):
    pass


@workflow.defn(name=WORKFLOW_NAME)
class MixerWorkflow:
    @workflow.init
    def __init__(
        self, spec: dict[str, Any], stream_state: WorkflowStreamState | None = None
    ) -> None:
        # The stream must be created here (its handlers register at init) so a
        # reader that subscribes the moment the run starts misses nothing.
        self._stream = WorkflowStream(prior_state=stream_state)
        self._events = self._stream.topic(EVENTS_TOPIC, type=MixerEvent)
        self._spec: Spec | None = None
        self._invalid: str | None = None
        try:
            self._spec = validate_spec(spec)
        except SpecError as error:
            self._invalid = str(error)
        spec_model = self._spec
        self._state = RunState(
            name=spec_model.name if spec_model else str(spec.get("name", "")),
            nodes=[
                StepNode(step.id, step.kind, tuple(step.needs))
                for step in (spec_model.steps if spec_model else [])
            ],
            dry_run=spec_model.dry_run if spec_model else False,
            workflow_id=workflow.info().workflow_id,
        )
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._decisions: dict[str, Intervention] = {}
        self._prompt_overrides: dict[str, str] = {}
        self._fatal: str | None = None
        self._cancelling = False
        self._changed = False

    # ---- the run ----------------------------------------------------------

    @workflow.run
    async def run(
        self, spec: dict[str, Any], stream_state: WorkflowStreamState | None = None
    ) -> RunProgress:
        if self._spec is None:
            # Raising ApplicationError fails the run itself: a bad spec must not
            # leave the workflow task retrying forever.
            raise ApplicationError(
                f"invalid spec, nothing was started:\n{self._invalid}\n"
                "Fix these (`llmmixer validate SPEC` lists them) and start a new run.",
                type="InvalidSpec",
                non_retryable=True,
            )
        self._publish(EventType.WORKFLOW_STARTED, data={"name": self._spec.name})
        try:
            await self._drive(self._spec)
        except (asyncio.CancelledError, CancelledError):
            await self._cancel_running()
            self._state.cancel_unfinished(workflow.now())
            self._state.status = RunStatus.CANCELLED
            self._finish()
            raise
        except ApplicationError:
            await self._cancel_running()
            self._state.status = RunStatus.FAILED
            self._finish()
            raise
        self._state.status = RunStatus.COMPLETED
        self._state.output = (
            render(self._spec.output, self._spec.inputs, self._state.outputs())
            if self._spec.output is not None
            else self._state.last_output()
        )
        self._finish()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._state.progress()

    async def _drive(self, spec: Spec) -> None:
        while True:
            for step_id in self._state.ready(self._running_ids(), spec.max_parallel):
                # Marked before the task first runs, so a wake-up in between can
                # never launch the same step twice.
                self._state.records[step_id].status = StepStatus.RUNNING
                self._tasks[step_id] = asyncio.create_task(self._run_step(spec, step_id))
            if self._fatal is not None:
                raise ApplicationError(self._fatal, type="StepFailed", non_retryable=True)
            if self._state.all_done() and not self._running_ids():
                return
            workflow.set_current_details(self._state.summary())
            self._changed = False
            await workflow.wait_condition(lambda: self._changed)

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
        self._state.error = self._fatal if self._state.status == RunStatus.FAILED else None
        self._publish(EventType.WORKFLOW_ENDED, data={"status": self._state.status.value})
        workflow.set_current_details(f"{self._state.status.value}: {self._state.summary()}")

    def _touch(self) -> None:
        self._changed = True

    # ---- one step ---------------------------------------------------------

    async def _run_step(self, spec: Spec, step_id: str) -> None:
        step = spec.step(step_id)
        record = self._state.records[step_id]
        try:
            while True:
                record.status = StepStatus.RUNNING
                record.started_at = record.started_at or workflow.now()
                record.error = None
                record.waiting_reason = None
                self._publish(EventType.STEP_STARTED, step_id, record.attempts + 1)
                self._touch()
                try:
                    output = await self._execute(spec, step, record)
                except _Settled:
                    return
                except StepFailed as failure:
                    if self._cancelling:
                        record.status = StepStatus.FAILED
                        record.error = f"cancelled with the run ({failure})"
                        record.ended_at = workflow.now()
                        return
                    if not await self._handle_failure(spec, step, record, str(failure)):
                        return
                    continue  # a person asked for a retry
                self._complete(step_id, record, output)
                return
        finally:
            self._touch()

    def _complete(self, step_id: str, record: StepRecord, output: str) -> None:
        record.status = StepStatus.COMPLETED
        record.output = output
        record.ended_at = workflow.now()
        self._publish(
            EventType.STEP_COMPLETED,
            step_id,
            record.attempts,
            {"output_chars": len(output), "provider": record.provider, "model": record.model},
        )

    async def _handle_failure(self, spec: Spec, step: Any, record: StepRecord, error: str) -> bool:
        """Apply ``on_failure``; True when the step should run again."""
        record.error = error
        policy = spec.on_failure(step)
        if policy == "skip":
            record.status = StepStatus.SKIPPED
            record.skipped_reason = f"failed and on_failure is skip: {error}"
            record.ended_at = workflow.now()
            self._publish(EventType.STEP_SKIPPED, step.id, record.attempts, {"error": error})
            return False
        if policy == "fail":
            record.status = StepStatus.FAILED
            record.ended_at = workflow.now()
            self._publish(EventType.STEP_FAILED, step.id, record.attempts, {"error": error})
            self._fatal = f"step {step.id} failed: {error}"
            return False
        record.status = StepStatus.WAITING
        record.waiting_reason = f"failed: {error}"
        self._publish(EventType.STEP_WAITING, step.id, record.attempts, {"error": error})
        self._touch()
        workflow.set_current_details(self._state.summary())
        timeout = spec.pause_timeout_s(step)
        decision = await self._await_decision(step.id, timeout)
        while decision is not None and decision.type == "reject":
            # Rejecting a paused approval again only updates the reason it waits.
            record.error = f"rejected: {decision.argument.get('reason') or 'no reason given'}"
            record.waiting_reason = f"failed: {record.error}"
            decision = await self._await_decision(step.id, timeout)
        if decision is None:
            record.status = StepStatus.FAILED
            record.ended_at = workflow.now()
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

    async def _execute(self, spec: Spec, step: Any, record: StepRecord) -> str:
        if isinstance(step, LlmStep):
            return await self._call_llm(spec, step, record)
        if isinstance(step, PtyStep):
            return await self._run_command(spec, step, record)
        if isinstance(step, ApprovalStep):
            return await self._await_approval(spec, step, record)
        if isinstance(step, AgentStep):
            return await self._run_agent(spec, step, record)
        raise StepFailed(
            f"kind {step.kind!r} is not supported by this worker's version of llmmixer: "
            "upgrade the workers, then retry this step"
        )

    # ---- kinds ------------------------------------------------------------

    def _render(self, spec: Spec, text: str) -> str:
        return render(text, spec.inputs, self._state.outputs())

    async def _call_llm(self, spec: Spec, step: LlmStep, record: StepRecord) -> str:
        prompt = self._prompt_overrides.get(step.id, step.prompt)
        messages = [
            ChatMessage.model_validate(
                {"role": message["role"], "content": self._render(spec, message["content"])}
            )
            for message in step.messages or []
        ]
        if prompt is not None:
            messages.append(ChatMessage(role="user", content=self._render(spec, prompt)))
        record.prompt = messages[-1].content if messages else None
        primary = FallbackTarget(
            provider=step.provider or spec.defaults.provider or "",
            model=step.model or spec.defaults.model or "",
            base_url=step.base_url,
        )
        chain = [primary, *step.fallback]
        for index, target in enumerate(chain):
            has_next = index < len(chain) - 1
            call = LlmCall(
                workflow_id=workflow.info().workflow_id,
                step_id=step.id,
                provider=target.provider,
                model=target.model,
                messages=messages,
                system=self._render(spec, step.system) if step.system else None,
                max_tokens=step.max_tokens or spec.defaults.max_tokens,
                temperature=step.temperature
                if step.temperature is not None
                else spec.defaults.temperature,
                top_p=step.top_p,
                stop=step.stop,
                response_format=step.response_format,
                json_schema=step.json_schema,
                api=step.api,
                base_url=target.base_url,
                provider_options=step.provider_options,
                timeout_s=spec.timeout_s(step),
                dry_run=spec.dry_run,
                has_fallback=has_next,
            )
            record.provider, record.model = target.provider, target.model
            try:
                reply = await workflow.execute_activity(
                    LLM_ACTIVITY,
                    call,
                    result_type=LlmReply,
                    start_to_close_timeout=timedelta(seconds=spec.timeout_s(step)),
                    heartbeat_timeout=timedelta(seconds=spec.defaults.heartbeat_timeout_s),
                    retry_policy=_retry_policy(spec.retry(step)),
                    cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                    summary=f"{step.id}: {target.provider}/{target.model}",
                )
            except ActivityError as error:
                attempts, message, error_type = _describe_failure(error, spec.retry(step))
                record.attempts += attempts
                if not has_next:
                    raise StepFailed(message) from None
                record.fallbacks.append(
                    FallbackNote(
                        provider=target.provider,
                        model=target.model,
                        error=message,
                        error_type=error_type,
                    )
                )
                self._touch()
                continue
            record.attempts += reply.attempt
            record.provider, record.model = reply.provider, reply.model
            record.usage = record.usage + reply.usage
            record.cost_usd = (
                None
                if reply.cost_usd is None or record.cost_usd is None
                else round(record.cost_usd + reply.cost_usd, 8)
            )
            record.latency_ms = reply.latency_ms
            record.dry_run = reply.dry_run
            if reply.unsent_text:
                self._publish(
                    EventType.STEP_DELTA, step.id, reply.attempt, {"text": reply.unsent_text}
                )
            return reply.text
        raise StepFailed("no provider in the chain answered")  # unreachable: chain is non-empty

    async def _run_command(self, spec: Spec, step: PtyStep, record: StepRecord) -> str:
        call = CommandCall(
            workflow_id=workflow.info().workflow_id,
            step_id=step.id,
            # Each argv element is rendered on its own: a template value can
            # never split into several arguments or reach a shell.
            argv=[self._render(spec, part) for part in step.command],
            cwd=self._render(spec, step.cwd) if step.cwd else None,
            env={key: self._render(spec, value) for key, value in step.env.items()},
            timeout_s=spec.timeout_s(step),
            respond=step.respond,
            stdin=self._render(spec, step.stdin) if step.stdin else None,
            success_codes=step.success_codes,
            max_output_bytes=step.max_output_bytes,
        )
        record.prompt = " ".join(call.argv)
        return await self._command_activity(
            spec, step, record, PTY_ACTIVITY, call, f"{step.id}: {' '.join(call.argv)}"
        )

    async def _run_agent(self, spec: Spec, step: AgentStep, record: StepRecord) -> str:
        call = AgentCall(
            workflow_id=workflow.info().workflow_id,
            step_id=step.id,
            agent=step.agent,
            prompt=self._render(spec, self._prompt_overrides.get(step.id, step.prompt)),
            args=[self._render(spec, part) for part in step.args],
            cwd=self._render(spec, step.cwd) if step.cwd else None,
            env={key: self._render(spec, value) for key, value in step.env.items()},
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
            result = await workflow.execute_activity(
                activity_name,
                call,
                result_type=CommandResult,
                # None: this run's queue. No schedule-to-start timeout, so with
                # no PTY worker polling yet the step waits rather than fails.
                task_queue=spec.pty_task_queue,
                # The command's own timeout_s is enforced by the activity (so it
                # can report the output so far); this is only the backstop.
                start_to_close_timeout=timedelta(seconds=spec.timeout_s(step) + 60),
                heartbeat_timeout=timedelta(seconds=spec.defaults.heartbeat_timeout_s),
                retry_policy=_retry_policy(spec.retry(step)),
                cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                summary=summary[:200],
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

    async def _await_approval(self, spec: Spec, step: ApprovalStep, record: StepRecord) -> str:
        record.attempts += 1
        question = self._render(spec, step.prompt) if step.prompt else f"Approve {step.id}?"
        record.prompt = question
        record.status = StepStatus.WAITING
        record.waiting_reason = f"approval: {question}"
        self._publish(EventType.STEP_WAITING, step.id, record.attempts, {"approval": question})
        self._touch()
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
        # skip / override: applied by the handler; keep the record as it set it.
        raise _Settled()

    # ---- interventions (CONTRACT 6) ----------------------------------------

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
        record = self._state.records.get(request.step)
        if record is not None:
            record.interventions.append(
                Intervention(
                    type=action,
                    argument=argument,
                    time=workflow.now(),
                    accepted=False,
                    reason=refusal,
                )
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
        record.interventions.append(intervention)
        was = record.status
        if action == "retry":
            if request.prompt is not None:
                self._prompt_overrides[step_id] = request.prompt
            if was == StepStatus.FAILED:
                # The step's task has ended; the scheduler starts it again.
                record.status = StepStatus.PENDING
            message = "will run again"
        elif action == "skip":
            record.status = StepStatus.SKIPPED
            record.skipped_reason = request.reason or "skipped by a person"
            record.ended_at = workflow.now()
            self._publish(
                EventType.STEP_SKIPPED, step_id, record.attempts, {"reason": request.reason}
            )
            message = "skipped; its dependants go on with an empty output"
        elif action == "override":
            record.status = StepStatus.COMPLETED
            record.output = request.output or ""
            record.overridden = True
            record.ended_at = workflow.now()
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
        self._touch()
        return InterventionOutcome(
            step=step_id, action=action, status=record.status, message=message
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


class _Settled(StepFailed):
    """The step was skipped or overridden by a person while it waited."""


def _retry_policy(retry: RetrySpec) -> RetryPolicy:
    return RetryPolicy(
        initial_interval=timedelta(seconds=retry.initial_interval_s),
        backoff_coefficient=retry.backoff,
        maximum_interval=timedelta(seconds=retry.max_interval_s),
        maximum_attempts=retry.max_attempts,
        non_retryable_error_types=_NON_RETRYABLE,
    )


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
