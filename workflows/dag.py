"""The run's state machine: which steps may start, what a person may do, totals.

Pure Python with no Temporal imports, so every rule here is unit-tested
without a server and replays deterministically inside the workflow.

Step states, as the progress query reports them (docs/interventions.md)::

    pending ──start──▶ running ──ok──▶ completed
       │                  │
       │                  ├─fail, on_failure=skip──▶ skipped
       │                  ├─fail, on_failure=fail──▶ failed  (the run fails)
       │                  └─fail, on_failure=pause─▶ waiting ──retry──▶ running
       │                                               ├─skip──▶ skipped
       │                                               └─override──▶ completed
       └─skip / override (before it starts)──▶ skipped / completed

    failed ──retry (reopen)──▶ pending        running / waiting ──cancel──▶ failed

An approval step goes straight from running to ``waiting`` for a decision,
and a step whose budget is spent is held ``waiting`` until it is raised.

Every change of a step's state is a method of ``RunState`` that checks the
state it leaves and sets or clears exactly the fields that change implies;
the workflow and its step handlers interpret the spec and call them; they
never assign a field of a record (tests/test_run_state.py checks). Each
change increases ``RunState.version``, which the workflow's loop waits on
(and publishes progress from), so no change can be made without the loop
seeing it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Literal

from llmmixer.core.contracts import CommandResult, LlmReply, Usage
from llmmixer.workflows.records import (
    DONE_STATES,
    BudgetHold,
    BudgetLimits,
    BudgetRaise,
    Candidate,
    FallbackNote,
    HedgeNote,
    Intervention,
    InterventionOutcome,
    InterventionRequest,
    InterventionType,
    RunProgress,
    RunSnapshot,
    RunStatus,
    StepNode,
    StepRecord,
    StepStatus,
    ToolApproval,
    ToolCallNote,
    ToolTurn,
    TotalUsage,
)

# StepNode and RunSnapshot live in records.py (models pass through the
# workflow sandbox); importers of dag.py, where they were defined before,
# still find them here.
__all__ = ["RunSnapshot", "RunState", "StepNode", "TransitionRefused", "cut_text"]

_PENDING, _RUNNING, _WAITING = StepStatus.PENDING, StepStatus.RUNNING, StepStatus.WAITING
_FAILED = StepStatus.FAILED

# Which states each intervention may act on; users rely on this table
# (docs/interventions.md).
_ALLOWED: dict[str, frozenset[StepStatus]] = {
    "retry": frozenset({StepStatus.WAITING, StepStatus.FAILED}),
    "skip": frozenset({StepStatus.PENDING, StepStatus.WAITING, StepStatus.FAILED}),
    "override": frozenset({StepStatus.PENDING, StepStatus.WAITING, StepStatus.FAILED}),
    "approve": frozenset({StepStatus.WAITING}),
    "reject": frozenset({StepStatus.WAITING}),
}
# Kinds that occupy a worker slot while running (an approval only waits).
_WORKING_KINDS = frozenset({"llm", "pty", "decompose", "agent"})
# The result and the progress answer stay below the size at which payloads
# leave history for external storage (256 KiB), so `temporal workflow
# result/query` can read them without a codec (docs/interventions.md). Whole outputs stay
# in the activities' results in history and in the run's memory for templates.
_ANSWER_BUDGET_CHARS = 160 * 1024
_MIN_OUTPUT_CHARS = 2 * 1024


def _short_json(value: object, limit: int = 300) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cut_text(text: str, limit: int, where: str) -> str:
    """``text`` itself, or its head and tail around a marker saying how to get it whole."""
    if len(text) <= limit:
        return text
    keep = max(limit - 200, 200)
    head, tail = keep * 3 // 4, keep // 4
    cut = len(text) - head - tail
    marker = f"\n[... llmmixer: {cut} characters cut here; the whole text: {where} ...]\n"
    return text[:head] + marker + text[-tail:]


class TransitionRefused(ValueError):
    """A step was asked to change state from a state that change does not leave.

    Always a bug in the workflow (a person's actions are checked by
    ``RunState.refusal`` first); the step then fails as an unexpected error.
    """


class RunState:
    """Records of every step plus the DAG edges; a step changes state only through its methods."""

    def __init__(
        self, name: str, nodes: Sequence[StepNode], dry_run: bool, workflow_id: str = ""
    ) -> None:
        self.name = name
        self.workflow_id = workflow_id
        self.dry_run = dry_run
        self.nodes: dict[str, StepNode] = {node.id: node for node in nodes}
        self.records: dict[str, StepRecord] = {node.id: self._new_record(node) for node in nodes}
        # Budgets in force: "" is the spec's, other keys are decompose steps'.
        self.budgets: dict[str, BudgetLimits] = {}
        self.output: str | None = None
        self.status = RunStatus.RUNNING
        self.error: str | None = None
        # Increased by every change the workflow's loop must react to.
        self.version = 0
        # A person's accepted decisions that the step's task has yet to act
        # on, and prompts given with a retry: carried by continue-as-new.
        self.decisions: dict[str, Intervention] = {}
        self.prompt_overrides: dict[str, str] = {}
        # Why the run must fail (a step failed under on_failure: fail, or
        # waited past its pause_timeout_s); the workflow's loop ends the run.
        self.fatal: str | None = None
        # The run is being cancelled: a step whose activity now fails was
        # cancelled with it, whatever its on_failure says.
        self.cancelling = False

    def _new_record(self, node: StepNode) -> StepRecord:
        return StepRecord(
            kind=node.kind, dry_run=self.dry_run and node.kind != "pty", parent=node.parent
        )

    def snapshot(self) -> RunSnapshot:
        return RunSnapshot(
            nodes=list(self.nodes.values()),
            records={i: r.model_copy(deep=True) for i, r in self.records.items()},
            budgets={k: v.model_copy() for k, v in self.budgets.items()},
        )

    def restore(
        self,
        snapshot: RunSnapshot,
        prompt_overrides: Mapping[str, str] | None = None,
        decisions: Mapping[str, Intervention] | None = None,
    ) -> None:
        """Take over a run's state (continue-as-new), with what its people decided."""
        self.nodes = {node.id: node for node in snapshot.nodes}
        self.records = {
            i: snapshot.records.get(i) or self._new_record(n) for i, n in self.nodes.items()
        }
        self.budgets = dict(snapshot.budgets)
        self.prompt_overrides = dict(prompt_overrides or {})
        self.decisions = dict(decisions or {})

    # ---- plans (decompose steps) -------------------------------------------

    def add_steps(self, parent: str, nodes: Sequence[StepNode]) -> None:
        """A decompose step's accepted plan joins the DAG.

        The new nodes follow ``parent`` in DAG order (in plan order), and every
        step that needed ``parent`` now needs them too, so it runs after all
        of them. Called while ``parent`` is still running, so none of those
        dependants can have started. Pure: replays give the same DAG.
        """
        added = [node.id for node in nodes]
        clash = [i for i in added if i in self.nodes]
        if clash:
            raise ValueError(f"step ids already in the run: {', '.join(clash)}")
        for step_id, node in list(self.nodes.items()):
            if parent in node.needs:
                self.nodes[step_id] = replace(node, needs=(*node.needs, *added))
        nodes_after: dict[str, StepNode] = {}
        records_after: dict[str, StepRecord] = {}
        for step_id, node in self.nodes.items():
            nodes_after[step_id] = node
            records_after[step_id] = self.records[step_id]
            if step_id == parent:
                for new in nodes:
                    nodes_after[new.id] = new
                    records_after[new.id] = self._new_record(new)
        self.nodes, self.records = nodes_after, records_after

    def accept_plan(self, parent: str, nodes: Sequence[StepNode]) -> None:
        """``parent``'s plan passed its checks: its steps join, its refusals are forgotten."""
        self.records[parent].error = None
        self.add_steps(parent, nodes)
        self.version += 1

    def ancestors(self, step_id: str) -> set[str]:
        """Every step ``step_id`` waits for, directly or transitively, at run time."""
        seen: set[str] = set()
        stack = list(self.nodes[step_id].needs) if step_id in self.nodes else []
        while stack:
            node = stack.pop()
            if node not in seen and node in self.nodes:
                seen.add(node)
                stack.extend(self.nodes[node].needs)
        return seen

    def children(self) -> dict[str, list[str]]:
        """Decompose step id -> its plan's step ids, in DAG order."""
        found: dict[str, list[str]] = {}
        for step_id, node in self.nodes.items():
            if node.parent is not None:
                found.setdefault(node.parent, []).append(step_id)
        return found

    def lineage(self, step_id: str) -> list[str]:
        """The decompose steps above ``step_id``, nearest first."""
        chain: list[str] = []
        parent = self.nodes[step_id].parent if step_id in self.nodes else None
        while parent is not None and parent not in chain:
            chain.append(parent)
            parent = self.nodes[parent].parent
        return chain

    # ---- budgets -----------------------------------------------------------

    def spent(self, scope: str = "") -> tuple[int, float]:
        """(tokens, cost in USD) of the run ("") or of a decompose step's sub-steps.

        Unknown prices count as 0, so a cost budget is a lower bound for them.
        """
        tokens, cost = 0, 0.0
        for step_id, record in self.records.items():
            if scope and scope not in self.lineage(step_id):
                continue
            # A best_of step's usage already includes its candidates and judge.
            tokens += record.usage.input_tokens + record.usage.output_tokens
            cost += record.cost_usd or 0.0
        return tokens, round(cost, 8)

    def over_budget(self, step_id: str) -> BudgetHold | None:
        """The used-up budget that ``step_id`` falls under, or None if it may start."""
        for scope in ["", *self.lineage(step_id)]:
            limits = self.budgets.get(scope)
            if limits is None:
                continue
            tokens, cost = self.spent(scope)
            if limits.max_tokens is not None and tokens >= limits.max_tokens:
                return BudgetHold(
                    step=scope, limit="max_tokens", spent=tokens, current=limits.max_tokens
                )
            if limits.max_cost_usd is not None and cost >= limits.max_cost_usd:
                return BudgetHold(
                    step=scope, limit="max_cost_usd", spent=cost, current=limits.max_cost_usd
                )
        return None

    # ---- scheduling -------------------------------------------------------

    def ready(self, running_tasks: Iterable[str], max_parallel: int | None) -> list[str]:
        """Pending steps whose needs are all done, in spec order, within the limit."""
        busy = sum(1 for step_id in running_tasks if self.nodes[step_id].kind in _WORKING_KINDS)
        ready: list[str] = []
        for step_id, node in self.nodes.items():
            if self.records[step_id].status != StepStatus.PENDING:
                continue
            if not all(self.records[need].status in DONE_STATES for need in node.needs):
                continue
            if node.kind in _WORKING_KINDS:
                if max_parallel is not None and busy >= max_parallel:
                    continue
                busy += 1
            ready.append(step_id)
        return ready

    def all_done(self) -> bool:
        return all(record.status in DONE_STATES for record in self.records.values())

    def outputs(self) -> dict[str, str]:
        """What ``{{steps.ID.output}}`` reads: a skipped step reads as ""."""
        return {
            step_id: (record.output or "") if record.status == StepStatus.COMPLETED else ""
            for step_id, record in self.records.items()
            if record.status in DONE_STATES
        }

    def last_output(self) -> str | None:
        for step_id in reversed(list(self.nodes)):
            record = self.records[step_id]
            if record.status == StepStatus.COMPLETED:
                return record.output
        return None

    def cancel_unfinished(self, now: datetime) -> None:
        """The run was cancelled: steps still running or waiting end as failed."""
        for step_id, record in self.records.items():
            if record.status in (_RUNNING, _WAITING):
                self.cancel(step_id, now)

    def end(
        self, status: RunStatus, *, output: str | None = None, error: str | None = None
    ) -> None:
        """The run ended with ``status``; ``error`` says why a failed run failed."""
        self.status = status
        if output is not None:
            self.output = output
        self.error = error if status == RunStatus.FAILED else None
        self.version += 1

    # ---- step transitions ----------------------------------------------------
    #
    # Each sets and clears exactly the fields that runs recorded before these
    # methods existed got at the same point: records ride in continue-as-new
    # inputs and in the run's result, so their content must not change.

    def _move(self, step_id: str, change: str, sources: frozenset[StepStatus]) -> StepRecord:
        record = self.records[step_id]
        if record.status not in sources:
            states = " or ".join(sorted(state.value for state in sources))
            raise TransitionRefused(
                f"step {step_id!r} cannot {change}: it is {record.status.value}, "
                f"and {change} applies to a step that is {states}"
            )
        self.version += 1
        return record

    def launch(self, step_id: str) -> None:
        """The scheduler claims a pending step, before its task first runs.

        Marked at once, so a wake-up in between never launches it twice.
        """
        self._move(step_id, "launch", frozenset({_PENDING})).status = _RUNNING

    def start(self, step_id: str, now: datetime) -> None:
        """An attempt begins: the step runs, and no earlier error or wait applies."""
        record = self._move(step_id, "start", frozenset({_PENDING, _RUNNING, _WAITING}))
        record.status = _RUNNING
        record.started_at = record.started_at or now
        record.error = None
        record.waiting_reason = None
        record.budget_hold = None

    def complete(self, step_id: str, output: str, now: datetime) -> None:
        """The step produced ``output`` (a run, an approval, or a person's approve)."""
        record = self._move(step_id, "complete", frozenset({_RUNNING, _WAITING}))
        record.status = StepStatus.COMPLETED
        record.output = output
        record.ended_at = now

    def reuse(
        self,
        step_id: str,
        output: str,
        source: str,
        now: datetime,
        approval: Intervention | None = None,
    ) -> None:
        """The step takes ``source``'s output (a re-run whose call is unchanged): nothing ran.

        ``approval``: a reused approval gate keeps the source run's decision
        (who approved, when) in its record.
        """
        record = self._move(step_id, "reuse", frozenset({_RUNNING}))
        record.status = StepStatus.COMPLETED
        record.output = output
        record.reused_from = source
        record.ended_at = now
        if approval is not None:
            record.interventions.append(approval)

    def fail(self, step_id: str, now: datetime, error: str | None = None) -> None:
        """The step failed for good; ``None`` keeps the error it already has.

        A pause that timed out fails with the failure it paused on.
        """
        record = self._move(step_id, "fail", frozenset({_PENDING, _RUNNING, _WAITING}))
        record.status = _FAILED
        if error is not None:
            record.error = error
        record.ended_at = now

    def wait(self, step_id: str, reason: str, error: str | None = None) -> None:
        """The step waits for a person (an approval, or a failure under ``pause``)."""
        record = self._move(step_id, "wait", frozenset({_RUNNING, _WAITING}))
        record.status = _WAITING
        record.waiting_reason = reason
        if error is not None:
            record.error = error

    def rewait(self, step_id: str, reason: str, error: str | None = None) -> None:
        """A waiting step keeps waiting for another reason (a paused step rejected again).

        Not a change of state: nothing can start because of it, so the
        version stays (runs recorded before it existed did not wake here).
        """
        record = self.records[step_id]
        if record.status != _WAITING:
            raise TransitionRefused(
                f"step {step_id!r} cannot rewait: it is {record.status.value}, not waiting"
            )
        record.waiting_reason = reason
        if error is not None:
            record.error = error

    def hold(self, step_id: str, hold: BudgetHold) -> None:
        """A spent budget holds the step before it spends anything."""
        record = self._move(step_id, "hold", frozenset({_RUNNING}))
        record.status = _WAITING
        record.budget_hold = hold
        record.waiting_reason = hold.reason()

    def rehold(self, step_id: str, hold: BudgetHold | None) -> None:
        """A held step stays held; the budget it waits for is ``hold`` now.

        Like ``rewait``, not a change of state: the version stays.
        """
        record = self.records[step_id]
        if record.status != _WAITING:
            raise TransitionRefused(
                f"step {step_id!r} cannot rehold: it is {record.status.value}, not waiting"
            )
        record.budget_hold = hold
        record.waiting_reason = hold.reason() if hold else None

    def resume(self, step_id: str) -> None:
        """The budget that held the step was raised: it runs on."""
        record = self._move(step_id, "resume", frozenset({_WAITING}))
        record.status = _RUNNING
        record.waiting_reason = None
        record.budget_hold = None

    def skip(self, step_id: str, reason: str, now: datetime, error: str | None = None) -> None:
        """The step ends without output (``on_failure: skip`` with its ``error``, or a person)."""
        record = self._move(step_id, "skip", frozenset({_PENDING, _RUNNING, _WAITING, _FAILED}))
        record.status = StepStatus.SKIPPED
        if error is not None:
            record.error = error
        record.skipped_reason = reason
        record.budget_hold = None
        record.tool_approval = None
        record.ended_at = now

    def override(self, step_id: str, output: str, now: datetime) -> None:
        """A person gives the step's output instead of running it (again)."""
        record = self._move(step_id, "override", _ALLOWED["override"])
        record.status = StepStatus.COMPLETED
        record.output = output
        record.overridden = True
        record.budget_hold = None
        record.tool_approval = None
        record.ended_at = now

    def reopen(self, step_id: str) -> None:
        """A person retries a failed step: the scheduler starts it again."""
        self._move(step_id, "reopen", frozenset({_FAILED})).status = _PENDING

    def cancel(self, step_id: str, now: datetime, detail: str | None = None) -> None:
        """The run was cancelled while the step had not ended."""
        record = self._move(step_id, "cancel", frozenset({_PENDING, _RUNNING, _WAITING}))
        record.status = _FAILED
        record.error = f"cancelled with the run ({detail})" if detail else "cancelled with the run"
        record.waiting_reason = None
        record.budget_hold = None
        record.tool_approval = None
        record.ended_at = now

    # ---- tool loops (llm steps with tools) -------------------------------------

    def await_tool(self, step_id: str, approval: ToolApproval) -> None:
        """A tool call marked ``approve: true`` waits for a person before it runs."""
        record = self._move(step_id, "await a tool's approval", frozenset({_RUNNING}))
        record.status = _WAITING
        record.tool_approval = approval
        record.waiting_reason = (
            f"tool approval: {approval.name} {_short_json(approval.arguments)} "
            "(approve runs it; reject tells the model your reason)"
        )
        note = self._tool_call(step_id, approval.turn, approval.call_id)
        if note is not None:
            note.status = "waiting"

    def tool_decided(
        self, step_id: str, decision: Literal["approved", "rejected", "retried"], note: str | None
    ) -> None:
        """A person decided on the waiting tool call; the loop runs on."""
        record = self._move(step_id, "go on after a tool's approval", frozenset({_WAITING}))
        approval = record.tool_approval
        record.status = _RUNNING
        record.tool_approval = None
        record.waiting_reason = None
        if approval is None or decision == "retried":
            return
        call = self._tool_call(step_id, approval.turn, approval.call_id)
        if call is not None:
            call.decision, call.decision_note = decision, note
            call.status = "running" if decision == "approved" else "rejected"

    def begin_loop(self, step_id: str) -> None:
        """A tool loop starts (again, after a retry): its turns are counted from one."""
        self.records[step_id].turns = []

    def note_turn(self, step_id: str, turn: ToolTurn) -> None:
        """A model turn of the step's tool loop answered."""
        self.records[step_id].turns.append(turn)

    def tool_started(self, step_id: str, turn: int, call: ToolCallNote) -> None:
        """A tool call of ``turn`` starts (or waits for approval first)."""
        for recorded in self.records[step_id].turns:
            if recorded.number == turn:
                recorded.calls.append(call)

    def tool_ended(
        self,
        step_id: str,
        turn: int,
        call_id: str,
        *,
        result_chars: int,
        is_error: bool,
        duration_ms: float | None,
        now: datetime,
        failed: bool = False,
    ) -> None:
        """A tool call's result is ready for the model (or its failure fails the step)."""
        call = self._tool_call(step_id, turn, call_id)
        if call is None:
            return
        if call.status != "rejected":
            call.status = "failed" if failed or is_error else "completed"
        call.result_chars = result_chars
        call.is_error = is_error
        call.duration_ms = duration_ms
        call.ended_at = now

    def _tool_call(self, step_id: str, turn: int, call_id: str) -> ToolCallNote | None:
        for recorded in self.records[step_id].turns:
            if recorded.number == turn:
                for call in recorded.calls:
                    if call.id == call_id:
                        return call
        return None

    # ---- what happens to a step without changing its state --------------------

    def intervene(self, step_id: str, intervention: Intervention) -> None:
        """A person's accepted action is recorded; the step acts on it next."""
        self.records[step_id].interventions.append(intervention)
        self.version += 1

    def note_refused(self, step_id: str, intervention: Intervention) -> None:
        """A refused signal is recorded; nothing changes, so the version stays."""
        self.records[step_id].interventions.append(intervention)

    # Accounting: what an attempt cost and who answered. None of it decides
    # what may start (budgets are read by the steps they hold), so the
    # version stays, as it did when the workflow set these fields itself.

    def note_prompt(self, step_id: str, prompt: str | None) -> None:
        """The prompt (or command line) as rendered and sent."""
        self.records[step_id].prompt = prompt

    def note_call(self, step_id: str, digest: str) -> None:
        """The digest of the call the step makes (``workflows/reuse.py``)."""
        self.records[step_id].call_hash = digest

    def count_attempts(self, step_id: str, attempts: int) -> None:
        """``attempts`` more attempts were used (a failed activity, an approval asked)."""
        self.records[step_id].attempts += attempts

    def note_target(self, step_id: str, provider: str, model: str) -> None:
        """The step asks ``provider``/``model`` now."""
        record = self.records[step_id]
        record.provider, record.model = provider, model

    def account_reply(self, step_id: str, reply: LlmReply, *, track: bool = True) -> None:
        """A provider answered; ``track=False`` (best_of candidates) leaves who answered."""
        record = self.records[step_id]
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

    def account_hedge(self, step_id: str, note: HedgeNote) -> None:
        """A hedged call ended: one note per hedge, saying who won and why it started.

        The winner's reply is accounted by ``account_reply``; each loser's
        usage and cost (``note.loser_*``, one loser per note) count toward
        the step's here, so budgets see every call.
        """
        record = self.records[step_id]
        record.hedges.append(note)
        record.usage = record.usage + note.loser_usage
        record.cost_usd = (
            None
            if note.loser_cost_usd is None or record.cost_usd is None
            else round(record.cost_usd + note.loser_cost_usd, 8)
        )

    def account_command(self, step_id: str, result: CommandResult) -> None:
        """A command or agent ran to its end."""
        record = self.records[step_id]
        record.attempts += result.attempt
        record.mode = result.mode
        record.exit_code = result.exit_code
        record.latency_ms = result.duration_ms

    def note_fallback(self, step_id: str, note: FallbackNote) -> None:
        """A target of the step's chain failed; the next one is asked."""
        self.records[step_id].fallbacks.append(note)
        self.version += 1

    def set_candidates(self, step_id: str, candidates: Sequence[Candidate]) -> None:
        """Every ``best_of`` candidate answered or failed; the judge is next."""
        self.records[step_id].candidates = list(candidates)
        self.version += 1

    def refuse_plan(self, step_id: str, error: str) -> None:
        """A decompose step's plan was refused; the planner is asked again."""
        self.records[step_id].error = error
        self.version += 1

    def set_budget(self, scope: str, limits: BudgetLimits) -> None:
        """A budget is set or raised; steps it held may start."""
        self.budgets[scope] = limits
        self.version += 1

    # ---- interventions ----------------------------------------------------

    def decide(
        self, action: InterventionType, request: InterventionRequest, now: datetime
    ) -> InterventionOutcome:
        """Apply a person's accepted ``action`` (``refusal`` said None).

        Skip and override settle the step at once; a step that waits (or runs)
        acts on the decision next, in its own task (``take_decision``).
        """
        step_id = request.step
        record = self.records[step_id]
        intervention = Intervention(
            type=action, argument=request.model_dump(exclude_none=True), time=now
        )
        self.intervene(step_id, intervention)
        was = record.status
        if action == "retry":
            if request.prompt is not None:
                self.prompt_overrides[step_id] = request.prompt
            if was == _FAILED:
                # The step's task has ended; the scheduler starts it again.
                self.reopen(step_id)
            message = "will run again"
        elif action == "skip":
            self.skip(step_id, request.reason or "skipped by a person", now)
            message = "skipped; its dependants go on with an empty output"
        elif action == "override":
            self.override(step_id, request.output or "", now)
            message = "completed with the given output"
        elif action == "approve":
            message = "approved" if record.tool_approval is None else "approved; the tool call runs"
        elif record.tool_approval is not None:
            message = "rejected; the model is told your reason as the tool's result"
        else:
            message = "rejected; its on_failure policy applies"
        if was in (_WAITING, _RUNNING):
            self.decisions[step_id] = intervention
        return InterventionOutcome(
            step=step_id, action=action, status=record.status, message=message
        )

    def take_decision(self, step_id: str) -> Intervention | None:
        """The decision ``step_id``'s task acts on now, if one arrived."""
        return self.decisions.pop(step_id, None)

    def doom(self, reason: str) -> None:
        """The run must fail for ``reason``; its loop ends it."""
        self.fatal = reason
        self.version += 1

    def begin_cancel(self) -> None:
        """The run is cancelled: steps whose activity fails now end as cancelled."""
        self.cancelling = True

    def budget_refusal(self, request: BudgetRaise) -> str | None:
        """Why ``raise_budget`` cannot apply, or None."""
        where = f"decompose step {request.step!r}" if request.step else "the spec"
        current = self.budgets.get(request.step)
        if current is None:
            scopes = ", ".join(repr(s) if s else '"" (the spec)' for s in self.budgets) or "none"
            return f"{where} has no budget to raise (budgets in this run: {scopes})"
        if request.max_tokens is None and request.max_cost_usd is None:
            return 'give max_tokens and/or max_cost_usd: {"max_tokens": 200000}'
        if request.max_tokens is not None and (
            request.max_tokens < 1
            or (current.max_tokens is not None and request.max_tokens <= current.max_tokens)
            or current.max_tokens is None
        ):
            return (
                f"max_tokens must be above the current limit of {where} "
                f"({current.max_tokens}); raise_budget only raises"
            )
        if request.max_cost_usd is not None and (
            request.max_cost_usd <= 0
            or current.max_cost_usd is None
            or request.max_cost_usd <= current.max_cost_usd
        ):
            return (
                f"max_cost_usd must be above the current limit of {where} "
                f"({current.max_cost_usd}); raise_budget only raises"
            )
        return None

    def raise_budget(self, request: BudgetRaise) -> BudgetLimits:
        """``budget_refusal`` said None: the higher limits apply, held steps may start."""
        limits = self.budgets[request.step]
        raised = BudgetLimits(
            max_tokens=request.max_tokens or limits.max_tokens,
            max_cost_usd=request.max_cost_usd
            if request.max_cost_usd is not None
            else limits.max_cost_usd,
        )
        self.set_budget(request.step, raised)
        return raised

    def refusal(
        self, action: InterventionType, step_id: str, *, check_state: bool = True
    ) -> str | None:
        """Why ``action`` cannot apply to ``step_id`` now, or None if it can.

        With ``check_state=False`` only what cannot change during the run is
        checked: the step exists and the action suits its kind.
        """
        if step_id not in self.records:
            known = ", ".join(self.records) or "(none)"
            return f"there is no step {step_id!r} in this run: use one of {known}"
        record = self.records[step_id]
        # An llm step's tool call marked `approve: true` waits for the same
        # approve and reject as an approval step.
        tool_step = record.kind == "llm" and (not check_state or record.tool_approval is not None)
        if action in ("approve", "reject") and record.kind != "approval" and not tool_step:
            return (
                f"step {step_id!r} is a {record.kind} step, not an approval"
                + (" and waits for no tool call's approval" if record.kind == "llm" else "")
                + ": use retry, skip or override"
            )
        if not check_state:
            return None
        if self.status in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED):
            return f"the run has ended ({self.status.value}); start a new run instead"
        allowed = _ALLOWED[action]
        if record.status not in allowed:
            states = " or ".join(sorted(state.value for state in allowed))
            return (
                f"cannot {action} step {step_id!r}: it is {record.status.value}, "
                f"and {action} applies to a step that is {states}"
            )
        return None

    # ---- reporting --------------------------------------------------------

    def progress(self) -> RunProgress:
        usage = Usage()
        cost = 0.0
        complete = True
        for record in self.records.values():
            usage = usage + record.usage
            if record.cost_usd is None:
                complete = False
            else:
                cost += record.cost_usd
        waiting = [i for i, r in self.records.items() if r.status == StepStatus.WAITING]
        running = [i for i, r in self.records.items() if r.status == StepStatus.RUNNING]
        status = self.status
        if status in (RunStatus.RUNNING, RunStatus.WAITING):
            status = RunStatus.WAITING if waiting else RunStatus.RUNNING
        limit = max(_MIN_OUTPUT_CHARS, _ANSWER_BUDGET_CHARS // (len(self.records) + 1))
        where = f"llmmixer audit {self.workflow_id}"
        steps: dict[str, StepRecord] = {}
        for step_id, record in self.records.items():
            copy = record.model_copy(deep=True)
            if copy.output is not None and len(copy.output) > limit:
                copy.output_chars = len(copy.output)
                copy.output = cut_text(copy.output, limit, where)
            # A prompt that quotes a long output is as long as that output.
            if copy.prompt is not None:
                copy.prompt = cut_text(copy.prompt, limit, where)
            # best_of candidates share their step's part of the answer.
            share = max(_MIN_OUTPUT_CHARS, limit // (len(copy.candidates) + 1))
            for candidate in copy.candidates:
                if candidate.output is not None:
                    candidate.output = cut_text(candidate.output, share, where)
            steps[step_id] = copy
        return RunProgress(
            name=self.name,
            status=status,
            output=None if self.output is None else cut_text(self.output, limit, where),
            steps=steps,
            usage=TotalUsage(
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cost_usd=round(cost, 8),
                cost_complete=complete,
            ),
            dry_run=self.dry_run,
            error=self.error,
            waiting=waiting,
            running=running,
        )

    def summary(self) -> str:
        """One line for the Temporal Web UI's current details."""
        done = sum(1 for r in self.records.values() if r.status in DONE_STATES)
        parts = [f"{done}/{len(self.records)} steps done"]
        running = [i for i, r in self.records.items() if r.status == StepStatus.RUNNING]
        if running:
            parts.append("running: " + ", ".join(running))
        for step_id, record in self.records.items():
            if record.status == StepStatus.WAITING:
                reason = (record.waiting_reason or "waits for a person").splitlines()[0][:160]
                parts.append(f"WAITING {step_id}: {reason}")
        return " · ".join(parts)
