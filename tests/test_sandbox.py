"""The workflow sandbox guards llmmixer's own workflow logic, not only the SDK's.

Each test plants one non-deterministic call in a copy of llmmixer's source, as
a careless change to ``workflows/`` would, and runs a real worker built with
``sandbox_runner()`` against it. The copy is first on ``sys.path``, so the
sandbox (which loads the workflow and its logic afresh for each run) loads the
planted code, while this process keeps the real modules. Had the worker passed
its logic modules through (as it once passed all of llmmixer), the sandbox would
reuse this process's unplanted modules and every run would complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from temporalio import workflow
from temporalio.api.common.v1.message_pb2 import Payloads
from temporalio.api.enums.v1 import EventType
from temporalio.api.failure.v1.message_pb2 import Failure
from temporalio.client import Client, WorkflowHandle
from temporalio.converter import DataConverter
from temporalio.service import RPCError
from temporalio.worker._workflow_instance import WorkflowInstanceDetails
from temporalio.worker.workflow_sandbox import RestrictedWorkflowAccessError
from temporalio.worker.workflow_sandbox._runner import _fake_info

import llmmixer
from llmmixer.client.mixer import MixerClient
from llmmixer.workers.plugin import SANDBOX_PASSTHROUGH_MODULES, sandbox_runner
from llmmixer.workers.worker import MixerWorker, WorkerSettings, mixer_worker
from llmmixer.workflows.mixer import MixerWorkflow
from llmmixer.workflows.records import RunStatus

SOURCE = Path(llmmixer.__file__).parent
# The workflow's logic: loaded inside the sandbox for every run.
LOGIC = (
    "workflows.mixer",
    "workflows.dag",
    "workflows.calls",
    "workflows.patches",
    "workflows.steps.base",
    "workflows.steps.budget",
    "workflows.steps.llm",
    "workflows.steps.command",
    "workflows.steps.agent",
    "workflows.steps.approval",
    "workflows.steps.decompose",
    "workflows.steps.runner",
    "workflows.reuse",
    "core.plans",
    "core.templates",
    "core.validation",
)

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

# Appended to a logic module of the copy: each wraps a function every run
# calls (the spec's shape, read when the workflow starts and on every replay)
# or runs at import, with a call a workflow must never make.
CLOCK_IN_VALIDATION = (
    "core/validation.py",
    """
import datetime as _planted_clock

_planted_parse = parse_spec_shape


def parse_spec_shape(raw):  # type: ignore[no-redef]
    _planted_clock.datetime.now()
    return _planted_parse(raw)
""",
)
ENVIRON_IN_VALIDATION = (
    "core/validation.py",
    """
import os as _planted_os

_planted_parse = parse_spec_shape


def parse_spec_shape(raw):  # type: ignore[no-redef]
    _planted_os.environ.get("LLMMIXER_PAYLOAD_KEY")
    return _planted_parse(raw)
""",
)
CLOCK_IN_TEMPLATES = (
    "core/templates.py",
    """
import datetime as _planted_clock

_planted_render = render


def render(*args, **kwargs):  # type: ignore[no-redef]
    _planted_clock.datetime.now()
    return _planted_render(*args, **kwargs)
""",
)
CLOCK_AT_IMPORT_IN_DECOMPOSE = (
    "core/plans.py",
    """
import datetime as _planted_clock

_LOADED_AT = _planted_clock.datetime.now()
""",
)


def plant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: tuple[str, str] | None) -> None:
    """A copy of llmmixer's source, with ``edit`` appended, first on sys.path."""
    copy = tmp_path / "src" / "llmmixer"
    copy.mkdir(parents=True)
    shutil.copy(SOURCE / "__init__.py", copy / "__init__.py")
    for part in ("core", "workflows", "activities", "runtime"):
        shutil.copytree(SOURCE / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    if edit is not None:
        relative, code = edit
        with (copy / relative).open("a") as module:
            module.write(code)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))


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


async def test_only_model_modules_are_taken_from_the_worker() -> None:
    # What one run's sandbox holds: logic loaded afresh, models shared. Catches
    # a logic import moved under imports_passed_through(), which would pass it
    # through whatever sandbox_runner() says.
    runner = sandbox_runner()
    instance = runner.create_instance(_details())
    loaded = instance.importer.new_modules  # type: ignore[attr-defined]
    ours = {name: module for name, module in loaded.items() if name.startswith("llmmixer.")}
    shared = {name for name, module in ours.items() if module is sys.modules.get(name)}
    assert shared == set(SANDBOX_PASSTHROUGH_MODULES) - {"yaml"}
    logic = {f"llmmixer.{name}" for name in LOGIC}
    assert logic <= set(ours) - shared


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


async def test_the_unmodified_copy_runs(
    client: Client, task_queue: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The copy itself is sound: the refusals below are the planted calls'.
    plant(tmp_path, monkeypatch, None)
    async with running(client, task_queue) as mixer:
        result = await asyncio.wait_for((await mixer.start(SPEC)).result(), timeout=60)
    assert result.status == RunStatus.COMPLETED
    assert (result.steps["b"].prompt or "").startswith("then [dry-run]")


@pytest.mark.parametrize(
    ("edit", "refused"),
    [
        pytest.param(CLOCK_IN_VALIDATION, "datetime.datetime.now", id="clock-in-validation"),
        pytest.param(ENVIRON_IN_VALIDATION, "os.environ", id="environ-in-validation"),
    ],
)
async def test_a_forbidden_call_in_workflow_logic_fails_the_workflow_task(
    client: Client,
    task_queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    edit: tuple[str, str],
    refused: str,
) -> None:
    plant(tmp_path, monkeypatch, edit)
    async with running(client, task_queue) as mixer:
        run = await mixer.start(SPEC)
        handle = run.temporal
        try:
            message = await first_task_failure(handle)
        finally:
            with contextlib.suppress(RPCError):  # already over when the call was not refused
                await handle.terminate("test over")
    assert "Cannot access" in message and refused in message
    assert "from inside a workflow" in message


async def test_a_forbidden_call_while_running_a_step_fails_the_workflow_task(
    client: Client, task_queue: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plant(tmp_path, monkeypatch, CLOCK_IN_TEMPLATES)  # every step renders its prompt
    async with running(client, task_queue) as mixer:
        handle = (await mixer.start(SPEC)).temporal
        try:
            message = await first_task_failure(handle, seconds=10)
        finally:
            with contextlib.suppress(RPCError):
                await handle.terminate("test over")
    assert "datetime.datetime.now" in message


async def test_a_clock_read_at_import_of_workflow_logic_stops_the_worker_at_start(
    client: Client, task_queue: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plant(tmp_path, monkeypatch, CLOCK_AT_IMPORT_IN_DECOMPOSE)
    # The SDK loads the workflow into a sandbox once when the worker is built.
    with pytest.raises(RuntimeError, match="Failed validating workflow MixerWorkflow") as caught:
        async with worker(client, task_queue):
            pass
    assert isinstance(caught.value.__cause__, RestrictedWorkflowAccessError)
    assert "datetime.datetime.now" in str(caught.value.__cause__)
