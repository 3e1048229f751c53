"""Recorded histories of every released behaviour replay against the current code.

A change that would break runs in flight (a different command order for the
same history) fails here; guard such a change with ``workflow.patched``.
Record new histories with ``python tests/histories/record.py``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory

from llmmixer.activities import checks
from llmmixer.core import plans as decompose
from llmmixer.core import validation
from llmmixer.core.validation import SpecIssue
from llmmixer.workers import plugin
from llmmixer.workflows.mixer import CHECKS_RECORDED_PATCH

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


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
CHECKED = sorted(name for name, text in TEXTS.items() if CHECKS_RECORDED_PATCH in _patches(text))


async def replay(name: str) -> None:
    history = WorkflowHistory.from_json(name, TEXTS[name])
    replayer = plugin.mixer_replayer()
    result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None


@pytest.mark.parametrize("name", sorted(TEXTS))
async def test_history_replays(name: str) -> None:
    await replay(name)


def test_some_histories_were_recorded_with_their_checks() -> None:
    assert {"0.1.0-checked", "0.1.0-invalid-spec"} <= set(CHECKED)


@pytest.mark.parametrize("name", CHECKED)
@pytest.mark.parametrize("verdict", ["refuse", "accept"])
async def test_a_rule_changed_later_does_not_change_a_recorded_run(
    name: str, verdict: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def rules(raw: object) -> Iterator[SpecIssue]:
        if verdict == "refuse":
            yield SpecIssue("spec", "(document)", "a rule added after this run was recorded")

    for module in (validation, decompose, checks):
        monkeypatch.setattr(module, "find_issues", rules)
    # The workflow sandbox loads its own copy of these modules from source; it
    # must see the patched rules as a new release's workflow would.
    monkeypatch.setattr(
        plugin,
        "SANDBOX_PASSTHROUGH_MODULES",
        (*plugin.SANDBOX_PASSTHROUGH_MODULES, validation.__name__, decompose.__name__),
    )
    await replay(name)
