"""A run's spec and plans are checked once; history keeps the verdict, replay reads it.

Releases tighten validation rules (security work does). Were the workflow to
re-run them on replay, every run in flight whose spec or plan a new rule
refuses would fail with a non-determinism error after the upgrade. These
tests record runs, tighten (or loosen) the rules, and replay.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError, WorkflowHistory

from llmmixer.activities import checks
from llmmixer.client.mixer import MixerClient
from llmmixer.core import plans as decompose
from llmmixer.core import validation
from llmmixer.core.contracts import PlanCheck, PlanCheckLimits, PlanCheckResult, SpecCheck
from llmmixer.core.validation import SpecIssue
from llmmixer.workers import plugin
from llmmixer.workflows.mixer import CHECKS_RECORDED_PATCH
from llmmixer.workflows.records import RunStatus, StepStatus

SPEC: dict[str, Any] = {
    "name": "recorded-checks",
    "dry_run": True,
    "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
    "routes": {
        "a": [{"provider": "anthropic", "model": "claude-haiku-4-5"}],
        "b": [{"provider": "gemini", "model": "gemini-2.5-flash"}],
    },
    "steps": [
        {"id": "split", "kind": "decompose", "prompt": "Split the work"},
        {"id": "end", "needs": ["split"], "prompt": "{{steps.split.children}}"},
    ],
}
TIGHTENED = "refused by a rule added after this run started"


def _refuse_everything(raw: object) -> Iterator[SpecIssue]:
    yield SpecIssue("spec", "(document)", TIGHTENED)


def _accept_everything(raw: object) -> Iterator[SpecIssue]:
    return iter(())


def set_rules(monkeypatch: pytest.MonkeyPatch, rules: Any) -> None:
    """Every place the spec and plan rules are read from, as a release would change them."""
    for module in (validation, decompose, checks):
        monkeypatch.setattr(module, "find_issues", rules)


async def replay(history: WorkflowHistory) -> None:
    replayer = plugin.mixer_replayer()
    result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None


def markers(history: WorkflowHistory) -> list[str]:
    return [
        event.marker_recorded_event_attributes.marker_name
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
    ]


def activities(history: WorkflowHistory) -> list[str]:
    return [
        event.activity_task_scheduled_event_attributes.activity_type.name
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]


async def start_raw(mixer: MixerClient, spec: dict[str, Any]) -> Any:
    """As the plain Temporal CLI starts a run: no client-side validation first."""
    return await mixer.temporal.start_workflow(
        "MixerWorkflow",
        spec,
        id=f"raw-{uuid.uuid4().hex[:8]}",
        task_queue=mixer.task_queue,
    )


async def test_a_rule_tightened_after_a_run_started_does_not_break_its_replay(
    mixer: MixerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = await mixer.start(SPEC)
    result = await handle.result()
    assert result.status == RunStatus.COMPLETED
    assert {"split-1", "split-2", "split-3"} <= set(result.steps)  # a plan was checked
    history = await handle.temporal.fetch_history()
    # The verdicts are in history: the spec check's as a local activity's
    # marker, the plan check's as an activity's result.
    # (The other local activity: which search attributes the namespace has.
    # One patch, the release's, stands for every earlier one: workflows/patches.py.)
    assert markers(history).count("core_local_activity") == 2
    assert markers(history).count("core_patch") == 1
    assert activities(history).count("llmmixer.check_plan") == 1

    set_rules(monkeypatch, _refuse_everything)
    # The stricter rule is in force: a new run with the same spec is refused at its start...
    fresh = await start_raw(mixer, SPEC)
    with pytest.raises(WorkflowFailureError) as caught:
        await fresh.result()
    assert f"spec: (document): {TIGHTENED}" in str(caught.value.cause)
    # ...but the run that started before it replays as it ran: on a replayer, and
    # on the worker, whose every query on a closed run replays it (no cache in tests).
    await replay(history)
    progress = await handle.progress()
    assert progress.status == RunStatus.COMPLETED
    assert progress.steps["end"].status == StepStatus.COMPLETED


async def test_an_invalid_spec_stays_refused_on_replay_when_the_rule_is_loosened(
    mixer: MixerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = {"name": "bad", "steps": [{"id": "a", "prompt": "no provider anywhere"}]}
    handle = await start_raw(mixer, bad)
    with pytest.raises(WorkflowFailureError) as caught:
        await handle.result()
    message = str(caught.value.cause)
    assert "invalid spec, nothing was started" in message
    assert "step a: provider: no provider: set `provider` on the step or in `defaults`" in message
    history = await handle.fetch_history()

    set_rules(monkeypatch, _accept_everything)
    await replay(history)
    progress = await mixer.get_handle(handle.id).progress()
    assert progress.steps == {}  # nothing was started, as before the check moved


async def test_a_shape_error_still_fails_the_run_with_step_and_field(mixer: MixerClient) -> None:
    bad = {
        "name": "shape",
        "steps": [
            {"id": "a", "kind": "pty"},
            {"id": "b", "kind": "teleport"},
            {"id": "c", "prompt": "x", "promt": "typo"},
        ],
    }
    handle = await start_raw(mixer, bad)
    with pytest.raises(WorkflowFailureError) as caught:
        await handle.result()
    message = str(caught.value.cause)
    assert "invalid spec, nothing was started" in message
    assert "step a: command: is required: add it" in message
    assert "step b: kind: unknown kind 'teleport'" in message
    assert "step c: promt: is not a known field" in message
    # Refused before anything was checked or started: no local activity ran.
    history = await handle.fetch_history()
    assert "core_local_activity" not in markers(history)


def test_the_patch_id_is_the_one_recorded() -> None:
    # Renaming it would make every run recorded with it replay the old way.
    assert CHECKS_RECORDED_PATCH == "checks-recorded"


def _deep(levels: int) -> Any:
    value: Any = "x"
    for _ in range(levels):
        value = {"a": value}
    return value


async def test_a_document_too_deep_to_walk_is_refused_not_a_crash() -> None:
    spec = {
        "name": "deep",
        "defaults": {"provider": "openai", "model": "gpt-4.1"},
        "steps": [{"id": "a", "prompt": "x", "provider_options": _deep(50_000)}],
    }
    result = await checks.check_spec_activity(SpecCheck(spec=spec))
    assert [(i.step, i.field) for i in result.issues] == [("spec", "(document)")]
    assert "nested too deeply" in result.issues[0].message


async def test_the_plan_check_activity_applies_the_limits_it_is_given() -> None:
    request = PlanCheck(
        text=json.dumps({"steps": [{"id": "split-1", "prompt": "x", "base_url": "http://e"}]}),
        spec=SPEC,
        step_id="split",
        limits=PlanCheckLimits(max_steps=2, max_depth=1, kinds=["llm"]),
        taken_ids=["split", "end"],
    )
    refused = await checks.check_plan_activity(request)
    assert refused.steps == []
    assert [(i.step, i.field) for i in refused.issues] == [("split-1", "base_url")]
    request.limits.fields = ["base_url"]
    accepted = await checks.check_plan_activity(request)
    assert accepted.issues == []
    assert accepted.steps == [
        {"id": "split-1", "kind": "llm", "prompt": "x", "base_url": "http://e"}
    ]


# ---- a tightened rule against histories recorded by an earlier version --------------

HISTORIES = Path(__file__).parent / "histories"
Rule = Callable[[Mapping[str, Any]], Iterator[SpecIssue]]


def _steps(raw: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    steps = raw.get("steps")
    for step in steps if isinstance(steps, list) else []:
        if isinstance(step, Mapping):
            yield step


def _approval_needs_default(raw: Mapping[str, Any]) -> Iterator[SpecIssue]:
    for step in _steps(raw):
        if step.get("kind") == "approval" and "default" not in step:
            yield SpecIssue(
                str(step.get("id")), "default", "say what happens when nobody decides: set it"
            )


def _prompt_says_enough(raw: Mapping[str, Any]) -> Iterator[SpecIssue]:
    for step in _steps(raw):
        prompt = step.get("prompt")
        if isinstance(prompt, str) and len(prompt) < 10:
            yield SpecIssue(str(step.get("id")), "prompt", "under 10 characters: say what to do")


def tightened(rule: Rule) -> Callable[[object], Iterator[SpecIssue]]:
    """Today's rules and one more, as a release that tightens validation ships them."""
    today = validation.find_issues

    def rules(raw: object) -> Iterator[SpecIssue]:
        yield from today(raw)
        if isinstance(raw, Mapping):
            yield from rule(raw)

    return rules


