"""Recorded histories of every released behaviour replay against the current code.

A change that would break runs in flight (a different command order for the
same history) fails here; guard such a change with ``workflow.patched``.
Record new histories with ``python tests/histories/record.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from llmmixer.workers.connection import data_converter
from llmmixer.workers.worker import sandbox_runner
from llmmixer.workflows.mixer import MixerWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_there_are_histories_to_replay() -> None:
    assert len(HISTORIES) >= 3


TEXTS = {path.stem: path.read_text() for path in HISTORIES}


@pytest.mark.parametrize("name", sorted(TEXTS))
async def test_history_replays(name: str) -> None:
    history = WorkflowHistory.from_json(name, TEXTS[name])
    replayer = Replayer(
        workflows=[MixerWorkflow],
        data_converter=data_converter(),
        workflow_runner=sandbox_runner(),
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None
