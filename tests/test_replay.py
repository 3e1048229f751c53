"""Recorded histories of every released behaviour replay against the current code.

A change that would break runs in flight (a different command order for the
same history) fails here; guard such a change with ``workflow.patched``.
Record new histories with ``python tests/histories/record.py [SCENARIO ...]``
(one scenario per file, named ``<release>-<scenario>.json``; see that script).
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowHistory

from llmmixer.activities import checks
from llmmixer.core import plans as decompose
from llmmixer.core import validation
from llmmixer.core.validation import SpecIssue
from llmmixer.workers import plugin
from llmmixer.workflows.mixer import CHECKS_RECORDED_PATCH
from llmmixer.workflows.patches import RELEASE_2026_11_PATCH

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))
# Payloads the recording workers kept outside history (the payload-store run).
PAYLOADS = Path(__file__).parent / "histories" / "payloads"


def test_there_are_histories_to_replay() -> None:
    assert len(HISTORIES) >= 3


TEXTS = {path.stem: path.read_text() for path in HISTORIES}


def _patches(text: str) -> set[str]:
    patches = set()
    for event in json.loads(text)["events"]:
        marker = event.get("markerRecordedEventAttributes", {})
        if marker.get("markerName") == "core_patch":
            data = marker["details"]["patch-data"]["payloads"][0]["data"]
            patches.add(json.loads(base64.b64decode(data))["id"])
    return patches


# Recorded since spec and plan checks keep their verdict in history.
# Recorded with their checks: with the patch that brought them, or with a
# release's patch that stands for it (workflows/patches.py).
CHECKED = sorted(
    name
    for name, text in TEXTS.items()
    if {CHECKS_RECORDED_PATCH, RELEASE_2026_11_PATCH} & set(_patches(text))
)


def payload_env(directory: Path) -> dict[str, str]:
    """The payload settings of the recording workers, reading a copy of their store.

    A copy: the replayed workflow encodes what it sends again, and must not
    write into the committed directory.
    """
    shutil.copytree(PAYLOADS, directory, dirs_exist_ok=True)
    return {
        "LLMMIXER_PAYLOAD_STORE": "fs",
        "LLMMIXER_PAYLOAD_DIR": str(directory),
        "LLMMIXER_PAYLOAD_THRESHOLD_BYTES": "1024",
    }


async def replay(name: str, payloads: Path) -> None:
    history = WorkflowHistory.from_json(name, TEXTS[name])
    replayer = plugin.mixer_replayer(payload_env(payloads))
    result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None


@pytest.mark.parametrize("name", sorted(TEXTS))
async def test_history_replays(name: str, tmp_path: Path) -> None:
    await replay(name, tmp_path)


# ---- what each recorded history holds ------------------------------------------------
#
# A history kept to prove that runs in flight survive a change must still hold
# the behaviour it was recorded for; re-recording one that no longer does
# (a scenario that stopped reaching its timer, say) fails here, not silently.


def _events(name: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = json.loads(TEXTS[name])["events"]
    return events


def _types(name: str) -> list[str]:
    return [event["eventType"].removeprefix("EVENT_TYPE_") for event in _events(name)]


def _payloads(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        if "metadata" in value and "data" in value:
            yield value
        for item in value.values():
            yield from _payloads(item)
    elif isinstance(value, list):
        for item in value:
            yield from _payloads(item)


def _decoded(payload: dict[str, Any], key: str) -> str:
    return base64.b64decode(payload["metadata"].get(key, "")).decode()


def _failures(name: str) -> list[tuple[str, str]]:
    """(activity type of the failure, message) of every failed activity."""
    return [
        (
            event["activityTaskFailedEventAttributes"]["failure"]["applicationFailureInfo"]["type"],
            event["activityTaskFailedEventAttributes"]["failure"]["message"],
        )
        for event in _events(name)
        if "activityTaskFailedEventAttributes" in event
    ]


def _scheduled(name: str) -> list[str]:
    return [
        event["activityTaskScheduledEventAttributes"]["activityType"]["name"]
        for event in _events(name)
        if "activityTaskScheduledEventAttributes" in event
    ]


def _approval_timers(name: str) -> None:
    types = _types(name)
    # The first approval's timer fires (its default applies); the second is
    # decided by an update, which cancels its timer.
    assert types.count("TIMER_STARTED") == 2
    assert types.index("TIMER_FIRED") < types.index("WORKFLOW_EXECUTION_UPDATE_ACCEPTED")
    assert types.index("WORKFLOW_EXECUTION_UPDATE_COMPLETED") < types.index("TIMER_CANCELED")
    assert types[-1] == "WORKFLOW_EXECUTION_COMPLETED"


def _pause_timer(name: str) -> None:
    types = _types(name)
    assert types.index("ACTIVITY_TASK_FAILED") < types.index("TIMER_FIRED")
    assert types[-1] == "WORKFLOW_EXECUTION_FAILED"
    failure = _events(name)[-1]["workflowExecutionFailedEventAttributes"]["failure"]
    assert "pause_timeout_s" in failure["message"]


def _pause_retried(name: str) -> None:
    types = _types(name)
    # Paused with a timer; a retry by update cancelled it and the step ran again.
    assert types.index("ACTIVITY_TASK_FAILED") < types.index("TIMER_STARTED")
    assert types.index("WORKFLOW_EXECUTION_UPDATE_COMPLETED") < types.index("TIMER_CANCELED")
    assert types.count("ACTIVITY_TASK_SCHEDULED") == 2
    assert types[-1] == "WORKFLOW_EXECUTION_COMPLETED"


def _continue_as_new(name: str) -> None:
    assert _types(name)[-1] == "WORKFLOW_EXECUTION_CONTINUED_AS_NEW"
    # The approval was waiting when the run handed over: the next run carries it.
    handed = _events(name)[-1]["workflowExecutionContinuedAsNewEventAttributes"]
    carried = json.loads(base64.b64decode(handed["input"]["payloads"][2]["data"]))
    assert carried["state"]["records"]["gate"]["status"] == "waiting"


def _continued(name: str) -> None:
    started = _events(name)[0]["workflowExecutionStartedEventAttributes"]
    assert started["continuedExecutionRunId"]
    # The waiting approval was carried over and decided in this run.
    assert "WORKFLOW_EXECUTION_UPDATE_ACCEPTED" in _types(name)
    assert _types(name)[-1] == "WORKFLOW_EXECUTION_COMPLETED"


def _fallback_circuit(name: str) -> None:
    failures = _failures(name)
    assert [kind for kind, _ in failures] == ["ProviderRetryable", "CircuitOpen"]
    assert all(message.startswith("openai/gpt-4.1: ") for _, message in failures)
    # Each failure was followed by the step's fallback, and the run completed.
    assert _scheduled(name).count("llmmixer.call_llm") == 4
    assert _types(name)[-1] == "WORKFLOW_EXECUTION_COMPLETED"


def _payload_store(name: str) -> None:
    stored = [
        p
        for p in _payloads(_events(name))
        if _decoded(p, "messageType") == "temporal.api.sdk.v1.ExternalStorageReference"
    ]
    # The command's output, the next step's prompt holding it, the run's result.
    assert len(stored) == 3
    for reference in stored:
        digest = json.loads(base64.b64decode(reference["data"]))["claimData"]["sha256"]
        assert (PAYLOADS / "sha256" / digest[:2] / digest).is_file()


def _plan_reasked(name: str) -> None:
    scheduled = _scheduled(name)
    assert scheduled.count("llmmixer.check_plan") == 2
    first, second = (i for i, n in enumerate(scheduled) if n == "llmmixer.check_plan")
    # The planner was asked again between the refused plan and the accepted one.
    assert scheduled[first + 1] == "llmmixer.call_llm"
    assert second == first + 2
    assert _types(name)[-1] == "WORKFLOW_EXECUTION_COMPLETED"


def _wait_handover(name: str) -> None:
    types = _types(name)
    # Twenty steps ran, then the run handed over with only the approval left.
    assert _scheduled(name).count("llmmixer.call_llm") == 20
    assert types[-1] == "WORKFLOW_EXECUTION_CONTINUED_AS_NEW"
    handed = _events(name)[-1]["workflowExecutionContinuedAsNewEventAttributes"]
    carried = json.loads(base64.b64decode(handed["input"]["payloads"][2]["data"]))
    assert carried["state"]["records"]["gate"]["status"] == "waiting"


def _woken(name: str) -> None:
    # The continuation woke for the approval and ran only the last step.
    assert "WORKFLOW_EXECUTION_UPDATE_ACCEPTED" in _types(name)
    assert _scheduled(name).count("llmmixer.call_llm") == 1
    assert len(_events(name)) < 40
    assert _types(name)[-1] == "WORKFLOW_EXECUTION_COMPLETED"


def _upserted(name: str) -> list[dict[str, Any]]:
    """What each of llmmixer's own upserts set (not the SDK's ``TemporalChangeVersion``)."""
    found = []
    for event in _events(name):
        attributes = event.get("upsertWorkflowSearchAttributesEventAttributes")
        if attributes is None:
            continue
        fields = attributes["searchAttributes"]["indexedFields"]
        if any(key.startswith("Llmmixer") for key in fields):
            found.append(
                {
                    key: json.loads(base64.b64decode(value["data"])) if "data" in value else None
                    for key, value in fields.items()
                }
            )
    return found


def _search_upserts(name: str) -> None:
    upserts = _upserted(name)
    # Written at the start; the first step's tokens wait until a step ends a
    # minute later (the refresh); c1's are written before continuing as new.
    assert [set(u) for u in upserts] == [
        {"LlmmixerSpec", "LlmmixerState", "LlmmixerCostUsd", "LlmmixerTokens"},
        {"LlmmixerProviders", "LlmmixerTokens"},
        {"LlmmixerTokens"},
    ]
    assert _types(name)[-1] == "WORKFLOW_EXECUTION_CONTINUED_AS_NEW"


def _search_upserts_continued(name: str) -> None:
    # It started with its parent's values: only changes of state are written.
    states = [u.get("LlmmixerState") for u in _upserted(name)]
    assert states == ["waiting", "running", "completed"]
    assert _types(name)[-1] == "WORKFLOW_EXECUTION_COMPLETED"


HOLDS: dict[str, Callable[[str], None]] = {
    "0.1.0-approval-timers": _approval_timers,
    "0.1.0-pause-timer": _pause_timer,
    "0.1.0-pause-retried": _pause_retried,
    "0.1.0-continue-as-new": _continue_as_new,
    "0.1.0-continue-as-new-run2": _continued,
    "0.1.0-fallback-circuit": _fallback_circuit,
    "0.1.0-payload-store": _payload_store,
    "0.1.0-plan-reasked": _plan_reasked,
    "0.1.0-wait-handover": _wait_handover,
    "0.1.0-wait-handover-run2": _woken,
    "0.1.0-search-upserts": _search_upserts,
    "0.1.0-search-upserts-run2": _search_upserts_continued,
}


@pytest.mark.parametrize("name", sorted(HOLDS))
def test_the_history_holds_what_it_was_recorded_for(name: str) -> None:
    HOLDS[name](name)


async def test_a_stored_output_is_read_from_the_store_on_replay(tmp_path: Path) -> None:
    # Without the payloads the run kept outside history, its replay cannot
    # rebuild the run: the replay above really read them.
    history = WorkflowHistory.from_json("payload-store", TEXTS["0.1.0-payload-store"])
    empty = {**payload_env(tmp_path / "copy"), "LLMMIXER_PAYLOAD_DIR": str(tmp_path / "none")}
    replayer = plugin.mixer_replayer(empty)
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is not None
    # The store's own error, naming where it looked.
    assert f"is not in {tmp_path / 'none'}" in str(result.replay_failure)


def test_some_histories_were_recorded_with_their_checks() -> None:
    assert {"0.1.0-checked", "0.1.0-invalid-spec", "0.1.0-plan-reasked"} <= set(CHECKED)


@pytest.mark.parametrize("name", CHECKED)
@pytest.mark.parametrize("verdict", ["refuse", "accept"])
async def test_a_rule_changed_later_does_not_change_a_recorded_run(
    name: str, verdict: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def rules(raw: object) -> Iterator[SpecIssue]:
        if verdict == "refuse":
            yield SpecIssue("spec", "(document)", "a rule added after this run was recorded")

    for module in (validation, decompose, checks):
        monkeypatch.setattr(module, "find_issues", rules)
    await replay(name, tmp_path)
