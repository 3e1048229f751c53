"""What `run`, `status` and `watch` tell a person to type."""

from __future__ import annotations

from llmmixer.client.display import unblock_hints
from llmmixer.workflows.records import RunProgress, RunStatus, StepRecord, StepStatus


def waiting(record: StepRecord) -> RunProgress:
    return RunProgress(status=RunStatus.WAITING, steps={"s": record}, waiting=["s"])


def test_a_failed_step_gets_retry_skip_override() -> None:
    record = StepRecord(status=StepStatus.WAITING, waiting_reason="failed: boom", error="boom")
    assert unblock_hints("wf", waiting(record)) == [
        "step s waits: failed: boom",
        "  llmmixer retry wf s",
        "  llmmixer skip wf s",
        "  llmmixer override wf s --output TEXT",
    ]


def test_an_approval_gets_approve_reject() -> None:
    record = StepRecord(kind="approval", status=StepStatus.WAITING, waiting_reason="approval: ok?")
    assert unblock_hints("wf", waiting(record))[1:] == [
        "  llmmixer approve wf s",
        "  llmmixer reject wf s",
    ]


def test_a_budget_hold_names_the_budget_to_raise() -> None:
    reason = "budget: 900 tokens spent of max_tokens 800 (the budget of plan); raise it"
    record = StepRecord(status=StepStatus.WAITING, waiting_reason=reason)
    hints = unblock_hints("wf", waiting(record))
    assert hints[1] == "  llmmixer raise-budget wf --step plan --max-tokens NEW_LIMIT"
    assert hints[2] == "  llmmixer skip wf s"
    spec_level = StepRecord(
        status=StepStatus.WAITING,
        waiting_reason="budget: $2 spent of max_cost_usd 2 (the spec's budget); raise it",
    )
    hint = unblock_hints("wf", waiting(spec_level))[1]
    assert hint == "  llmmixer raise-budget wf --max-cost-usd NEW_LIMIT"
