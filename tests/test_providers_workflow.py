"""Every provider through its real SDK, inside a real workflow, against the fake servers.

A provider outage should be a non-event: retries honour Retry-After, a cut
stream is retried, a dead provider is left for the next one in the chain.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest
from fakes.progress import until, waiting
from fakes.provider_server import FakeProviderServer, Reply

from llmmixer.activities.pricing import PriceTable
from llmmixer.client.mixer import MixerClient
from llmmixer.core.contracts import Usage
from llmmixer.workflows.records import RunStatus, StepStatus


@pytest.fixture
def worker_env(
    provider_server: FakeProviderServer, request: pytest.FixtureRequest
) -> dict[str, str]:
    """The fake servers' endpoints and keys, adjusted by a test's markers."""
    env = provider_server.env()
    if marker := request.node.get_closest_marker("without_key"):
        del env[marker.args[0]]
    if marker := request.node.get_closest_marker("worker_env"):
        env.update(marker.kwargs)
    return env


FAST_RETRY = {"max_attempts": 3, "initial_interval_s": 0.1, "backoff": 1.0, "max_interval_s": 1}


def spec(*steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": "providers",
        "defaults": {"retry": FAST_RETRY, "max_tokens": 200},
        "steps": list(steps),
        **extra,
    }


async def test_three_providers_side_by_side_with_usage_and_cost(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script("anthropic", Reply(text="from claude", usage=(11, 3)))
    provider_server.script("openai", Reply(text="from gpt", usage=(7, 2)))
    provider_server.script("gemini", Reply(text="from gemini", usage=(5, 4)))
    provider_server.script("openai", Reply(text="merged", usage=(20, 1)))
    result = await (
        await mixer.start(
            spec(
                {
                    "id": "claude",
                    "provider": "anthropic",
                    "model": "claude-haiku-4-5",
                    "prompt": "a",
                    "system": "be brief",
                },
                {"id": "gpt", "provider": "openai", "model": "gpt-4.1-mini", "prompt": "b"},
                {"id": "gem", "provider": "gemini", "model": "gemini-2.5-flash", "prompt": "c"},
                {
                    "id": "merge",
                    "provider": "openai",
                    "model": "gpt-4.1",
                    "api": "responses",
                    "needs": ["claude", "gpt", "gem"],
                    "prompt": "{{steps.claude.output}}|{{steps.gpt.output}}|{{steps.gem.output}}",
                },
            )
        )
    ).result()
    assert result.status == RunStatus.COMPLETED
    assert result.output == "merged"
    prices = PriceTable.load()
    expected = {
        "claude": ("anthropic", "claude-haiku-4-5", (11, 3)),
        "gpt": ("openai", "gpt-4.1-mini", (7, 2)),
        "gem": ("gemini", "gemini-2.5-flash", (5, 4)),
        "merge": ("openai", "gpt-4.1", (20, 1)),
    }
    for step_id, (provider, model, (tokens_in, tokens_out)) in expected.items():
        record = result.steps[step_id]
        assert (record.provider, record.model) == (provider, model)
        assert (record.usage.input_tokens, record.usage.output_tokens) == (tokens_in, tokens_out)
        price = prices.cost(
            provider, model, Usage(input_tokens=tokens_in, output_tokens=tokens_out)
        )
        assert price is not None and record.cost_usd == pytest.approx(price)
        assert record.latency_ms is not None and record.latency_ms > 0
    assert result.usage.input_tokens == 43 and result.usage.output_tokens == 10
    assert result.usage.cost_usd == pytest.approx(
        sum(r.cost_usd or 0 for r in result.steps.values())
    )
    merge_call = next(c for c in provider_server.calls if c.model == "gpt-4.1")
    assert merge_call.api == "responses"
    assert "from claude|from gpt|from gemini" in json.dumps(merge_call.body)
    claude_call = next(c for c in provider_server.calls if c.provider == "anthropic")
    assert claude_call.body.get("system") and claude_call.stream


async def test_retry_after_sets_the_next_delay(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.fail("openai", 429, headers={"retry-after": "2"}, message="slow down")
    provider_server.reply("openai", "finally")
    step = {"id": "a", "provider": "openai", "model": "gpt-4.1-mini", "prompt": "x"}
    result = await (await mixer.start(spec(step))).result()
    assert result.steps["a"].output == "finally"
    assert result.steps["a"].attempts == 2
    first, second = provider_server.calls
    # initial_interval_s is 0.1: only the Retry-After header explains a 2 s gap
    assert second.received_at - first.received_at >= 1.9


async def test_server_error_then_success_and_a_cut_stream_are_retried(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.fail("anthropic", 500, message="overloaded")
    provider_server.cut("anthropic", after_chunks=2, text="a b c d e f")
    provider_server.reply("anthropic", "whole answer")
    step = {"id": "a", "provider": "anthropic", "model": "claude-haiku-4-5", "prompt": "x"}
    run = spec(step)
    run["defaults"]["heartbeat_timeout_s"] = 60
    result = await (await mixer.start(run)).result()
    assert result.steps["a"].output == "whole answer"  # never the truncated text
    assert result.steps["a"].attempts == 3
    assert provider_server.count("anthropic") == 3
    # The cut attempt fails as soon as the connection drops: the retry does
    # not wait for Temporal to give up on a silent attempt (60 s here).
    _, cut, retried = provider_server.calls
    assert retried.received_at - cut.received_at < 30


async def test_a_model_silent_longer_than_the_heartbeat_timeout_is_not_declared_lost(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    # A reasoning model opens the stream and thinks before its first token.
    provider_server.script("openai", Reply(text="considered answer", think_s=3.0))
    step = {"id": "a", "provider": "openai", "model": "o4-mini", "prompt": "think"}
    run = spec(step)
    run["defaults"]["heartbeat_timeout_s"] = 1
    result = await (await mixer.start(run)).result()
    assert result.steps["a"].output == "considered answer"
    assert result.steps["a"].attempts == 1
    assert provider_server.count("openai") == 1


async def test_a_stream_that_stalls_mid_way_is_retried_after_the_heartbeat_timeout(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.script("openai", Reply(text="a b c d", stall_after=1))
    provider_server.reply("openai", "whole answer")
    step = {"id": "a", "provider": "openai", "model": "gpt-4.1-mini", "prompt": "x"}
    run = spec(step)
    # The call's own timeout_s stays at its default (600 s): only the
    # heartbeat timeout can end the stalled attempt this soon.
    run["defaults"]["heartbeat_timeout_s"] = 1
    result = await asyncio.wait_for((await mixer.start(run)).result(), 30)
    assert result.steps["a"].output == "whole answer"  # never the stalled half
    assert result.steps["a"].attempts == 2
    assert provider_server.count("openai") == 2


async def test_bad_request_is_not_retried(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.fail("gemini", 400, message="invalid argument: temperature")
    step = {"id": "a", "provider": "gemini", "model": "gemini-2.5-flash", "prompt": "x"}
    handle = await mixer.start(spec(step))
    progress = await until(handle, waiting("a"), "a waits")
    assert provider_server.count("gemini") == 1
    assert progress.steps["a"].attempts == 1
    assert (
        "400" in (progress.steps["a"].error or "")
        or "bad request" in (progress.steps["a"].error or "").lower()
    )
    await handle.skip("a")
    await handle.result()


async def test_a_dead_provider_falls_back_with_the_reason_recorded(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.fail("gemini", 503, message="unavailable", times=50)
    provider_server.script("openai", Reply(text="from the fallback", usage=(3, 4)))
    provider_server.script("anthropic", Reply(text="claude fine", usage=(2, 2)))
    result = await (
        await mixer.start(
            spec(
                {"id": "ok", "provider": "anthropic", "model": "claude-haiku-4-5", "prompt": "x"},
                {
                    "id": "gem",
                    "provider": "gemini",
                    "model": "gemini-2.5-flash",
                    "prompt": "y",
                    "fallback": [{"provider": "openai", "model": "gpt-4.1-mini"}],
                },
            )
        )
    ).result()
    record = result.steps["gem"]
    assert record.status == StepStatus.COMPLETED and record.output == "from the fallback"
    assert (record.provider, record.model) == ("openai", "gpt-4.1-mini")
    assert record.attempts == 4  # three gemini attempts, one openai
    [note] = record.fallbacks
    assert (note.provider, note.model) == ("gemini", "gemini-2.5-flash")
    assert "503" in note.error or "unavailable" in note.error
    assert record.usage.output_tokens == 4 and record.cost_usd is not None


# small numbers so the breaker opens within one test
@pytest.mark.worker_env(LLMMIXER_BREAKER_MIN_CALLS="2", LLMMIXER_BREAKER_COOLDOWN_S="300")
async def test_an_open_circuit_moves_on_without_calling_the_dead_provider(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    provider_server.fail("openai", 500, times=50)
    two_tries = {"max_attempts": 2, "initial_interval_s": 0.1, "backoff": 1.0}
    steps = [
        {
            "id": f"s{i}",
            "provider": "openai",
            "model": "gpt-4.1-mini",
            "prompt": str(i),
            "retry": two_tries,
            "needs": [f"s{i - 1}"] if i else [],
            "fallback": [{"provider": "anthropic", "model": "claude-haiku-4-5"}],
        }
        for i in range(2)
    ]
    result = await (await mixer.start(spec(*steps))).result()
    assert provider_server.count("openai") == 2  # only the first step reached it
    second = result.steps["s1"]
    assert second.provider == "anthropic"
    assert second.fallbacks[0].error_type == "CircuitOpen"
    assert "circuit open" in second.fallbacks[0].error


@pytest.mark.without_key("GEMINI_API_KEY")
async def test_missing_key_fails_at_once_naming_the_variable(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    step = {"id": "a", "provider": "gemini", "model": "gemini-2.5-flash", "prompt": "x"}
    handle = await mixer.start(spec(step))
    progress = await until(handle, waiting("a"), "a waits")
    assert "GEMINI_API_KEY" in (progress.steps["a"].error or "")
    assert progress.steps["a"].attempts == 1
    assert provider_server.count() == 0
    await handle.skip("a")
    await handle.result()


async def test_structured_output_is_validated_and_retried(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    schema = {"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]}
    provider_server.reply("openai", '{"score": "high"}')
    provider_server.reply("openai", '```json\n{"score": 7}\n```')
    step = {
        "id": "a",
        "provider": "openai",
        "model": "gpt-4.1-mini",
        "prompt": "rate",
        "response_format": "json",
        "json_schema": schema,
    }
    result = await (await mixer.start(spec(step))).result()
    assert json.loads(result.steps["a"].output or "") == {"score": 7}
    assert result.steps["a"].attempts == 2


async def test_streamed_text_reaches_watchers_as_batched_deltas(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    words = [f"w{i} " for i in range(30)]
    provider_server.script("openai", Reply(chunks=words, chunk_delay_s=0.1))
    step = {"id": "a", "provider": "openai", "model": "gpt-4.1-mini", "prompt": "talk"}
    handle = await mixer.start(spec(step))
    await handle.result()
    deltas = [e async for e in handle.events() if e.type.value == "step_delta"]
    assert "".join(e.data["text"] for e in deltas) == "".join(words)
    assert 1 < len(deltas) < len(words), "deltas must be batched, not one per token"
    offsets = [e.offset for e in deltas]
    assert all(b > a for a, b in itertools.pairwise(offsets))


@pytest.mark.worker_env(LLMMIXER_OPENAI_CONCURRENCY="1")
async def test_calls_beyond_a_providers_cap_wait_rather_than_fail(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    for _ in range(3):
        provider_server.script("openai", Reply(chunks=["a ", "b ", "c"], chunk_delay_s=0.3))
    provider_server.script("anthropic", Reply(chunks=["x ", "y"], chunk_delay_s=0.3))
    steps = [
        {"id": f"o{i}", "provider": "openai", "model": "gpt-4.1-mini", "prompt": str(i)}
        for i in range(3)
    ]
    steps.append(
        {
            "id": "claude",
            "provider": "anthropic",
            "model": "claude-haiku-4-5",
            "prompt": "other provider",
        }
    )
    result = await (await mixer.start(spec(*steps))).result()
    assert all(r.status == StepStatus.COMPLETED and r.attempts == 1 for r in result.steps.values())
    starts = sorted(c.received_at for c in provider_server.calls if c.provider == "openai")
    # one openai call at a time: each starts after the previous one's ~0.9 s stream
    assert all(b - a >= 0.8 for a, b in itertools.pairwise(starts)), starts
    claude_start = next(c.received_at for c in provider_server.calls if c.provider == "anthropic")
    assert claude_start < starts[-1], "another provider's calls must not wait for openai's cap"


async def test_a_quick_reply_is_in_history_once_and_watchers_still_get_all_of_it(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    # Shorter than one delta interval: none of it was streamed before the call
    # ended, so the reply used to carry it twice (text and unsent_text).
    answer = "zebra-quartz-7731 " * 20
    provider_server.script("openai", Reply(chunks=[answer[:100], answer[100:]]))
    step = {"id": "a", "provider": "openai", "model": "gpt-4.1-mini", "prompt": "talk"}
    handle = await mixer.start(spec(step))
    result = await handle.result()
    assert result.steps["a"].output == answer
    history = await handle.temporal.fetch_history()
    [completed] = [
        e for e in history.events if e.HasField("activity_task_completed_event_attributes")
    ]
    # The reply holds the text once; what watchers were not sent is a position in it.
    assert completed.SerializeToString().count(answer.encode()) == 1
    deltas = [e async for e in handle.events() if e.type.value == "step_delta"]
    assert "".join(e.data["text"] for e in deltas) == answer


async def test_watchers_get_the_streamed_text_even_where_the_reply_differs_from_it(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    # The model fenced its JSON; the step's output is the JSON alone, while
    # watchers were streamed what the model wrote.
    streamed = '```json\n{"score": 7}\n```'
    provider_server.script("openai", Reply(text=streamed))
    step = {
        "id": "a",
        "provider": "openai",
        "model": "gpt-4.1-mini",
        "prompt": "score it",
        "response_format": "json",
    }
    handle = await mixer.start(spec(step))
    result = await handle.result()
    assert json.loads(result.steps["a"].output or "") == {"score": 7}
    deltas = [e async for e in handle.events() if e.type.value == "step_delta"]
    assert "".join(e.data["text"] for e in deltas) == streamed
