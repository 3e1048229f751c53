"""A person settles the last step while it waits: the run must still end.

The skip or override moves the step's record at once, in the update; the
step's own task ends a moment later without changing any state. A run whose
loop woke only on state changes would then wait for ever with every step
done, so these runs must finish by themselves.
"""

from __future__ import annotations

import asyncio

import pytest
from fakes.progress import until, waiting
from fakes.provider_server import FakeProviderServer, Reply

from llmmixer.client.mixer import MixerClient
from llmmixer.workflows.records import RunStatus, StepStatus


@pytest.fixture
def worker_env(provider_server: FakeProviderServer) -> dict[str, str]:
    return provider_server.env()


@pytest.fixture
def workflow_cache() -> int:
    return 100  # updates: see conftest.workflow_cache


async def test_an_approval_skipped_while_it_waits_ends_the_run(mixer: MixerClient) -> None:
    handle = await mixer.start(
        {
            "name": "gate",
            # A timeout makes the step notice the decision one turn after the run's loop.
            "steps": [{"id": "gate", "kind": "approval", "prompt": "Ship?", "timeout_s": 600}],
        }
    )
    await until(handle, waiting("gate"))
    outcome = await handle.skip("gate", reason="nobody to ask")
    assert outcome.status == StepStatus.SKIPPED
    result = await asyncio.wait_for(handle.result(), timeout=30)
    assert result.status == RunStatus.COMPLETED
    assert result.steps["gate"].status == StepStatus.SKIPPED
    assert result.steps["gate"].skipped_reason == "nobody to ask"
    assert result.running == [] and result.waiting == []


async def test_a_step_held_by_its_budget_and_overridden_ends_the_run(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script("openai", Reply(text="first", usage=(40, 20)))
    handle = await mixer.start(
        {
            "name": "held",
            "defaults": {"provider": "openai", "model": "gpt-4.1"},
            "budget": {"max_tokens": 50},
            "steps": [
                {"id": "a", "prompt": "a"},
                {"id": "b", "needs": ["a"], "prompt": "b"},
            ],
        }
    )
    progress = await until(handle, waiting("b"), "b is held by the budget")
    assert progress.steps["b"].budget_hold is not None
    await handle.override("b", "written by hand")
    result = await asyncio.wait_for(handle.result(), timeout=30)
    assert result.status == RunStatus.COMPLETED
    b = result.steps["b"]
    assert (b.status, b.output, b.overridden, b.budget_hold) == (
        StepStatus.COMPLETED,
        "written by hand",
        True,
        None,
    )
    assert provider_server.count() == 1  # the held step never called its provider
