"""Every spec in examples/ runs to completion with --dry-run on a real Temporal server.

Approval steps are approved as a person would; PTY steps run for real (in the
repository, so `git log` has commits to show).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmmixer.client.mixer import MixerClient
from llmmixer.workflows.records import RunProgress, RunStatus, StepStatus

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
TEXTS = {path.name: path.read_text() for path in EXAMPLES}


@pytest.fixture
def workflow_cache() -> int:
    return 100  # approvals are updates: see conftest.workflow_cache


def test_there_are_examples_of_the_decompose_pattern() -> None:
    assert {"code-review.yaml", "research.yaml", "release-notes.yaml"} <= set(TEXTS)


async def run_to_the_end(mixer: MixerClient, spec: dict[str, Any]) -> RunProgress:
    handle = await mixer.start(spec, dry_run=True)
    for _ in range(600):
        progress = await handle.progress()
        if progress.status in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED):
            break
        for step_id in progress.waiting:
            record = progress.steps[step_id]
            assert record.kind == "approval", f"{step_id} waits: {record.waiting_reason}"
            await handle.approve(step_id, comment="approved by tests/test_examples.py")
        await asyncio.sleep(0.1)
    return await handle.result()


@pytest.mark.parametrize("name", sorted(TEXTS))
async def test_example_runs_dry(mixer: MixerClient, name: str) -> None:
    spec = yaml.safe_load(TEXTS[name])
    for value in (spec.get("inputs") or {}).values():
        if isinstance(value, dict) and isinstance(value.get("file"), str):
            # Relative to the spec's file, as `llmmixer run examples/...` reads it.
            value["file"] = str(REPO / "examples" / value["file"])
    for step in spec["steps"]:
        if step.get("kind") == "pty":
            step["cwd"] = str(REPO)
    result = await run_to_the_end(mixer, spec)
    assert result.status == RunStatus.COMPLETED, result.error
    assert result.dry_run and result.output
    for step_id, record in result.steps.items():
        assert record.status == StepStatus.COMPLETED, (step_id, record.error)
    if name == "vision.yaml":
        # The dry run says what a real run would send, and sends nothing.
        for step_id in ("claude", "gpt", "gemini"):
            assert "would attach vision.png (image/png, 224 bytes)" in (
                result.steps[step_id].output or ""
            )
    planners = [i for i, r in result.steps.items() if r.kind == "decompose"]
    for planner in planners:
        subs = [r for r in result.steps.values() if r.parent == planner]
        # a plan fans out in parallel over several providers
        assert len(subs) >= 2, name
        assert len({r.provider for r in subs}) >= 2, name
