"""Replies cut at the token limit, and refusals, inside a real workflow against the fake.

A truncated reply is continued or fails visibly, never passes as complete; a
refusal fails the step at once unless the step lets it fall back.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fakes.provider_server import FakeProviderServer, Reply

from llmmixer.activities.llm import CONTINUE_PROMPT
from llmmixer.client.mixer import MixerClient, RunFailed
from llmmixer.core.contracts import ErrorType
from llmmixer.workflows.records import StepRecord, StepStatus


@pytest.fixture
def worker_env(provider_server: FakeProviderServer) -> dict[str, str]:
    return provider_server.env()


FAST_RETRY = {"max_attempts": 3, "initial_interval_s": 0.1, "backoff": 1.0, "max_interval_s": 1}


def spec(*steps: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    return {
        "name": "truncation",
        "defaults": {"retry": FAST_RETRY, "max_tokens": 50, "on_failure": "fail", **defaults},
        "steps": list(steps),
    }


async def failed_step(mixer: MixerClient, run: dict[str, Any]) -> StepRecord:
    """Step ``a`` of a run that fails (its on_failure is fail)."""
    handle = await mixer.start(run)
    with pytest.raises(RunFailed):
        await handle.result()
    record = (await handle.progress()).steps["a"]
    assert record.status == StepStatus.FAILED
    return record


def step(**fields: Any) -> dict[str, Any]:
    return {"id": "a", "provider": "openai", "model": "gpt-4.1-mini", "prompt": "review", **fields}


async def test_a_cut_text_reply_is_continued_and_joined(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script(
        "openai",
        Reply(chunks=["The first half, "], finish_reason="length", usage=(10, 50)),
        Reply(text="and the rest.", usage=(70, 4)),
    )
    result = await (await mixer.start(spec(step()))).result()
    record = result.steps["a"]
    assert record.output == "The first half, and the rest."
    assert record.finish_reason == "stop" and not record.truncated
    assert (record.usage.input_tokens, record.usage.output_tokens) == (80, 54)
    assert record.attempts == 1  # one activity: the history is what it always was
    first, second = provider_server.calls
    assert second.body["messages"][-2:] == [
        {"role": "assistant", "content": "The first half, "},
        {"role": "user", "content": CONTINUE_PROMPT},
    ]
    assert first.body["messages"] == second.body["messages"][:-2]


async def test_still_cut_after_max_continuations_fails_visibly_without_retries(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script("openai", *[Reply(text="more ", finish_reason="length")] * 10)
    record = await failed_step(mixer, spec(step(max_continuations=2)))
    assert "still cut off after 2 continuation(s)" in (record.error or "")
    assert "max_tokens" in (record.error or "")
    assert provider_server.count("openai") == 3  # the call and two continuations, once


async def test_a_cut_json_reply_fails_the_attempt_and_is_retried(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script(
        "openai",
        Reply(text='{"findings": ["a", "b', finish_reason="length"),
        Reply(text='{"findings": ["a"]}'),
    )
    result = await (await mixer.start(spec(step(response_format="json")))).result()
    record = result.steps["a"]
    assert json.loads(record.output or "") == {"findings": ["a"]}
    assert record.attempts == 2 and provider_server.count("openai") == 2
    # The retry asks for room: the same limit would most likely cut it again.
    first, second = provider_server.calls
    assert (first.body["max_tokens"], second.body["max_tokens"]) == (50, 100)


@pytest.mark.parametrize(
    ("provider", "model", "cut", "limit_field"),
    [
        ("anthropic", "claude-haiku-4-5", "max_tokens", "max_tokens"),
        ("gemini", "gemini-2.5-flash", "MAX_TOKENS", "maxOutputTokens"),
    ],
)
async def test_each_provider_retries_a_cut_json_reply_with_a_raised_limit(
    mixer: MixerClient,
    provider_server: FakeProviderServer,
    provider: str,
    model: str,
    cut: str,
    limit_field: str,
) -> None:
    provider_server.script(
        provider,
        Reply(text='{"findings": ["a", "b', finish_reason=cut),
        Reply(text='{"findings": ["a"]}'),
    )
    run = spec(step(provider=provider, model=model, response_format="json"))
    record = (await (await mixer.start(run)).result()).steps["a"]
    assert json.loads(record.output or "") == {"findings": ["a"]}

    def limit(body: dict[str, Any]) -> Any:
        return body.get(limit_field, body.get("generationConfig", {}).get(limit_field))

    assert [limit(call.body) for call in provider_server.calls] == [50, 100]


async def test_a_text_reply_that_is_retried_for_another_reason_keeps_its_limit(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script("openai", Reply(status=503), Reply(text='{"ok": true}'))
    record = (await (await mixer.start(spec(step(response_format="json")))).result()).steps["a"]
    assert record.attempts == 2
    assert [call.body["max_tokens"] for call in provider_server.calls] == [50, 50]


async def test_a_json_reply_that_is_always_cut_fails_naming_max_tokens(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script("openai", *[Reply(text='{"a": [1', finish_reason="length")] * 5)
    record = await failed_step(mixer, spec(step(response_format="json")))
    assert record.attempts == 3
    # Doubled on each retry, up to four times the step's own limit.
    assert [call.body["max_tokens"] for call in provider_server.calls] == [50, 100, 200]
    assert "cut off at max_tokens 200" in (record.error or "")
    assert "not valid JSON" not in (record.error or "")  # the cause, not its symptom


async def test_accept_keeps_a_cut_reply_and_says_so(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script("gemini", Reply(text="half a review", finish_reason="MAX_TOKENS"))
    result = await (
        await mixer.start(
            spec(step(provider="gemini", model="gemini-2.5-flash"), on_truncation="accept")
        )
    ).result()
    record = result.steps["a"]
    assert record.status == StepStatus.COMPLETED and record.output == "half a review"
    assert record.truncated and record.finish_reason == "MAX_TOKENS"
    assert provider_server.count() == 1


async def test_a_refusal_fails_the_step_at_once_without_falling_back(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script("anthropic", Reply(text="I won't.", finish_reason="refusal"))
    fallback = [{"provider": "openai", "model": "gpt-4.1-mini"}]
    record = await failed_step(
        mixer, spec(step(provider="anthropic", model="claude-haiku-4-5", fallback=fallback))
    )
    assert record.attempts == 1
    assert "refused" in (record.error or "") and "fallback_on" in (record.error or "")
    assert provider_server.count("openai") == 0


async def test_fallback_on_refused_tries_the_next_target(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script("gemini", Reply(block_reason="PROHIBITED_CONTENT"))
    provider_server.script("openai", Reply(text="answered"))
    fallback = [{"provider": "openai", "model": "gpt-4.1-mini"}]
    result = await (
        await mixer.start(
            spec(
                step(
                    provider="gemini",
                    model="gemini-2.5-flash",
                    fallback=fallback,
                    fallback_on=["refused"],
                )
            )
        )
    ).result()
    record = result.steps["a"]
    assert record.output == "answered" and record.provider == "openai"
    [note] = record.fallbacks
    assert note.error_type == ErrorType.REFUSED and "PROHIBITED_CONTENT" in note.error
    assert provider_server.count("gemini") == 1  # a refusal is never retried
