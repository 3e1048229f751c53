"""``MixerClient``: start, watch and steer llmmixer runs from Python (docs/README.md).

    from llmmixer.client import MixerClient
    mixer = await MixerClient.connect()
    handle = await mixer.start(spec, inputs={"diff": diff}, workflow_id="review-1")
    async for event in handle.events():
        print(event.offset, event.type, event.step)
    result = await handle.result()

Every intervention goes through the validated update, so a refused one raises
``InterventionRefused`` with the workflow's reason and changes nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from temporalio.client import (
    Client,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.contrib.workflow_streams import WorkflowStreamClient

from llmmixer.client import schedules
from llmmixer.client.files import has_file_inputs, spec_dir, store_inputs
from llmmixer.client.rerun import prepare_rerun, read_source
from llmmixer.client.schedules import MixerSchedule, Overlap
from llmmixer.client.specfile import prepare_spec, read_spec
from llmmixer.core.contracts import EVENTS_TOPIC, MixerEvent
from llmmixer.core.spec import Spec
from llmmixer.runtime.connection import Connection
from llmmixer.runtime.settings import ConnectionEnv
from llmmixer.workflows.carry import Carried
from llmmixer.workflows.mixer import WORKFLOW_NAME, MixerWorkflow
from llmmixer.workflows.records import (
    BudgetLimits,
    BudgetRaise,
    InterventionOutcome,
    InterventionRequest,
    InterventionType,
    ReuseTable,
    RunProgress,
)

InterventionField = Literal["prompt", "reason", "output", "comment"]


@dataclass(frozen=True)
class InterventionKind:
    """One intervention: the workflow's validated update and the text it takes.

    ``field`` is the one ``InterventionRequest`` field the action reads (the
    CLI's ``--<field>`` option, the HTTP body's key); ``required`` when the
    action means nothing without it (an override needs the new output).
    """

    update: Any
    field: InterventionField
    required: bool = False


# The one table of interventions the Python API, the CLI and the HTTP API
# dispatch through, by the workflow's own handler references: a renamed
# handler breaks here at import, not at a user's call. (Any: the SDK's
# overloads of execute_update cannot take a table's value type.)
INTERVENTIONS: Mapping[InterventionType, InterventionKind] = {
    "retry": InterventionKind(MixerWorkflow.retry_step, "prompt"),
    "skip": InterventionKind(MixerWorkflow.skip_step, "reason"),
    "override": InterventionKind(MixerWorkflow.override_step, "output", required=True),
    "approve": InterventionKind(MixerWorkflow.approve_step, "comment"),
    "reject": InterventionKind(MixerWorkflow.reject_step, "reason"),
}


class InterventionIncomplete(ValueError):
    """An intervention without the text it requires (``field``); nothing was sent."""

    def __init__(self, action: InterventionType, field: InterventionField) -> None:
        super().__init__(f"{action} needs {field}: pass the step's new {field} (it may be empty)")
        self.action = action
        self.field = field


class InterventionRefused(Exception):
    """The workflow refused an intervention (unknown step, wrong state); nothing changed."""


class RunFailed(Exception):
    """The run ended failed or cancelled; ``message`` says why."""


class MixerClient:
    def __init__(self, client: Client, task_queue: str, pty_task_queue: str | None = None) -> None:
        self.temporal = client
        self.task_queue = task_queue
        # Where runs started here send PTY and agent steps (the spec's
        # `pty_task_queue` when it has none); read from the caller's
        # environment, as the task queue is, unless given.
        self.pty_task_queue = pty_task_queue or ConnectionEnv.from_env().pty_task_queue

    @classmethod
    async def connect(cls, connection: Connection | None = None) -> MixerClient:
        """Connect with the contract's settings (TEMPORAL_ADDRESS, ..., LLMMIXER_TASK_QUEUE)."""
        connection = connection or Connection.from_env()
        return cls(await connection.connect(), connection.task_queue)

    async def start(
        self,
        spec: Mapping[str, Any] | str | Path,
        *,
        inputs: Mapping[str, Any] | None = None,
        workflow_id: str | None = None,
        dry_run: bool = False,
    ) -> MixerHandle:
        """Validate ``spec`` (a mapping, YAML/JSON text or a file) and start a run.

        A file input (``File.read("a.png")``, ``{"file": "a.png"}`` or
        ``{"file": {"name", "media_type", "data": BASE64}}``) is read, typed by
        its content and put in the payload store; the run gets a reference.
        Raises ``llmmixer.core.validation.SpecError`` listing every problem
        before anything is started.
        """
        body, parsed = await self.prepare(spec, inputs=inputs, dry_run=dry_run)
        return await self.start_prepared(body, parsed, workflow_id=workflow_id)

    async def prepare(
        self,
        spec: Mapping[str, Any] | str | Path,
        *,
        inputs: Mapping[str, Any] | None = None,
        dry_run: bool = False,
        read_paths: bool = True,
    ) -> tuple[dict[str, Any], Spec]:
        """``prepare_spec``, with file inputs stored through this client's converter.

        ``read_paths=False`` (``llmmixer serve``): a file input naming a path
        is refused, never read.
        """
        body = read_spec(spec)
        merged = {**(body.get("inputs") or {}), **(inputs or {})}
        if not has_file_inputs(merged):
            return prepare_spec(body, inputs=inputs, dry_run=dry_run, read_paths=read_paths)
        body["inputs"] = await store_inputs(
            merged,
            self.temporal.data_converter,
            base_dir=spec_dir(spec),
            read_paths=read_paths,
        )
        return prepare_spec(body, dry_run=dry_run, read_paths=read_paths)

    async def start_prepared(
        self,
        body: dict[str, Any],
        parsed: Spec,
        *,
        workflow_id: str | None = None,
        reuse: ReuseTable | None = None,
    ) -> MixerHandle:
        """Start a run from what ``prepare_spec`` returned.

        For callers that validate elsewhere: ``llmmixer serve`` parses and
        validates in a thread, so a slow document never holds its event loop.
        ``reuse``: a re-run's source outputs (``rerun`` builds it).
        """
        if self.pty_task_queue and not parsed.pty_task_queue:
            # Into the spec, so the workflow reads it deterministically.
            body["pty_task_queue"] = self.pty_task_queue
        workflow_id = workflow_id or f"{parsed.name}-{uuid.uuid4().hex[:8]}"
        # A re-run's table rides in the input's optional third part, so runs
        # started without one have the input they always had.
        args: list[Any] = [body] if reuse is None else [body, None, Carried(reuse=reuse)]
        handle = await self.temporal.start_workflow(
            WORKFLOW_NAME,
            args=args,
            id=workflow_id,
            task_queue=self.task_queue,
            static_summary=f"llmmixer: {parsed.name} ({len(parsed.steps)} steps)",
            # Shown by the Temporal CLI and Web UI without decoding the spec.
            memo={"spec": parsed.name, "description": parsed.description or ""},
        )
        # No run id: a long run continues as new under the same workflow id,
        # and queries, updates and results must reach whichever run is current.
        return MixerHandle(self, handle.id)

    async def rerun(
        self,
        workflow_id: str,
        *,
        from_steps: Sequence[str] = (),
        spec: Mapping[str, Any] | str | Path | None = None,
        inputs: Mapping[str, Any] | None = None,
        new_workflow_id: str | None = None,
    ) -> MixerHandle:
        """Start a new run of a closed run's spec (or ``spec``, edited), reusing what is unchanged.

        Every step whose call is the one the source run made takes its output
        from the source's history and costs nothing; ``from_steps`` and the
        steps downstream of them run again whatever their calls are. The
        source may have completed, failed, been cancelled, terminated or timed
        out. Raises ``RerunError`` (an open source, an unknown step) or
        ``SpecError`` before anything starts.
        """
        source = await read_source(self.temporal, workflow_id)
        if inputs and has_file_inputs(inputs):
            inputs = await store_inputs(inputs, self.temporal.data_converter)
        body, parsed, table = prepare_rerun(source, spec=spec, inputs=inputs, from_steps=from_steps)
        return await self.start_prepared(body, parsed, workflow_id=new_workflow_id, reuse=table)

    def get_handle(self, workflow_id: str) -> MixerHandle:
        return MixerHandle(self, workflow_id)

    # ---- schedules (client/schedules.py) -----------------------------------------

    async def create_schedule(
        self,
        name: str,
        spec: Mapping[str, Any] | str | Path,
        *,
        cron: str | Sequence[str],
        inputs: Mapping[str, Any] | None = None,
        overlap: Overlap = "skip",
        paused: bool = False,
        dry_run: bool = False,
    ) -> MixerSchedule:
        """A Temporal Schedule ``name`` that starts a run of ``spec`` at each ``cron`` time.

        The spec is validated now (``SpecError`` lists every problem, nothing
        is created); each run reads its scheduled time as
        ``{{inputs.scheduled_time}}``.
        """
        raw = read_spec(spec)
        merged = {**(raw.get("inputs") or {}), **(inputs or {})}
        if has_file_inputs(merged):
            # Stored once, now: every run the schedule starts reads the same file.
            raw["inputs"] = await store_inputs(
                merged, self.temporal.data_converter, base_dir=spec_dir(spec)
            )
            spec, inputs = raw, None
        body, parsed = schedules.scheduled_spec(spec, inputs, dry_run=dry_run)
        await self.create_schedule_prepared(
            name, body, parsed, cron=cron, overlap=overlap, paused=paused
        )
        return await self.describe_schedule(name)

    async def create_schedule_prepared(
        self,
        name: str,
        body: dict[str, Any],
        parsed: Spec,
        *,
        cron: str | Sequence[str],
        overlap: Overlap = "skip",
        paused: bool = False,
    ) -> None:
        """``create_schedule`` from what ``schedules.scheduled_spec`` returned."""
        if self.pty_task_queue and not parsed.pty_task_queue:
            body["pty_task_queue"] = self.pty_task_queue
        await schedules.create(
            self,
            name,
            body,
            parsed.name,
            len(parsed.steps),
            cron=[cron] if isinstance(cron, str) else list(cron),
            overlap=overlap,
            paused=paused,
            description=parsed.description or "",
        )

    async def list_schedules(self) -> list[MixerSchedule]:
        return await schedules.list_all(self.temporal)

    async def describe_schedule(self, name: str) -> MixerSchedule:
        """Raises ``ScheduleNotFound`` when there is none of that name."""
        return await schedules.describe(self.temporal, name)

    async def pause_schedule(self, name: str, note: str | None = None) -> None:
        await schedules.act(self.temporal, name, "pause", note)

    async def unpause_schedule(self, name: str, note: str | None = None) -> None:
        await schedules.act(self.temporal, name, "unpause", note)

    async def trigger_schedule(self, name: str) -> None:
        """Start a run now, as if it were due (the overlap policy applies)."""
        await schedules.act(self.temporal, name, "trigger")

    async def delete_schedule(self, name: str) -> None:
        """Delete the schedule; runs it started go on."""
        await schedules.act(self.temporal, name, "delete")


