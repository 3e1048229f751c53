"""Search attributes: ops teams find runs that need a person with Temporal's own tools."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import temporal_binary
from google.protobuf.duration_pb2 import Duration
from temporalio.api.workflowservice.v1 import RegisterNamespaceRequest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from llmmixer.client.cli import build_parser, main
from llmmixer.client.mixer import MixerClient, RunFailed
from llmmixer.client.setup import list_query, register_search_attributes
from llmmixer.core.search import SEARCH_ATTRIBUTES
from llmmixer.runtime.address import free_port
from llmmixer.workers.devserver import EmbeddedServer
from llmmixer.workers.worker import WorkerSettings, mixer_worker
from llmmixer.workflows.dag import RunState, StepNode
from llmmixer.workflows.search import RunAttributes, attribute_updates, run_attributes


@pytest.fixture
async def registered(client: Client) -> Client:
    """The session server's namespace with llmmixer's attributes, as `llmmixer setup` leaves it."""
    await register_search_attributes(client, client.namespace)
    return client


def _spec(name: str, *steps: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "dry_run": True, "steps": list(steps)}


async def _found(client: Client, query: str, want: set[str], timeout_s: float = 30) -> set[str]:
    """Workflow ids the visibility query returns, once they include ``want``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        ids = {execution.id async for execution in client.list_workflows(query)}
        if want <= ids or asyncio.get_running_loop().time() > deadline:
            return ids
        await asyncio.sleep(0.3)


