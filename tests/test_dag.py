"""The run's state machine, without Temporal."""

from __future__ import annotations

from llmmixer.workflows.dag import RunState, StepNode
from llmmixer.workflows.records import RunStatus, StepStatus


def diamond() -> RunState:
    return RunState(
        "d",
        [
            StepNode("a", "llm", ()),
            StepNode("b", "llm", ("a",)),
            StepNode("c", "pty", ("a",)),
            StepNode("gate", "approval", ("a",)),
            StepNode("d", "llm", ("b", "c")),
        ],
        dry_run=False,
    )


def test_only_steps_with_met_needs_are_ready_in_spec_order() -> None:
    state = diamond()
    assert state.ready([], None) == ["a"]
    state.records["a"].status = StepStatus.COMPLETED
    assert state.ready([], None) == ["b", "c", "gate"]


def test_max_parallel_counts_working_steps_but_not_approvals() -> None:
    state = diamond()
    state.records["a"].status = StepStatus.COMPLETED
    assert state.ready([], 1) == ["b", "gate"]
    assert state.ready(["b"], 1) == ["gate"]


def test_skipped_needs_let_dependants_run_and_read_empty() -> None:
    state = diamond()
    for step in ("a", "c"):
        state.records[step].status = StepStatus.COMPLETED
        state.records[step].output = step.upper()
    state.records["b"].status = StepStatus.SKIPPED
    state.records["b"].output = "ignored"
    assert "d" in state.ready([], None)
    assert state.outputs() == {"a": "A", "b": "", "c": "C"}


def test_waiting_step_blocks_only_its_dependants() -> None:
    state = diamond()
    state.records["a"].status = StepStatus.COMPLETED
    state.records["b"].status = StepStatus.WAITING
    assert state.ready([], None) == ["c", "gate"]
    assert state.progress().status == RunStatus.WAITING


def test_intervention_refusals_name_the_state_and_what_applies() -> None:
    state = diamond()
    assert state.refusal("retry", "zzz") is not None and "no step 'zzz'" in str(
        state.refusal("retry", "zzz")
    )
    assert state.refusal("skip", "a") is None  # pending may be skipped
    message = state.refusal("retry", "a")
    assert message == (
        "cannot retry step 'a': it is pending, "
        "and retry applies to a step that is failed or waiting"
    )
    assert "not an approval" in str(state.refusal("approve", "b"))
    state.records["gate"].status = StepStatus.WAITING
    assert state.refusal("approve", "gate") is None
    state.status = RunStatus.COMPLETED
    assert "the run has ended" in str(state.refusal("skip", "d"))


def test_progress_totals_and_unknown_cost() -> None:
    state = diamond()
    state.records["a"].usage.input_tokens = 10
    state.records["a"].usage.output_tokens = 5
    state.records["a"].cost_usd = 0.25
    state.records["b"].cost_usd = None
    progress = state.progress()
    assert progress.usage.input_tokens == 10 and progress.usage.output_tokens == 5
    assert progress.usage.cost_usd == 0.25
    assert progress.usage.cost_complete is False


def test_summary_line_names_waiting_steps_and_why() -> None:
    state = diamond()
    state.records["a"].status = StepStatus.COMPLETED
    state.records["b"].status = StepStatus.WAITING
    state.records["b"].waiting_reason = "failed: 429 rate limited\nmore"
    assert state.summary() == "1/5 steps done · WAITING b: failed: 429 rate limited"


def test_long_outputs_are_cut_in_the_answer_but_kept_whole_for_templates() -> None:
    state = RunState("big", [StepNode("a", "llm", ()), StepNode("b", "llm", ("a",))], False, "wf-1")
    whole = "HEAD" + "x" * 500_000 + "TAIL"
    state.records["a"].status = StepStatus.COMPLETED
    state.records["a"].output = whole
    answer = state.progress().steps["a"]
    assert answer.output_chars == len(whole)
    assert answer.output is not None and len(answer.output) < 100_000
    assert answer.output.startswith("HEAD") and answer.output.endswith("TAIL")
    assert "characters cut here; the whole text: llmmixer audit wf-1" in answer.output
    assert state.outputs()["a"] == whole
    assert len(state.progress().model_dump_json()) < 256 * 1024
    short = RunState("s", [StepNode("a", "llm", ())], False)
    short.records["a"].output = "small"
    assert short.progress().steps["a"].output == "small"
    assert short.progress().steps["a"].output_chars is None