def _decoded(payload: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(payload["data"]))


async def _spec_verdict(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """What the spec check says today about the spec the recorded run started with."""
    started = events[0]["workflowExecutionStartedEventAttributes"]
    spec = _decoded(started["input"]["payloads"][0])
    result = await checks.check_spec_activity(SpecCheck(spec=spec))
    return [(issue.step, issue.field) for issue in result.issues]


async def _plan_verdict(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """What the plan check says today about the plan the recorded run accepted."""
    by_id = {event["eventId"]: event for event in events}
    accepted = [
        (event["activityTaskScheduledEventAttributes"], by_id[str(int(event["eventId"]) + 2)])
        for event in events
        if event.get("activityTaskScheduledEventAttributes", {}).get("activityType", {}).get("name")
        == "llmmixer.check_plan"
    ][-1]
    scheduled, completed = accepted
    recorded = PlanCheckResult.model_validate(
        _decoded(completed["activityTaskCompletedEventAttributes"]["result"]["payloads"][0])
    )
    assert recorded.issues == [] and recorded.steps, "the recorded run accepted this plan"
    request = PlanCheck.model_validate(_decoded(scheduled["input"]["payloads"][0]))
    result = await checks.check_plan_activity(request)
    return [(issue.step, issue.field) for issue in result.issues]


@pytest.mark.parametrize(
    ("name", "rule", "verdict", "refused"),
    [
        # A spec the recorded run was started with, refused by a rule added later.
        ("0.1.0-approval-timers", _approval_needs_default, _spec_verdict, [("gate", "default")]),
        # A plan the recorded run accepted (after one it was refused), refused
        # by a rule added later.
        (
            "0.1.0-plan-reasked",
            _prompt_says_enough,
            _plan_verdict,
            [("split-1", "prompt"), ("split-2", "prompt")],
        ),
    ],
)
async def test_a_recorded_run_replays_under_a_rule_that_would_refuse_it_today(
    name: str,
    rule: Rule,
    verdict: Callable[[list[dict[str, Any]]], Any],
    refused: list[tuple[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = (HISTORIES / f"{name}.json").read_text()
    events = json.loads(text)["events"]
    assert await verdict(events) == []  # the rules it ran under accept it
    set_rules(monkeypatch, tightened(rule))
    # The stricter rule is in force where a new run's checks read it...
    assert await verdict(events) == refused
    # ...and the run recorded before it replays as it ran: its verdicts are in history.
    await replay(WorkflowHistory.from_json(name, text))