class MixerHandle:
    def __init__(self, mixer: MixerClient, workflow_id: str, run_id: str | None = None) -> None:
        self.mixer = mixer
        self.id = workflow_id
        self._handle: WorkflowHandle[Any, RunProgress] = mixer.temporal.get_workflow_handle(
            workflow_id, run_id=run_id, result_type=RunProgress
        )

    @property
    def temporal(self) -> WorkflowHandle[Any, RunProgress]:
        return self._handle

    async def progress(self) -> RunProgress:
        return await self._handle.query(MixerWorkflow.progress)

    async def result(self) -> RunProgress:
        """The final record; raises ``RunFailed`` when the run failed or was cancelled."""
        try:
            return await self._handle.result()
        except WorkflowFailureError as error:
            cause = error.cause
            message = getattr(cause, "message", None) or str(cause or error)
            raise RunFailed(message) from error

    async def rerun(
        self,
        from_steps: Sequence[str] = (),
        spec: Mapping[str, Any] | str | Path | None = None,
        inputs: Mapping[str, Any] | None = None,
    ) -> MixerHandle:
        """A new run of this closed run, reusing unchanged steps (``MixerClient.rerun``)."""
        return await self.mixer.rerun(self.id, from_steps=from_steps, spec=spec, inputs=inputs)

    async def cancel(self) -> None:
        await self._handle.cancel()

    async def retry(self, step: str, prompt: str | None = None) -> InterventionOutcome:
        return await self.intervene("retry", step, prompt)

    async def skip(self, step: str, reason: str | None = None) -> InterventionOutcome:
        return await self.intervene("skip", step, reason)

    async def override(self, step: str, output: str) -> InterventionOutcome:
        return await self.intervene("override", step, output)

    async def approve(self, step: str, comment: str | None = None) -> InterventionOutcome:
        return await self.intervene("approve", step, comment)

    async def reject(self, step: str, reason: str | None = None) -> InterventionOutcome:
        return await self.intervene("reject", step, reason)

    async def intervene(
        self, action: InterventionType, step: str, text: str | None = None
    ) -> InterventionOutcome:
        """Any intervention by name, ``text`` going to its field (``INTERVENTIONS``).

        Raises ``InterventionIncomplete`` before sending when the action
        requires a text that is missing, ``InterventionRefused`` when the
        workflow refuses it.
        """
        kind = INTERVENTIONS[action]
        if kind.required and text is None:
            raise InterventionIncomplete(action, kind.field)
        request = InterventionRequest.model_validate({"step": step, kind.field: text})
        try:
            outcome: InterventionOutcome = await self._handle.execute_update(kind.update, request)
            return outcome
        except WorkflowUpdateFailedError as error:
            cause = error.cause
            raise InterventionRefused(getattr(cause, "message", None) or str(cause)) from error

    async def raise_budget(
        self,
        *,
        step: str = "",
        max_tokens: int | None = None,
        max_cost_usd: float | None = None,
    ) -> BudgetLimits:
        """Raise the spec's budget (or decompose ``step``'s); steps it held then start."""
        request = BudgetRaise(step=step, max_tokens=max_tokens, max_cost_usd=max_cost_usd)
        try:
            return await self._handle.execute_update(MixerWorkflow.raise_budget, request)
        except WorkflowUpdateFailedError as error:
            cause = error.cause
            raise InterventionRefused(getattr(cause, "message", None) or str(cause)) from error

    async def events(self, from_offset: int = 0) -> AsyncIterator[MixerEvent]:
        """Every event from ``from_offset`` (inclusive), each exactly once, live.

        Ends once the run has closed and every event was read; resume after a
        disconnect by passing the last offset seen plus one.
        """
        stream = WorkflowStreamClient.create(self.mixer.temporal, self.id)
        async for item in stream.subscribe(
            [EVENTS_TOPIC], from_offset=from_offset, result_type=MixerEvent
        ):
            event = item.data
            event.offset = item.offset
            yield event
