"""Every change of a step's state, and every change refused, without Temporal.

The workflow never assigns a step's status: these methods are the only way a
record moves, each checks the state it leaves, and each change increases the
version the workflow's loop waits on (a change it did not see would hang a run).
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from llmmixer.workflows.dag import RunState, StepNode, TransitionRefused
from llmmixer.workflows.records import (
    BudgetHold,
    BudgetLimits,
    Candidate,
    FallbackNote,
    Intervention,
    InterventionRequest,
    RunStatus,
    StepStatus,
    ToolApproval,
    ToolCallNote,
    ToolTurn,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
LATER = datetime(2026, 1, 2, 3, 9, 0, tzinfo=UTC)
HOLD = BudgetHold(limit="max_tokens", spent=120, current=100)


def one_step(kind: str = "llm") -> RunState:
    return RunState("r", [StepNode("s", kind, ())], dry_run=False)


def at(status: StepStatus) -> RunState:
    """A run whose step ``s`` has reached ``status`` through the transitions."""
    state = one_step()
    if status == StepStatus.PENDING:
        return state
    state.launch("s")
    state.start("s", NOW)
    if status == StepStatus.WAITING:
        state.wait("s", "failed: 500", error="500")
    elif status == StepStatus.COMPLETED:
        state.complete("s", "out", LATER)
    elif status == StepStatus.FAILED:
        state.fail("s", LATER, "boom")
    elif status == StepStatus.SKIPPED:
        state.skip("s", "not needed", LATER)
    return state


# ---- each transition sets and clears what it implies ------------------------


def test_launch_claims_a_pending_step_so_the_scheduler_never_starts_it_twice() -> None:
    state = one_step()
    state.launch("s")
    assert state.records["s"].status == StepStatus.RUNNING
    assert state.ready([], None) == []


def test_start_runs_the_step_and_forgets_the_previous_wait() -> None:
    state = at(StepStatus.WAITING)
    state.records["s"].budget_hold = HOLD
    state.start("s", LATER)
    record = state.records["s"]
    assert record.status == StepStatus.RUNNING
    assert (record.error, record.waiting_reason, record.budget_hold) == (None, None, None)
    assert record.started_at == NOW  # the first attempt's start is kept


def test_complete_keeps_the_output_and_the_end_time() -> None:
    state = at(StepStatus.RUNNING)
    state.complete("s", "answer", LATER)
    record = state.records["s"]
    assert (record.status, record.output, record.ended_at) == (
        StepStatus.COMPLETED,
        "answer",
        LATER,
    )
    assert state.outputs() == {"s": "answer"}


def test_an_approval_completes_from_waiting() -> None:
    state = at(StepStatus.WAITING)
    state.complete("s", "approved", LATER)
    assert state.records["s"].status == StepStatus.COMPLETED


def test_fail_records_the_error_or_keeps_the_one_it_paused_on() -> None:
    state = at(StepStatus.RUNNING)
    state.fail("s", LATER, "exit code 2")
    assert (state.records["s"].status, state.records["s"].error) == (
        StepStatus.FAILED,
        "exit code 2",
    )
    paused = at(StepStatus.WAITING)
    paused.fail("s", LATER)
    assert paused.records["s"].error == "500"
    assert paused.records["s"].ended_at == LATER


def test_wait_says_why_and_makes_the_run_wait() -> None:
    state = at(StepStatus.RUNNING)
    state.wait("s", "approval: ship it?")
    assert state.records["s"].waiting_reason == "approval: ship it?"
    assert state.progress().status == RunStatus.WAITING


def test_rewait_changes_the_reason_but_not_the_version() -> None:
    state = at(StepStatus.WAITING)
    version = state.version
    state.rewait("s", "failed: rejected: no", error="rejected: no")
    assert (state.records["s"].waiting_reason, state.records["s"].error) == (
        "failed: rejected: no",
        "rejected: no",
    )
    assert state.version == version


def test_hold_and_resume_set_and_clear_the_budget_hold() -> None:
    state = at(StepStatus.RUNNING)
    state.hold("s", HOLD)
    record = state.records["s"]
    assert record.status == StepStatus.WAITING
    assert record.budget_hold == HOLD
    assert record.waiting_reason == HOLD.reason()
    version = state.version
    state.rehold("s", None)
    assert state.version == version
    state.resume("s")
    assert (record.status, record.waiting_reason, record.budget_hold) == (
        StepStatus.RUNNING,
        None,
        None,
    )


@pytest.mark.parametrize(
    "source", [StepStatus.PENDING, StepStatus.RUNNING, StepStatus.WAITING, StepStatus.FAILED]
)
def test_skip_ends_the_step_with_an_empty_output(source: StepStatus) -> None:
    state = at(source)
    state.records["s"].budget_hold = HOLD if source == StepStatus.WAITING else None
    state.skip("s", "not needed", LATER)
    record = state.records["s"]
    assert (record.status, record.skipped_reason, record.budget_hold, record.ended_at) == (
        StepStatus.SKIPPED,
        "not needed",
        None,
        LATER,
    )
    assert state.outputs() == {"s": ""}


def test_a_failure_skipped_by_on_failure_keeps_its_error() -> None:
    state = at(StepStatus.RUNNING)
    state.skip("s", "failed and on_failure is skip: 500", LATER, error="500")
    assert (state.records["s"].status, state.records["s"].error) == (StepStatus.SKIPPED, "500")


def test_an_accepted_plan_joins_the_dag_and_clears_the_refusal() -> None:
    state = RunState(
        "r", [StepNode("plan", "decompose", ()), StepNode("end", "llm", ("plan",))], False
    )
    state.launch("plan")
    state.start("plan", NOW)
    state.refuse_plan("plan", "plan refused: too many steps")
    version = state.version
    state.accept_plan("plan", [StepNode("p1", "llm", ("plan",), parent="plan")])
    assert state.version == version + 1
    assert state.records["plan"].error is None
    assert state.nodes["end"].needs == ("plan", "p1")


@pytest.mark.parametrize("source", [StepStatus.PENDING, StepStatus.WAITING, StepStatus.FAILED])
def test_override_completes_the_step_with_the_given_output(source: StepStatus) -> None:
    state = at(source)
    state.override("s", "by hand", LATER)
    record = state.records["s"]
    assert (record.status, record.output, record.overridden) == (
        StepStatus.COMPLETED,
        "by hand",
        True,
    )


def test_reopen_gives_a_failed_step_back_to_the_scheduler() -> None:
    state = at(StepStatus.FAILED)
    state.reopen("s")
    assert state.ready([], None) == ["s"]


def test_cancel_fails_what_had_not_ended_and_clears_its_wait() -> None:
    state = at(StepStatus.RUNNING)
    state.hold("s", HOLD)
    state.cancel("s", LATER, "activity cancelled")
    record = state.records["s"]
    assert record.status == StepStatus.FAILED
    assert record.error == "cancelled with the run (activity cancelled)"
    assert (record.waiting_reason, record.budget_hold, record.ended_at) == (None, None, LATER)


def test_cancel_unfinished_leaves_ended_steps_alone() -> None:
    state = RunState("r", [StepNode("a", "llm", ()), StepNode("b", "approval", ())], dry_run=False)
    state.launch("a")
    state.start("a", NOW)
    state.complete("a", "done", NOW)
    state.launch("b")
    state.start("b", NOW)
    state.wait("b", "approval: ok?")
    state.cancel_unfinished(LATER)
    assert state.records["a"].status == StepStatus.COMPLETED
    assert (state.records["b"].status, state.records["b"].error) == (
        StepStatus.FAILED,
        "cancelled with the run",
    )


def test_end_keeps_the_error_only_for_a_failed_run() -> None:
    state = one_step()
    state.end(RunStatus.COMPLETED, output="final", error="ignored")
    assert (state.status, state.output, state.error) == (RunStatus.COMPLETED, "final", None)
    failed = one_step()
    failed.end(RunStatus.FAILED, error="step s failed: boom")
    assert failed.progress().error == "step s failed: boom"


# ---- refused transitions ------------------------------------------------------

REFUSED: list[tuple[str, StepStatus, Callable[[RunState], None]]] = [
    ("launch", StepStatus.RUNNING, lambda s: s.launch("s")),
    ("launch", StepStatus.FAILED, lambda s: s.launch("s")),
    ("start", StepStatus.COMPLETED, lambda s: s.start("s", LATER)),
    ("start", StepStatus.SKIPPED, lambda s: s.start("s", LATER)),
    ("start", StepStatus.FAILED, lambda s: s.start("s", LATER)),
    ("complete", StepStatus.PENDING, lambda s: s.complete("s", "x", LATER)),
    ("complete", StepStatus.SKIPPED, lambda s: s.complete("s", "x", LATER)),
    ("complete", StepStatus.COMPLETED, lambda s: s.complete("s", "x", LATER)),
    ("fail", StepStatus.COMPLETED, lambda s: s.fail("s", LATER, "x")),
    ("fail", StepStatus.FAILED, lambda s: s.fail("s", LATER, "x")),
    ("wait", StepStatus.PENDING, lambda s: s.wait("s", "x")),
    ("wait", StepStatus.COMPLETED, lambda s: s.wait("s", "x")),
    ("rewait", StepStatus.RUNNING, lambda s: s.rewait("s", "x")),
    ("hold", StepStatus.WAITING, lambda s: s.hold("s", HOLD)),
    ("hold", StepStatus.PENDING, lambda s: s.hold("s", HOLD)),
    ("rehold", StepStatus.RUNNING, lambda s: s.rehold("s", HOLD)),
    ("resume", StepStatus.RUNNING, lambda s: s.resume("s")),
    ("resume", StepStatus.SKIPPED, lambda s: s.resume("s")),
    ("skip", StepStatus.COMPLETED, lambda s: s.skip("s", "x", LATER)),
    ("skip", StepStatus.SKIPPED, lambda s: s.skip("s", "x", LATER)),
    ("override", StepStatus.RUNNING, lambda s: s.override("s", "x", LATER)),
    ("override", StepStatus.COMPLETED, lambda s: s.override("s", "x", LATER)),
    ("reopen", StepStatus.WAITING, lambda s: s.reopen("s")),
    ("reopen", StepStatus.COMPLETED, lambda s: s.reopen("s")),
    ("cancel", StepStatus.COMPLETED, lambda s: s.cancel("s", LATER)),
    ("cancel", StepStatus.FAILED, lambda s: s.cancel("s", LATER)),
]


@pytest.mark.parametrize(
    ("change", "source", "move"),
    REFUSED,
    ids=[f"{change}-from-{source.value}" for change, source, _ in REFUSED],
)
def test_a_change_from_a_state_it_does_not_leave_is_refused_and_changes_nothing(
    change: str, source: StepStatus, move: Callable[[RunState], None]
) -> None:
    state = at(source)
    before = state.records["s"].model_copy(deep=True)
    version = state.version
    with pytest.raises(TransitionRefused) as refused:
        move(state)
    assert f"cannot {change}" in str(refused.value)
    assert source.value in str(refused.value)
    assert state.records["s"] == before
    assert state.version == version


# ---- the version the workflow waits on ------------------------------------------


def test_every_change_the_loop_must_see_increases_the_version() -> None:
    state = RunState("r", [StepNode("s", "llm", ()), StepNode("t", "llm", ())], dry_run=False)
    changes: list[Callable[[], None]] = [
        lambda: state.launch("s"),
        lambda: state.start("s", NOW),
        lambda: state.note_fallback("s", FallbackNote(provider="p", model="m", error="429")),
        lambda: state.set_candidates("s", [Candidate(provider="p", model="m", output="o")]),
        lambda: state.refuse_plan("s", "plan refused: no steps"),
        lambda: state.hold("s", HOLD),
        lambda: state.set_budget("", BudgetLimits(max_tokens=500)),
        lambda: state.resume("s"),
        lambda: state.wait("s", "failed: 500"),
        lambda: state.intervene("s", Intervention(type="retry")),
        lambda: state.complete("s", "o", NOW),
        lambda: state.skip("t", "no", NOW),
        lambda: state.doom("step s failed: 500"),
        lambda: state.end(RunStatus.COMPLETED),
    ]
    for change in changes:
        version = state.version
        change()
        assert state.version == version + 1


def test_a_refused_signal_is_recorded_without_waking_the_loop() -> None:
    state = at(StepStatus.RUNNING)
    version = state.version
    state.note_refused("s", Intervention(type="skip", accepted=False, reason="running"))
    assert state.records["s"].interventions[-1].accepted is False
    assert state.version == version


def test_accounting_an_attempt_does_not_wake_the_loop() -> None:
    # Runs recorded before these methods existed set these fields without
    # waking their loop; a new wake-up could reorder their commands.
    state = at(StepStatus.RUNNING)
    version = state.version
    state.note_prompt("s", "the prompt")
    state.note_target("s", "openai", "gpt-4.1")
    state.count_attempts("s", 2)
    state.begin_cancel()
    assert state.version == version
    record = state.records["s"]
    assert (record.prompt, record.provider, record.attempts) == ("the prompt", "openai", 2)


# ---- a person's decisions are transitions ------------------------------------


def test_a_skip_settles_a_waiting_step_at_once_and_its_task_reads_the_decision() -> None:
    state = at(StepStatus.WAITING)
    outcome = state.decide("skip", InterventionRequest(step="s", reason="not needed"), LATER)
    assert outcome.status == StepStatus.SKIPPED
    assert state.records["s"].skipped_reason == "not needed"
    assert state.records["s"].interventions[-1].type == "skip"
    decision = state.take_decision("s")
    assert decision is not None and decision.type == "skip"
    assert state.take_decision("s") is None


def test_a_retry_of_a_failed_step_gives_it_back_to_the_scheduler_with_its_new_prompt() -> None:
    state = at(StepStatus.FAILED)
    outcome = state.decide("retry", InterventionRequest(step="s", prompt="again"), LATER)
    assert outcome.status == StepStatus.PENDING
    assert state.ready([], None) == ["s"]
    assert state.prompt_overrides == {"s": "again"}
    # Its task has ended: nothing waits for a decision.
    assert state.take_decision("s") is None


def test_a_rejection_leaves_the_approval_waiting_for_its_task_to_apply_on_failure() -> None:
    state = RunState("r", [StepNode("gate", "approval", ())], dry_run=False)
    state.launch("gate")
    state.start("gate", NOW)
    state.wait("gate", "approval: Ship?")
    outcome = state.decide("reject", InterventionRequest(step="gate", reason="no"), LATER)
    assert outcome.status == StepStatus.WAITING
    decision = state.take_decision("gate")
    assert decision is not None and decision.argument == {"step": "gate", "reason": "no"}


def waiting_on_a_tool() -> RunState:
    state = at(StepStatus.RUNNING)
    state.begin_loop("s")
    state.note_turn("s", ToolTurn(number=1, provider="p", model="m"))
    state.tool_started("s", 1, ToolCallNote(id="c1", name="write", arguments={"path": "a"}))
    state.await_tool("s", ToolApproval(turn=1, call_id="c1", name="write", arguments={"path": "a"}))
    return state


def test_a_tool_call_that_needs_approval_makes_its_llm_step_wait_with_the_call() -> None:
    state = waiting_on_a_tool()
    record = state.records["s"]
    assert record.status == StepStatus.WAITING and state.progress().waiting == ["s"]
    assert record.waiting_reason is not None and 'write {"path": "a"}' in record.waiting_reason
    assert record.turns[0].calls[0].status == "waiting"
    # approve and reject, refused for an llm step otherwise, apply to it now.
    assert state.refusal("approve", "s") is None and state.refusal("reject", "s") is None
    outcome = state.decide("reject", InterventionRequest(step="s", reason="no"), LATER)
    assert outcome.status == StepStatus.WAITING and "the model is told" in outcome.message
    state.tool_decided("s", "rejected", "no")
    assert record.status == StepStatus.RUNNING and record.tool_approval is None
    assert record.waiting_reason is None
    state.tool_ended("s", 1, "c1", result_chars=10, is_error=True, duration_ms=0.0, now=LATER)
    call = record.turns[0].calls[0]
    assert (call.status, call.decision, call.decision_note) == ("rejected", "rejected", "no")
    assert state.refusal("approve", "s") is not None


def test_an_llm_step_waiting_for_no_tool_refuses_approve_and_says_what_applies() -> None:
    state = at(StepStatus.WAITING)
    refusal = state.refusal("approve", "s")
    assert refusal is not None and "waits for no tool call's approval" in refusal
    assert "retry, skip or override" in refusal
    # The validator's state-free check lets it through: the step may wait on a tool later.
    assert state.refusal("approve", "s", check_state=False) is None
    assert one_step("pty").refusal("approve", "s", check_state=False) is not None


def test_skip_override_and_cancel_end_a_tools_wait() -> None:
    for end in (
        lambda s: s.skip("s", "no", LATER),
        lambda s: s.override("s", "out", LATER),
        lambda s: s.cancel("s", LATER),
    ):
        state = waiting_on_a_tool()
        end(state)
        assert state.records["s"].tool_approval is None


def test_a_continuation_takes_over_the_decisions_and_prompts_of_the_run_before() -> None:
    before = at(StepStatus.WAITING)
    before.decide("retry", InterventionRequest(step="s", prompt="again"), LATER)
    after = one_step()
    after.restore(before.snapshot(), before.prompt_overrides, before.decisions)
    assert after.records["s"].status == StepStatus.WAITING
    assert after.prompt_overrides == {"s": "again"}
    decision = after.take_decision("s")
    assert decision is not None and decision.type == "retry"


def test_only_the_state_machine_assigns_what_a_run_holds() -> None:
    """The workflow and the step handlers assign only their own attributes.

    A step's record, the run's state and anything else they are handed change
    through ``RunState``'s methods, so every change is checked and seen.
    """
    workflows = Path(__file__).resolve().parent.parent / "workflows"
    offenders: list[str] = []
    for path in sorted([*workflows.glob("*.py"), *workflows.glob("steps/*.py")]):
        if path.name == "dag.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if not isinstance(element, ast.Attribute | ast.Subscript):
                        continue
                    owner = element.value
                    if isinstance(element, ast.Subscript) and isinstance(owner, ast.Attribute):
                        owner = owner.value  # self.tasks[step] = ...: the object's own dict
                    if not (isinstance(owner, ast.Name) and owner.id == "self"):
                        offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(element)}")
    assert not offenders, "assigned outside RunState:\n" + "\n".join(offenders)
