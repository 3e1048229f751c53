"""Decompose steps in real workflows: a scripted planner, plans checked, sub-steps run."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from fakes.provider_server import FakeProviderServer, Reply

from llmmixer.client.mixer import MixerClient
from llmmixer.workflows.records import RunStatus, StepStatus


@pytest.fixture
def worker_env(provider_server: FakeProviderServer) -> dict[str, str]:
    return provider_server.env()


FAST_RETRY = {"max_attempts": 3, "initial_interval_s": 0.1, "backoff": 1.0, "max_interval_s": 1}
SLOW = {"chunks": ["part ", "of ", "an ", "answer"], "chunk_delay_s": 0.25}


def spec(*steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": "decompose",
        "inputs": {"diff": "a.py b.py c.py"},
        "defaults": {
            "provider": "openai",
            "model": "gpt-4.1",
            "retry": FAST_RETRY,
            "max_tokens": 300,
        },
        "steps": list(steps),
        **extra,
    }


def planner(**fields: Any) -> dict[str, Any]:
    return {
        "id": "split",
        "kind": "decompose",
        "prompt": "Review {{inputs.diff}} by file",
        **fields,
    }


def plan(*steps: dict[str, Any]) -> str:
    return json.dumps({"steps": list(steps)})


def body_text(call: Any) -> str:
    return json.dumps(call.body)


async def test_a_valid_plan_expands_into_parallel_sub_steps_on_several_providers(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.reply(
        "openai",
        plan(
            {"id": "review-a", "provider": "anthropic", "model": "claude-haiku-4-5", "prompt": "a"},
            {"id": "review-b", "provider": "gemini", "model": "gemini-2.5-flash", "prompt": "b"},
            {"id": "review-c", "provider": "openai", "model": "gpt-4.1-mini", "prompt": "c"},
        ),
        model="gpt-4.1",
    )
    provider_server.script("anthropic", Reply(**SLOW))
    provider_server.script("gemini", Reply(**SLOW))
    provider_server.script("openai", Reply(**SLOW), model="gpt-4.1-mini")
    provider_server.reply("openai", "merged review", model="gpt-4.1")
    result = await (
        await mixer.start(
            spec(
                planner(),
                {
                    "id": "merge",
                    "needs": ["split"],
                    "prompt": "Merge:\n{{steps.split.children}}\nFirst: {{steps.review-a.output}}",
                },
            )
        )
    ).result()
    assert result.status == RunStatus.COMPLETED and result.output == "merged review"
    assert list(result.steps) == ["split", "review-a", "review-b", "review-c", "merge"]
    subs = [result.steps[i] for i in ("review-a", "review-b", "review-c")]
    assert {(r.provider, r.parent, r.status) for r in subs} == {
        ("anthropic", "split", StepStatus.COMPLETED),
        ("gemini", "split", StepStatus.COMPLETED),
        ("openai", "split", StepStatus.COMPLETED),
    }
    # parallel: every sub-step started before any of them ended
    starts = [r.started_at for r in subs]
    ends = [r.ended_at for r in subs]
    assert all(s is not None for s in starts) and all(e is not None for e in ends)
    assert max(starts) < min(ends)  # type: ignore[type-var]
    merge = result.steps["merge"]
    assert merge.started_at is not None and merge.started_at >= max(ends)  # type: ignore[type-var]
    assert merge.prompt is not None
    assert "## review-a\npart of an answer\n\n## review-b\npart of an answer" in merge.prompt
    assert merge.prompt.endswith("First: part of an answer")
    # the decompose step's output is the plan, and its planner got the task and the schema
    planned = json.loads(result.steps["split"].output or "")
    assert [s["id"] for s in planned["steps"]] == ["review-a", "review-b", "review-c"]
    planner_call = provider_server.calls[0]
    assert planner_call.model == "gpt-4.1"
    assert "Review a.py b.py c.py by file" in body_text(planner_call)
    assert "At most 8 steps" in body_text(planner_call)
    assert result.usage.input_tokens == sum(r.usage.input_tokens for r in result.steps.values())


async def test_an_invalid_plan_is_retried_with_the_validators_message(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.reply(
        "openai",
        plan(
            {"id": "x", "needs": ["y"], "prompt": "x"},
            {"id": "y", "needs": ["x"], "provider": "mistral", "model": "m", "prompt": "y"},
        ),
        model="gpt-4.1",
    )
    provider_server.reply("openai", plan({"id": "x", "prompt": "fixed"}), model="gpt-4.1")
    provider_server.reply("openai", "x done", model="gpt-4.1")
    result = await (await mixer.start(spec(planner()))).result()
    assert result.status == RunStatus.COMPLETED
    assert result.steps["split"].attempts == 2
    assert result.steps["split"].error is None
    assert result.steps["x"].output == "x done"
    first, second = provider_server.calls[0], provider_server.calls[1]
    assert "previous plan was refused" not in body_text(first)
    retry_prompt = body_text(second)
    assert "Your previous plan was refused" in retry_prompt
    assert "unknown provider 'mistral'" in retry_prompt
    assert "needs: cycle" in retry_prompt


async def test_limits_refuse_oversized_and_too_deep_plans(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    too_many = plan(*({"id": f"s{i}", "prompt": "x"} for i in range(3)))
    provider_server.reply("openai", too_many, model="gpt-4.1")
    provider_server.reply("openai", too_many, model="gpt-4.1")
    too_deep = plan({"id": "again", "kind": "decompose", "prompt": "split more"})
    provider_server.reply("anthropic", too_deep)
    provider_server.reply("anthropic", too_deep)
    two_tries = {**FAST_RETRY, "max_attempts": 2}
    result = await (
        await mixer.start(
            spec(
                planner(max_steps=2, retry=two_tries, on_failure="skip"),
                {
                    "id": "deep",
                    "kind": "decompose",
                    "provider": "anthropic",
                    "model": "claude-haiku-4-5",
                    "prompt": "split",
                    "allow_kinds": ["decompose"],
                    "retry": two_tries,
                    "on_failure": "skip",
                },
            )
        )
    ).result()
    assert result.status == RunStatus.COMPLETED
    assert set(result.steps) == {"split", "deep"}  # nothing was added
    big, deep = result.steps["split"], result.steps["deep"]
    assert big.status == deep.status == StepStatus.SKIPPED
    assert big.attempts == deep.attempts == 2
    assert "no valid plan in 2 tries" in (big.skipped_reason or "")
    assert "3 steps is too many: this plan may have at most 2" in (big.skipped_reason or "")
    assert "plans may not nest this deep (max_depth)" in (deep.skipped_reason or "")


async def test_nested_plans_within_max_depth_and_roles_chosen_by_the_spec(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.reply(
        "openai",
        plan(
            {"id": "inner", "kind": "decompose", "prompt": "split more", "max_steps": 5},
            {"id": "side", "role": "writer", "prompt": "side"},
        ),
        model="gpt-4.1",
    )
    provider_server.reply("openai", plan({"id": "leaf", "role": "writer", "prompt": "leaf"}))
    provider_server.reply("gemini", "side text")
    provider_server.reply("gemini", "leaf text")
    provider_server.reply("openai", "done", model="gpt-4.1")
    result = await (
        await mixer.start(
            spec(
                planner(max_depth=2, allow_kinds=["decompose"]),
                {
                    "id": "end",
                    "needs": ["split"],
                    "prompt": '{{join(steps.*, " | ")}}',
                },
                routes={"writer": [{"provider": "gemini", "model": "gemini-2.5-flash"}]},
            )
        )
    ).result()
    assert result.status == RunStatus.COMPLETED
    assert list(result.steps) == ["split", "inner", "leaf", "side", "end"]
    assert result.steps["leaf"].parent == "inner" and result.steps["inner"].parent == "split"
    assert (result.steps["leaf"].provider, result.steps["leaf"].model) == (
        "gemini",
        "gemini-2.5-flash",
    )
    # `end` waited for the nested plan's step too
    end = result.steps["end"]
    assert end.prompt is not None and "leaf text" in end.prompt and "side text" in end.prompt
    inner_prompt = body_text(provider_server.calls[1])
    assert "At most 5 steps" in inner_prompt and "kind 'decompose'" not in inner_prompt


async def test_plans_that_move_requests_or_commands_are_refused_before_anything_runs(
    mixer: MixerClient, provider_server: FakeProviderServer, tmp_path: Any
) -> None:
    # The planner read hostile text: each plan tries to send a request, or
    # start a command, somewhere the spec's owner never chose.
    evil = FakeProviderServer().start()
    ran = tmp_path / "ran"
    touch = [sys.executable, "-c", f"open({str(ran)!r}, 'w').close()"]
    attacks = {
        "opts": (
            {
                "id": "opts-1",
                "provider": "gemini",
                "model": "gemini-2.5-flash",
                "prompt": "x",
                "provider_options": {
                    "generation_config": {"http_options": {"base_url": evil.gemini_base_url}}
                },
            },
            "provider_options",
        ),
        "url": ({"id": "url-1", "prompt": "x", "base_url": evil.openai_base_url}, "base_url"),
        "env": (
            {
                "id": "env-1",
                "kind": "pty",
                "command": touch,
                "env": {"LD_PRELOAD": str(tmp_path / "evil.so")},
            },
            "env",
        ),
        "cwd": ({"id": "cwd-1", "kind": "pty", "command": touch, "cwd": "/"}, "cwd"),
    }
    steps = []
    for name, (step, _) in attacks.items():
        provider_server.reply("openai", plan(step), model=f"planner-{name}")
        steps.append(
            planner(
                id=name,
                model=f"planner-{name}",
                # pty steps and their `command` are allowed: only the attack is not
                allow_kinds=["pty"],
                allow_fields=["command"],
                retry={**FAST_RETRY, "max_attempts": 1},
                on_failure="skip",
            )
        )
    try:
        result = await (await mixer.start(spec(*steps))).result()
    finally:
        evil.stop()
    assert result.status == RunStatus.COMPLETED
    assert set(result.steps) == set(attacks)  # no planned step was added
    for name, (_, field) in attacks.items():
        record = result.steps[name]
        assert record.status == StepStatus.SKIPPED
        reason = record.skipped_reason or ""
        assert f"{field}: plans may not set `{field}` unless decompose step {name!r}" in reason
        assert f"add {field!r} to `allow_fields`" in reason
    assert evil.calls == []
    assert not ran.exists()
    assert sorted(call.model for call in provider_server.calls) == sorted(
        f"planner-{name}" for name in attacks
    )
    # The planner was told what it may not set.
    assert all(
        "Do not set base_url, provider_options, env, cwd, args" in body_text(call)
        for call in provider_server.calls
    )
