"""Ops teams submit work with nothing but the `temporal` CLI and `llmmixer worker`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import temporal_binary
from temporalio.testing import WorkflowEnvironment

SPEC = {
    "name": "cli",
    "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
    "dry_run": True,
    "steps": [
        {"id": "first", "prompt": "one"},
        {"id": "left", "needs": ["first"], "prompt": "L {{steps.first.output}}"},
        {
            "id": "right",
            "needs": ["first"],
            "provider": "gemini",
            "model": "gemini-2.5-flash",
            "prompt": "R",
        },
        {"id": "last", "needs": ["left", "right"], "prompt": "{{steps.left.output}}"},
    ],
}


def _address(env: WorkflowEnvironment) -> str:
    return env.client.service_client.config.target_host


@pytest.fixture
def llmmixer_worker(env: WorkflowEnvironment, task_queue: str, tmp_path: Path) -> Iterator[str]:
    """`llmmixer worker` as its own process, as an ops team would run it."""
    log = (tmp_path / "worker.log").open("w")
    environ = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "TEMPORAL_ADDRESS": _address(env),
        "LLMMIXER_TASK_QUEUE": task_queue,
        # A source tree that is not installed is found the way this test found it.
        **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"},
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "llmmixer.client.cli", "worker"],
        env=environ,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(1.5)
        assert process.poll() is None, (tmp_path / "worker.log").read_text()
        yield task_queue
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def temporal(env: WorkflowEnvironment, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [temporal_binary(), *args, "--address", _address(env)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def start_with_temporal_cli(
    env: WorkflowEnvironment, task_queue: str, tmp_path: Path, spec: dict[str, Any], prefix: str
) -> str:
    """`temporal workflow start --type MixerWorkflow --input-file ...`; the workflow id."""
    spec_file = tmp_path / f"{prefix}.json"
    spec_file.write_text(json.dumps(spec))
    workflow_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    started = temporal(
        env,
        "workflow",
        "start",
        "--type",
        "MixerWorkflow",
        "--task-queue",
        task_queue,
        "--workflow-id",
        workflow_id,
        "--input-file",
        str(spec_file),
    )
    assert started.returncode == 0, started.stderr
    return workflow_id


def test_start_with_the_temporal_cli_and_query_progress(
    env: WorkflowEnvironment, llmmixer_worker: str, tmp_path: Path
) -> None:
    workflow_id = start_with_temporal_cli(env, llmmixer_worker, tmp_path, SPEC, "cli")
    result = temporal(env, "workflow", "result", "--workflow-id", workflow_id, "-o", "json")
    assert result.returncode == 0, result.stderr
    progress = temporal(
        env, "workflow", "query", "--workflow-id", workflow_id, "--name", "progress", "-o", "json"
    )
    assert progress.returncode == 0, progress.stderr
    body = json.loads(progress.stdout)
    answer = body["queryResult"][0] if "queryResult" in body else body
    assert answer["status"] == "completed"
    assert set(answer["steps"]) == {"first", "left", "right", "last"}
    step = answer["steps"]["right"]
    assert step["status"] == "completed" and step["attempts"] == 1
    assert step["provider"] == "gemini" and step["model"] == "gemini-2.5-flash"
    assert set(step["usage"]) >= {"input_tokens", "output_tokens"}
    assert "cost_usd" in step and "overridden" in step and "error" in step
    assert answer["output"] == answer["steps"]["last"]["output"]
    assert set(answer["usage"]) >= {"input_tokens", "output_tokens", "cost_usd"}


def test_an_invalid_spec_from_the_temporal_cli_fails_with_the_message(
    env: WorkflowEnvironment, llmmixer_worker: str, tmp_path: Path
) -> None:
    bad = {
        "name": "bad",
        "steps": [
            {"id": "a", "kind": "llm", "prompt": "x"},
            {"id": "b", "needs": ["zz"], "kind": "pty", "command": ["ls"]},
        ],
    }
    workflow_id = start_with_temporal_cli(env, llmmixer_worker, tmp_path, bad, "bad")
    result = temporal(env, "workflow", "result", "--workflow-id", workflow_id)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "invalid spec" in text
    assert "step a: provider: no provider" in text
    assert "step b: needs.0: unknown step 'zz'" in text
