"""Routes, best_of with a judge, and budgets that stop spending until a person raises them."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fakes.progress import until
from fakes.provider_server import FakeProviderServer, Reply

from llmmixer.client.mixer import InterventionRefused, MixerClient
from llmmixer.workflows.records import RunStatus, StepStatus


@pytest.fixture
def worker_env(provider_server: FakeProviderServer) -> dict[str, str]:
    return provider_server.env()


@pytest.fixture
def workflow_cache() -> int:
    return 100  # updates: see conftest.workflow_cache


FAST_RETRY = {"max_attempts": 2, "initial_interval_s": 0.1, "backoff": 1.0, "max_interval_s": 1}


def spec(*steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": "routing",
        "defaults": {"provider": "openai", "model": "gpt-4.1", "retry": FAST_RETRY},
        "steps": list(steps),
        **extra,
    }


async def test_roles_map_to_the_routes_primary_then_its_fallbacks(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.fail("gemini", 400, message="model overloaded for this key")
    provider_server.reply("anthropic", "from the second target")
    provider_server.reply("openai", "from the fast route", model="gpt-4.1-mini")
    routes = {
        "reviewer": [
            {"provider": "gemini", "model": "gemini-2.5-pro"},
            {"provider": "anthropic", "model": "claude-opus-5-5"},
        ],
        "fast": [{"provider": "openai", "model": "gpt-4.1-mini"}],
    }
    result = await (
        await mixer.start(
            spec(
                {"id": "review", "role": "reviewer", "prompt": "review"},
                {"id": "quick", "role": "fast", "prompt": "quick"},
                routes=routes,
            )
        )
    ).result()
    review, quick = result.steps["review"], result.steps["quick"]
    assert (review.provider, review.model, review.output) == (
        "anthropic",
        "claude-opus-5-5",
        "from the second target",
    )
    assert [(f.provider, f.model) for f in review.fallbacks] == [("gemini", "gemini-2.5-pro")]
    assert (quick.provider, quick.model) == ("openai", "gpt-4.1-mini")
    assert provider_server.count("gemini", "gemini-2.5-pro") == 1


async def test_best_of_runs_n_candidates_in_parallel_then_the_judge(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    slow = {"chunk_delay_s": 0.2}
    provider_server.script("anthropic", Reply(chunks=["claude ", "draft"], usage=(10, 2), **slow))
    provider_server.script("gemini", Reply(chunks=["gemini ", "draft"], usage=(10, 3), **slow))
    provider_server.script(
        "openai", Reply(chunks=["gpt ", "draft"], usage=(10, 4), **slow), model="gpt-4.1-mini"
    )
    provider_server.script("openai", Reply(text="the chosen draft", usage=(50, 5)), model="o3")
    step = {
        "id": "notes",
        "prompt": "Write release notes",
        "best_of": {
            "n": 3,
            "targets": [
                {"provider": "anthropic", "model": "claude-haiku-4-5"},
                {"provider": "gemini", "model": "gemini-2.5-flash"},
                {"provider": "openai", "model": "gpt-4.1-mini"},
            ],
            "judge": {"provider": "openai", "model": "o3", "prompt": "Pick the clearest."},
        },
    }
    started = asyncio.get_running_loop().time()
    result = await (await mixer.start(spec(step))).result()
    elapsed = asyncio.get_running_loop().time() - started
    record = result.steps["notes"]
    assert record.status == StepStatus.COMPLETED and record.output == "the chosen draft"
    assert [(c.provider, c.output) for c in record.candidates] == [
        ("anthropic", "claude draft"),
        ("gemini", "gemini draft"),
        ("openai", "gpt draft"),
    ]
    assert (record.provider, record.model) == ("openai", "o3")
    assert record.attempts == 4  # three candidates and the judge
    assert (record.usage.input_tokens, record.usage.output_tokens) == (80, 14)
    judge_call = next(c for c in provider_server.calls if c.model == "o3")
    text = json.dumps(judge_call.body)
    assert "Pick the clearest." in text and "Write release notes" in text
    for number, draft in enumerate(["claude draft", "gemini draft", "gpt draft"], start=1):
        assert f"Candidate {number}" in text and draft in text
    candidate_calls = [c for c in provider_server.calls if c.model != "o3"]
    assert len(candidate_calls) == 3
    # side by side: the three calls arrived before the first could have ended
    arrivals = sorted(c.received_at for c in candidate_calls)
    assert arrivals[-1] - arrivals[0] < 0.35, arrivals
    assert elapsed < 10


async def test_a_spent_budget_holds_the_next_step_until_raise_budget(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script("openai", Reply(text="first", usage=(40, 20)))
    provider_server.script("openai", Reply(text="second", usage=(5, 5)))
    handle = await mixer.start(
        spec(
            {"id": "a", "prompt": "a"},
            {"id": "b", "needs": ["a"], "prompt": "b after {{steps.a.output}}"},
            {"id": "c", "needs": ["a"], "prompt": "c"},
            budget={"max_tokens": 50},
        )
    )
    progress = await until(
        handle,
        lambda p: p.steps["b"].status == p.steps["c"].status == StepStatus.WAITING,
        "b and c wait",
    )
    assert progress.status == RunStatus.WAITING
    reason = progress.steps["b"].waiting_reason or ""
    assert reason.startswith("budget: 60 tokens spent of max_tokens 50 (the spec's budget)")
    assert provider_server.count() == 1  # nothing more was spent
    with pytest.raises(InterventionRefused, match="only raises"):
        await handle.raise_budget(max_tokens=40)
    with pytest.raises(InterventionRefused, match="has no budget"):
        await handle.raise_budget(step="b", max_tokens=400)
    await handle.skip("c", reason="not worth it")
    limits = await handle.raise_budget(max_tokens=1000)
    assert limits.max_tokens == 1000
    result = await handle.result()
    assert result.status == RunStatus.COMPLETED
    assert result.steps["b"].output == "second" and result.steps["c"].status == StepStatus.SKIPPED
    assert provider_server.count() == 2
    events = [e async for e in handle.events()]
    waited = [e for e in events if e.type.value == "step_waiting" and e.step == "b"]
    assert waited and "budget" in waited[0].data
    assert any(
        e.type.value == "intervention_accepted" and e.data.get("action") == "raise_budget"
        for e in events
    )


async def test_a_decompose_budget_applies_to_its_sub_steps(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.reply(
        "openai",
        json.dumps(
            {
                "steps": [
                    {"id": "s1", "prompt": "one"},
                    {"id": "s2", "needs": ["s1"], "prompt": "two"},
                ]
            }
        ),
        usage=(500, 500),  # the planner's own spending is not the sub-steps'
    )
    provider_server.script("openai", Reply(text="one done", usage=(10, 15)))
    provider_server.script("openai", Reply(text="two done", usage=(1, 1)))
    handle = await mixer.start(
        spec(
            {"id": "split", "kind": "decompose", "prompt": "split", "budget": {"max_tokens": 20}},
            budget={"max_tokens": 5000},
        )
    )
    progress = await until(
        handle, lambda p: "s2" in p.steps and p.steps["s2"].status == StepStatus.WAITING, "s2"
    )
    assert "(the budget of split)" in (progress.steps["s2"].waiting_reason or "")
    with pytest.raises(InterventionRefused, match="max_tokens must be above"):
        await handle.raise_budget(step="split", max_tokens=20)
    await handle.raise_budget(step="split", max_tokens=100)
    result = await handle.result()
    assert result.steps["s2"].output == "two done"