def _temporal_list(env: WorkflowEnvironment, query: str) -> set[str]:
    done = subprocess.run(
        [
            temporal_binary(),
            "workflow",
            "list",
            "--address",
            env.client.service_client.config.target_host,
            "--namespace",
            env.client.namespace,
            "--query",
            query,
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    text = done.stdout.strip()
    if not text:
        return set()
    # One JSON document per line (jsonl) or one array, depending on the CLI release.
    items = json.loads(text) if text.startswith("[") else [json.loads(x) for x in text.splitlines()]
    return {item["execution"]["workflowId"] for item in items}


async def test_waiting_completed_and_failed_runs_are_found_by_their_state(
    env: WorkflowEnvironment, registered: Client, mixer: MixerClient
) -> None:
    spec_name = f"sa-{uuid.uuid4().hex[:8]}"
    ask = {"id": "ask", "provider": "openai", "model": "gpt-4.1-mini", "prompt": "hi"}
    gate = {"id": "gate", "kind": "approval", "needs": ["ask"], "prompt": "ship it?"}
    broken = {"id": "boom", "kind": "pty", "command": ["false"], "on_failure": "fail"}
    waiting = await mixer.start(_spec(spec_name, ask, gate))
    completed = await mixer.start(_spec(spec_name, ask))
    failed = await mixer.start(_spec(spec_name, broken))
    await completed.result()
    with pytest.raises(RunFailed):
        await failed.result()

    for state, handle in (("waiting", waiting), ("completed", completed), ("failed", failed)):
        query = list_query(state, spec_name)
        assert await _found(registered, query, {handle.id}) == {handle.id}, state
        # The same through the Temporal CLI an ops team uses.
        assert _temporal_list(env, f'LlmmixerState="{state}" AND LlmmixerSpec="{spec_name}"') == {
            handle.id
        }

    described = await completed.temporal.describe()
    attributes = {key.name: value for key, value in described.typed_search_attributes}
    assert attributes["LlmmixerSpec"] == spec_name
    assert attributes["LlmmixerState"] == "completed"
    assert attributes["LlmmixerProviders"] == ["openai"]
    assert attributes["LlmmixerTokens"] > 0
    assert "LlmmixerWaitingSteps" not in attributes
    on_hold = await waiting.temporal.describe()
    held = {key.name: value for key, value in on_hold.typed_search_attributes}
    assert held["LlmmixerWaitingSteps"] == ["gate"]

    # Once approved, the run leaves the waiting list.
    await waiting.approve("gate")
    await waiting.result()
    done = await _found(registered, list_query("completed", spec_name), {waiting.id, completed.id})
    assert done == {waiting.id, completed.id}
    assert await _found(registered, list_query("waiting", spec_name), set(), 2) == set()


async def test_setup_is_idempotent(client: Client) -> None:
    await register_search_attributes(client, client.namespace)
    again = await register_search_attributes(client, client.namespace)
    assert again.added == [] and sorted(again.present) == sorted(SEARCH_ATTRIBUTES)


async def test_the_embedded_server_registers_them_at_every_start(tmp_path: Path) -> None:
    for _ in range(2):  # a fresh database, then the same one again
        server = EmbeddedServer(port=free_port(), ui=False, home=tmp_path, binary=temporal_binary())
        async with server:
            client = await Client.connect(server.address)
            setup = await register_search_attributes(client, "default")
            assert setup.added == [] and sorted(setup.present) == sorted(SEARCH_ATTRIBUTES)


@pytest.fixture
async def bare_namespace(env: WorkflowEnvironment) -> AsyncIterator[Client]:
    """A namespace nobody registered llmmixer's attributes on."""
    name = f"bare-{uuid.uuid4().hex[:8]}"
    await env.client.workflow_service.register_namespace(
        RegisterNamespaceRequest(
            namespace=name, workflow_execution_retention_period=Duration(seconds=86400)
        )
    )
    bare = await Client.connect(
        env.client.service_client.config.target_host,
        namespace=name,
        data_converter=env.client.data_converter,
    )
    yield bare


async def test_a_worker_on_a_namespace_without_them_warns_once_and_runs(
    bare_namespace: Client,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    queue = f"tq-{uuid.uuid4().hex[:8]}"
    settings = dataclasses.replace(
        WorkerSettings.from_env({}), task_queue=queue, shutdown_grace_s=1.0
    )
    spec = _spec("bare", {"id": "a", "provider": "openai", "model": "gpt-4.1-mini", "prompt": "x"})
    caplog.set_level(logging.WARNING, logger="llmmixer.search")
    async with mixer_worker(bare_namespace, settings, environ={}) as worker, worker:
        mixer = MixerClient(bare_namespace, queue)
        for _ in range(60):  # a new namespace takes a moment to be served
            try:
                first = await mixer.start(spec)
                break
            except Exception:
                await asyncio.sleep(0.5)
        second = await mixer.start(spec)
        for handle in (first, second):
            result = await asyncio.wait_for(handle.result(), 60)
            assert result.status.value == "completed"
            described = await handle.temporal.describe()
            assert not [k for k, _ in described.typed_search_attributes if k.name.startswith("Llm")]
    warnings = [r for r in caplog.records if "llmmixer setup" in r.getMessage()]
    assert len(warnings) == 1
    assert "LlmmixerState" in warnings[0].getMessage()
    # Filtering by them there says what to do.
    monkeypatch.setenv("TEMPORAL_ADDRESS", bare_namespace.service_client.config.target_host)
    monkeypatch.setenv("TEMPORAL_NAMESPACE", bare_namespace.namespace)
    assert await asyncio.to_thread(main, ["list", "--state", "waiting"]) == 1
    assert "llmmixer setup" in capsys.readouterr().err


def test_only_changes_are_upserted() -> None:
    state = RunState(
        name="review",
        nodes=[StepNode("a", "llm", ()), StepNode("b", "approval", ("a",))],
        dry_run=True,
        workflow_id="w",
    )
    everything = frozenset(SEARCH_ATTRIBUTES)
    first = run_attributes(state)
    assert first == RunAttributes("review", "running", (), (), 0.0, 0)
    sent = attribute_updates(None, first, everything)
    assert {u.key.name for u in sent} == {
        "LlmmixerSpec",
        "LlmmixerState",
        "LlmmixerCostUsd",
        "LlmmixerTokens",
    }
    assert attribute_updates(first, run_attributes(state), everything) == []
    waiting = dataclasses.replace(first, state="waiting", waiting=("b",))
    changed = attribute_updates(first, waiting, everything)
    assert {u.key.name for u in changed} == {"LlmmixerState", "LlmmixerWaitingSteps"}
    cleared = attribute_updates(waiting, first, everything)
    assert {u.key.name for u in cleared} == {"LlmmixerState", "LlmmixerWaitingSteps"}
    # A namespace with only some of them gets only those.
    assert {u.key.name for u in attribute_updates(None, first, frozenset({"LlmmixerState"}))} == {
        "LlmmixerState"
    }


def test_list_filters_by_state_and_spec_and_quotes_values() -> None:
    args = build_parser().parse_args(["list", "--state", "waiting", "--spec", "review"])
    assert list_query(args.state, args.spec) == (
        'WorkflowType="MixerWorkflow" AND LlmmixerState="waiting" AND LlmmixerSpec="review" '
        'AND ExecutionStatus="Running"'
    )
    assert list_query(None, 'a" OR "1"="1') == (
        'WorkflowType="MixerWorkflow" AND LlmmixerSpec="a\\" OR \\"1\\"=\\"1"'
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["list", "--state", "sleeping"])


async def test_the_cli_sets_up_and_lists_waiting_runs_as_waiting(
    env: WorkflowEnvironment,
    mixer: MixerClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TEMPORAL_ADDRESS", env.client.service_client.config.target_host)
    monkeypatch.setenv("TEMPORAL_NAMESPACE", env.client.namespace)
    assert await asyncio.to_thread(main, ["setup"]) == 0
    assert "LlmmixerState" in capsys.readouterr().out
    spec_name = f"cli-{uuid.uuid4().hex[:8]}"
    gate = {"id": "gate", "kind": "approval", "prompt": "ok?"}
    handle = await mixer.start(_spec(spec_name, gate))
    await _found(mixer.temporal, list_query("waiting", spec_name), {handle.id})
    arguments = ["list", "--state", "waiting", "--spec", spec_name]
    assert await asyncio.to_thread(main, arguments) == 0
    assert capsys.readouterr().out.startswith(f"{handle.id}\twaiting\t")
    await handle.cancel()
