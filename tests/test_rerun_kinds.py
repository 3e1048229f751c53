"""``rerun`` of the steps whose call is more than one activity: a fallback chain,
``best_of``, ``decompose`` and approval gates.

Real workflows on the dev server; providers are the fake server, which counts
every request, so "reused" means the provider was never asked.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from fakes.progress import until
from fakes.provider_server import FakeProviderServer

from llmmixer.client.audit import audit_from_client
from llmmixer.client.mixer import MixerClient, RunFailed
from llmmixer.workflows.records import InterventionRequest, RunStatus, StepStatus


@pytest.fixture
def worker_env(provider_server: FakeProviderServer) -> dict[str, str]:
    return provider_server.env()


RETRY = {"max_attempts": 1, "initial_interval_s": 0.1, "backoff": 1.0, "max_interval_s": 1}


def spec(*steps: dict[str, Any], last: list[str]) -> dict[str, Any]:
    """``steps``, then a command on the last of them that fails the source run."""
    return {
        "name": "kinds",
        "inputs": {"topic": "ducks"},
        "defaults": {
            "provider": "openai",
            "model": "gpt-4.1-mini",
            "retry": RETRY,
            "on_failure": "fail",
        },
        "steps": [
            *steps,
            {"id": "check", "kind": "pty", "needs": [steps[-1]["id"]], "command": last},
        ],
    }


async def failed(mixer: MixerClient, body: dict[str, Any]) -> str:
    handle = await mixer.start(body)
    with pytest.raises(RunFailed):
        await handle.result()
    return handle.id


def fixed(body: dict[str, Any]) -> dict[str, Any]:
    """The same spec whose last command succeeds."""
    edited = copy.deepcopy(body)
    edited["steps"][-1]["command"] = ["echo", "fixed"]
    return edited


async def test_a_step_a_fallback_answered_is_reused_while_its_chain_is_unchanged(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    step = {
        "id": "draft",
        "prompt": "write about {{inputs.topic}}",
        "fallback": [{"provider": "anthropic", "model": "claude-haiku-4-5"}],
    }
    body = spec(step, last=["false"])
    provider_server.fail("openai", 400, message="bad request", model="gpt-4.1-mini")
    source = await failed(mixer, body)
    assert provider_server.count("anthropic") == 1
    asked = provider_server.count()

    result = await (await mixer.rerun(source, spec=fixed(body))).result()

    assert result.status == RunStatus.COMPLETED
    assert provider_server.count() == asked  # neither the primary nor the fallback asked
    assert result.steps["draft"].reused_from == f"{source}/draft"
    assert "claude" not in (result.steps["draft"].model or "")

    # Another fallback target: the answer may differ, so the step runs again.
    other = fixed(body)
    other["steps"][0]["fallback"] = [{"provider": "gemini", "model": "gemini-2.5-flash"}]
    again = await (await mixer.rerun(source, spec=other)).result()
    assert again.steps["draft"].reused_from is None
    assert provider_server.count() == asked + 1  # the primary answers this time


async def test_best_of_is_reused_whole_and_runs_again_when_its_upstream_changed(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    body = spec(
        {"id": "draft", "prompt": "write about {{inputs.topic}}"},
        {
            "id": "pick",
            "needs": ["draft"],
            "prompt": "improve: {{steps.draft.output}}",
            "best_of": {
                "n": 2,
                "targets": [
                    {"provider": "anthropic", "model": "claude-haiku-4-5"},
                    {"provider": "gemini", "model": "gemini-2.5-flash"},
                ],
                "judge": {"provider": "openai", "model": "gpt-4.1", "prompt": "pick one"},
            },
        },
        last=["false"],
    )
    source = await failed(mixer, body)
    assert provider_server.count() == 4  # draft, two candidates, the judge

    result = await (await mixer.rerun(source, spec=fixed(body))).result()

    assert result.status == RunStatus.COMPLETED
    assert provider_server.count() == 4
    assert result.steps["pick"].reused_from == f"{source}/pick"

    # Another judge instruction is another call.
    judged = fixed(body)
    judged["steps"][1]["best_of"]["judge"]["prompt"] = "merge them"
    rejudged = await (await mixer.rerun(source, spec=judged)).result()
    assert rejudged.steps["draft"].reused_from == f"{source}/draft"
    assert rejudged.steps["pick"].reused_from is None
    assert provider_server.count() == 7

    # An edited upstream step changes the candidates' prompt: all run again.
    edited = fixed(body)
    edited["steps"][0]["prompt"] = "write a poem about {{inputs.topic}}"
    again = await (await mixer.rerun(source, spec=edited)).result()
    assert again.steps["draft"].reused_from is None
    assert again.steps["pick"].reused_from is None
    assert provider_server.count() == 11


def plan(*steps: dict[str, Any]) -> str:
    return json.dumps({"steps": list(steps)})


async def test_a_reused_decompose_step_adds_its_plan_again_and_its_steps_are_reused(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    body = spec(
        {"id": "split", "kind": "decompose", "prompt": "split {{inputs.topic}}"},
        last=["false"],
    )
    provider_server.reply(
        "openai",
        plan({"id": "part-a", "prompt": "a"}, {"id": "part-b", "prompt": "b"}),
        model="gpt-4.1-mini",
    )
    source = await failed(mixer, body)
    assert provider_server.count() == 3  # the planner and the two planned steps

    result = await (await mixer.rerun(source, spec=fixed(body))).result()

    assert result.status == RunStatus.COMPLETED
    assert provider_server.count() == 3  # the planner was not asked, nor its steps
    steps = result.steps
    assert steps["split"].reused_from == f"{source}/split"
    assert steps["part-a"].reused_from == f"{source}/part-a"
    assert steps["part-b"].reused_from == f"{source}/part-b"
    assert steps["part-a"].parent == "split"

    # Planning the step again (--from) asks the planner, and its new steps run.
    provider_server.reply("openai", plan({"id": "part-c", "prompt": "c"}), model="gpt-4.1-mini")
    forced = await (await mixer.rerun(source, spec=fixed(body), from_steps=["split"])).result()
    assert forced.steps["split"].reused_from is None
    assert set(forced.steps) == {"split", "part-c", "check"}
    assert provider_server.count() == 5


async def test_an_approved_gate_is_reused_with_who_approved_it_and_asked_again_after_a_change(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    body = spec(
        {"id": "draft", "prompt": "write about {{inputs.topic}}"},
        {"id": "gate", "kind": "approval", "needs": ["draft"], "prompt": "Ship it?"},
        last=["false"],
    )
    handle = await mixer.start(body)
    await until(handle, lambda p: p.steps["gate"].status == StepStatus.WAITING, "gate waits")
    await handle.temporal.signal("approve", InterventionRequest(step="gate", comment="looks good"))
    with pytest.raises(RunFailed):
        await handle.result()

    rerun = await mixer.rerun(handle.id, spec=fixed(body))
    result = await rerun.result()

    assert result.status == RunStatus.COMPLETED
    gate = result.steps["gate"]
    assert gate.reused_from == f"{handle.id}/gate"
    assert gate.output == "looks good"
    [approval] = gate.interventions
    assert approval.type == "approve"
    assert approval.argument["by"] == mixer.temporal.identity
    assert approval.argument["reused_from"] == f"{handle.id}/gate"
    audit = await audit_from_client(mixer.temporal, rerun.id)
    assert audit["steps"]["gate"]["reused_from"] == f"{handle.id}/gate"

    # The draft written again (another prompt) is not what the person approved.
    edited = fixed(body)
    edited["steps"][0]["prompt"] = "write a poem about {{inputs.topic}}"
    again = await mixer.rerun(handle.id, spec=edited)
    await until(again, lambda p: p.steps["gate"].status == StepStatus.WAITING, "gate asks again")
    await again.temporal.signal("approve", InterventionRequest(step="gate"))
    assert (await again.result()).steps["gate"].reused_from is None


async def test_a_rejected_gate_is_asked_again(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    body = spec(
        {"id": "draft", "prompt": "write about {{inputs.topic}}"},
        {"id": "gate", "kind": "approval", "needs": ["draft"], "prompt": "Ship it?"},
        last=["echo", "shipped"],
    )
    handle = await mixer.start(body)
    await until(handle, lambda p: p.steps["gate"].status == StepStatus.WAITING, "gate waits")
    await handle.temporal.signal("reject", InterventionRequest(step="gate", reason="not yet"))
    with pytest.raises(RunFailed):
        await handle.result()

    rerun = await mixer.rerun(handle.id)
    await until(rerun, lambda p: p.steps["gate"].status == StepStatus.WAITING, "gate asks again")
    progress = await rerun.progress()
    assert progress.steps["draft"].reused_from == f"{handle.id}/draft"
    assert progress.steps["gate"].reused_from is None
    await rerun.temporal.signal("approve", InterventionRequest(step="gate"))
    assert (await rerun.result()).status == RunStatus.COMPLETED
