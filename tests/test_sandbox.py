"""llmmixer and Temporal's workflow sandbox.

``MixerWorkflow`` runs outside the sandbox (``sandboxed=False``), and all of
``llmmixer.core`` and ``llmmixer.workflows`` passes through it
(``SANDBOX_PASSTHROUGH_MODULES`` in ``workers/plugin.py``) for any sandboxed
use, such as a replayer's: a sandbox takes the worker's modules instead of
loading the workflow and its logic again for every run, which was most of
llmmixer's cost per run. Nothing refuses a clock read, ``os.environ`` or
``open()`` in that code while a run executes: the static check in
``tests/test_determinism.py`` refuses them before the code runs. The run
below uses a real worker with ``max_cached_workflows=0``, so every workflow
task replays the run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
from temporalio import workflow
from temporalio.api.common.v1.message_pb2 import Payloads
from temporalio.api.enums.v1 import EventType
from temporalio.api.failure.v1.message_pb2 import Failure
from temporalio.client import Client, WorkflowHandle
from temporalio.converter import DataConverter
from temporalio.worker._workflow_instance import WorkflowInstanceDetails
from temporalio.worker.workflow_sandbox._runner import _fake_info

from llmmixer.client.mixer import MixerClient
from llmmixer.core.spec import Spec
from llmmixer.workers.plugin import SANDBOX_PASSTHROUGH_MODULES, sandbox_runner
from llmmixer.workers.worker import MixerWorker, WorkerSettings, mixer_worker
from llmmixer.workflows.mixer import MixerWorkflow
from llmmixer.workflows.records import RunStatus

SPEC: dict[str, Any] = {
    "name": "sandboxed",
    "dry_run": True,
    "inputs": {"topic": "determinism"},
    "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
    "steps": [
        {"id": "a", "prompt": "about {{inputs.topic}}"},
        {"id": "b", "needs": ["a"], "prompt": "then {{steps.a.output}}"},
    ],
}


def worker(client: Client, task_queue: str) -> AbstractAsyncContextManager[MixerWorker]:
    environ = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    settings = dataclasses.replace(
        WorkerSettings.from_env(environ), task_queue=task_queue, shutdown_grace_s=2.0
    )
    # 0: every workflow task loads the workflow into a fresh sandbox.
    return mixer_worker(client, settings, environ=environ, max_cached_workflows=0)


@asynccontextmanager
async def running(client: Client, task_queue: str) -> AsyncIterator[MixerClient]:
    async with worker(client, task_queue) as built, built:
        yield MixerClient(client, task_queue)


async def first_task_failure(handle: WorkflowHandle[Any, Any], seconds: float = 30) -> str:
    """The message of the run's first failed workflow task (the sandbox's verdict)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        async for event in handle.fetch_history_events():
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
                return str(event.workflow_task_failed_event_attributes.failure.message)
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
                raise AssertionError("the run completed: the planted call was not refused")
        await asyncio.sleep(0.2)
    raise AssertionError(f"no workflow task failed within {seconds} s")


@pytest.fixture
def task_queue() -> str:
    return f"sandbox-{uuid.uuid4()}"


def _details() -> WorkflowInstanceDetails:
    """What the SDK hands a runner when it checks a workflow at worker start."""
    converter = DataConverter.default
    return WorkflowInstanceDetails(
        payload_converter_factory=converter._new_payload_converter,
        failure_converter_class=converter.failure_converter_class,
        interceptor_classes=[],
        defn=workflow._Definition.must_from_class(MixerWorkflow),
        info=_fake_info,
        randomness_seed=-1,
        extern_functions={},
        disable_eager_activity_execution=False,
        worker_level_failure_exception_types=[],
        patch_activation_callback=None,
        last_completion_result=Payloads(),
        last_failure=Failure(),
    )


async def test_a_runs_sandbox_loads_nothing_of_llmmixer_afresh() -> None:
    # Each run (and each replay after an eviction) builds one of these. Catches
    # a module of the workflow's left out of SANDBOX_PASSTHROUGH_MODULES, which
    # every run would load again (about 45 ms and 830 KB per run for the
    # logic before it passed through).
    runner = sandbox_runner()
    for _ in range(2):
        instance = runner.create_instance(_details())
        loaded = instance.importer.new_modules  # type: ignore[attr-defined]
        ours = {name: module for name, module in loaded.items() if name.startswith("llmmixer.")}
        afresh = sorted(
            name for name, module in ours.items() if module is not sys.modules.get(name)
        )
        assert not afresh, f"loaded again for this run: {afresh}"
        assert "llmmixer.workflows.mixer" in ours
        # The run's workflow class and the types that cross the data converter
        # are the worker's own: an instance made on one side validates on the other.
        in_sandbox = instance.globals_and_locals["__temporal_workflow_class"]  # type: ignore[attr-defined]
        assert in_sandbox is MixerWorkflow
        run_module = ours["llmmixer.workflows.mixer"]
        assert run_module.Spec is Spec and run_module.RunStatus is RunStatus


def test_the_passthrough_list_names_whole_trees() -> None:
    # A name covers its submodules in the SDK's matching, so a module added
    # under core/ or workflows/ passes through (and is checked statically)
    # without being listed.
    assert {"llmmixer.core", "llmmixer.workflows"} <= set(SANDBOX_PASSTHROUGH_MODULES)


async def test_a_run_completes_with_every_task_in_a_fresh_sandbox(
    client: Client, task_queue: str
) -> None:
    async with running(client, task_queue) as mixer:
        result = await asyncio.wait_for((await mixer.start(SPEC)).result(), timeout=60)
    assert result.status == RunStatus.COMPLETED
    assert (result.steps["b"].prompt or "").startswith("then [dry-run]")
