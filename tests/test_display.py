"""What `run`, `status` and `watch` tell a person to type."""

from __future__ import annotations

from llmmixer.client.display import unblock_hints
from llmmixer.workflows.records import (
    BudgetHold,
    RunProgress,
    RunStatus,
    StepRecord,
    StepStatus,
)


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
    hold = BudgetHold(step="plan", limit="max_tokens", spent=900, current=800)
    record = StepRecord(status=StepStatus.WAITING, waiting_reason=hold.reason(), budget_hold=hold)
    hints = unblock_hints("wf", waiting(record))
    assert hints[1] == "  llmmixer raise-budget wf --step plan --max-tokens NEW_LIMIT"
    assert hints[2] == "  llmmixer skip wf s"
    spec_hold = BudgetHold(limit="max_cost_usd", spent=2, current=2)
    spec_level = StepRecord(
        status=StepStatus.WAITING, waiting_reason=spec_hold.reason(), budget_hold=spec_hold
    )
    hint = unblock_hints("wf", waiting(spec_level))[1]
    assert hint == "  llmmixer raise-budget wf --max-cost-usd NEW_LIMIT"
