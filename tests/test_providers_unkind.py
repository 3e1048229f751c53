"""Every adapter against a fake as unkind as the real providers, through the real SDKs.

Mid-stream error events in each API's own shape, a proxy's HTML error page, a
malformed SSE line, safety blocks, thinking parts, cache and reasoning usage,
replies cut at the token limit, rate-limit headers and kept-alive connections.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fakes.provider_fixtures import FakeProviderServer, Reply, llm_call
from fakes.provider_server import ANTHROPIC_MIN_CACHED_TOKENS, fake_tokens, rate_limit_headers

from llmmixer.activities.providers.base import ProviderAdapter, ProviderError, ProviderResult
from llmmixer.activities.providers.pool import ProviderPool
from llmmixer.activities.providers.settings import ProviderSettings
from llmmixer.core.contracts import ChatMessage, ErrorType, LlmCall

MODELS = {"openai": "gpt-4.1", "anthropic": "claude-sonnet-5-5", "gemini": "gemini-2.5-flash"}
# (provider, api): each wire protocol the adapters speak.
APIS = pytest.mark.parametrize(
    ("provider", "api"),
    [("openai", "chat"), ("openai", "responses"), ("anthropic", "chat"), ("gemini", "chat")],
)
STREAM_ERRORS = {
    ("openai", "chat"): "server_error",
    ("openai", "responses"): "server_error",
    ("anthropic", "chat"): "overloaded_error",
    ("gemini", "chat"): "UNAVAILABLE",
}
# A shared context well past every provider's caching minimum.
CONTEXT = "The diff under review, line after line of it.\n" * 400


def adapter(pool: ProviderPool, settings: ProviderSettings, provider: str) -> ProviderAdapter:
    return pool.get(settings.config_for(provider, timeout_s=10.0))


def call(provider: str, api: str = "chat", prompt: str = "hello there", **kw: Any) -> LlmCall:
    return llm_call(provider, MODELS[provider], prompt, api=api, **kw)


async def complete(
    pool: ProviderPool, settings: ProviderSettings, the_call: LlmCall
) -> tuple[ProviderResult, list[str]]:
    deltas: list[str] = []
    result = await adapter(pool, settings, the_call.provider).complete(the_call, deltas.append)
    return result, deltas


async def failure(
    pool: ProviderPool, settings: ProviderSettings, the_call: LlmCall
) -> tuple[ProviderError, list[str]]:
    deltas: list[str] = []
    with pytest.raises(ProviderError) as info:
        await adapter(pool, settings, the_call.provider).complete(the_call, deltas.append)
    return info.value, deltas


# ---- faults in the middle of a stream ----------------------------------------------


@APIS
async def test_an_error_event_mid_stream_is_retryable_and_names_the_providers_error(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider: str,
    api: str,
) -> None:
    kind = STREAM_ERRORS[(provider, api)]
    provider_server.script(
        provider, Reply(chunks=["half ", "an ", "answer"], stream_error=kind, error_after=1)
    )
    error, deltas = await failure(provider_pool, provider_settings, call(provider, api))
    # Anthropic's error event arrives on a 200 stream: it must not read as a rejection.
    assert error.error_type == ErrorType.RETRYABLE and error.retryable
    assert kind in error.message
    assert deltas == ["half "]


@APIS
async def test_a_proxys_html_error_page_is_retryable_and_read_as_words(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider: str,
    api: str,
) -> None:
    provider_server.script(provider, Reply(status=502, html=True, message="upstream reset"))
    error, _ = await failure(provider_pool, provider_settings, call(provider, api))
    assert error.error_type == ErrorType.RETRYABLE and error.status_code == 502
    assert "502 Bad Gateway" in error.message
    assert "<" not in error.message  # no markup in history or logs


@APIS
async def test_a_malformed_sse_line_is_a_retryable_failure_not_a_crash(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider: str,
    api: str,
) -> None:
    provider_server.script(provider, Reply(chunks=["one ", "two"], malformed_after=1))
    error, _ = await failure(provider_pool, provider_settings, call(provider, api))
    assert error.error_type == ErrorType.RETRYABLE


# ---- refusals: one type, carrying the provider's reason ----------------------------


@pytest.mark.parametrize(
    ("provider", "api", "reply", "reason"),
    [
        ("anthropic", "chat", Reply(text="I won't.", finish_reason="refusal"), "refusal"),
        ("openai", "chat", Reply(text="", finish_reason="content_filter"), "content_filter"),
        ("openai", "chat", Reply(text="", refusal="I can't help with that."), "refusal"),
        ("openai", "responses", Reply(text="", refusal="I can't help with that."), "refusal"),
        (
            "openai",
            "responses",
            Reply(text="", finish_reason="content_filter"),
            "content_filter",
        ),
        ("gemini", "chat", Reply(text="", finish_reason="SAFETY"), "SAFETY"),
        ("gemini", "chat", Reply(block_reason="PROHIBITED_CONTENT"), "PROHIBITED_CONTENT"),
    ],
)
async def test_every_kind_of_refusal_is_one_non_retryable_type_with_its_reason(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider: str,
    api: str,
    reply: Reply,
    reason: str,
) -> None:
    provider_server.script(provider, reply)
    error, _ = await failure(provider_pool, provider_settings, call(provider, api))
    assert error.error_type == ErrorType.REFUSED and not error.retryable
    assert error.reason == reason and reason in error.message
    assert "fallback_on: [refused]" in error.message
    if reply.refusal:
        assert reply.refusal in error.message  # the model's own words


# ---- thinking, usage details --------------------------------------------------------


@pytest.mark.parametrize(("provider", "api"), [("anthropic", "chat"), ("openai", "responses")])
async def test_thinking_parts_never_reach_the_answer(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider: str,
    api: str,
) -> None:
    provider_server.script(
        provider, Reply(chunks=["The answer."], thinking=["Let me think ", "about it."])
    )
    result, deltas = await complete(provider_pool, provider_settings, call(provider, api))
    assert result.text == "The answer." and deltas == ["The answer."]


async def test_gemini_thought_parts_are_counted_as_reasoning_not_shown(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    provider_server.script(
        "gemini",
        Reply(
            chunks=["Four."],
            thinking=["2 and 2..."],
            usage=(120, 5),
            reasoning_tokens=40,
            cached_tokens=100,
        ),
    )
    result, deltas = await complete(provider_pool, provider_settings, call("gemini"))
    assert result.text == "Four." and deltas == ["Four."]
    usage = result.usage
    # thinking is billed as output: candidates 5 + thoughts 40
    assert (usage.input_tokens, usage.output_tokens) == (120, 45)
    assert (usage.cache_read_tokens, usage.reasoning_tokens) == (100, 40)


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_openai_cached_and_reasoning_tokens_are_recorded(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    api: str,
) -> None:
    provider_server.script(
        "openai", Reply(text="ok", usage=(2000, 300), cached_tokens=1536, reasoning_tokens=256)
    )
    result, _ = await complete(provider_pool, provider_settings, call("openai", api))
    usage = result.usage
    assert (usage.input_tokens, usage.output_tokens) == (2000, 300)
    assert (usage.cache_read_tokens, usage.reasoning_tokens) == (1536, 256)


# ---- replies cut at the token limit ---------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "api", "finish"),
    [
        ("anthropic", "chat", "max_tokens"),
        ("openai", "chat", "length"),
        ("openai", "responses", "max_output_tokens"),
        ("gemini", "chat", "MAX_TOKENS"),
    ],
)
async def test_a_reply_cut_at_the_token_limit_is_marked_truncated(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider: str,
    api: str,
    finish: str,
) -> None:
    # Half a JSON document: the adapter leaves judging it to the activity,
    # which continues or fails it; it is not reported as "invalid JSON".
    provider_server.script(provider, Reply(text='{"findings": ["a", "b', finish_reason=finish))
    result, _ = await complete(
        provider_pool, provider_settings, call(provider, api, response_format="json")
    )
    assert result.truncated and result.finish_reason == finish
    assert result.text == '{"findings": ["a", "b'


@APIS
async def test_a_finished_reply_is_not_truncated(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider: str,
    api: str,
) -> None:
    result, _ = await complete(provider_pool, provider_settings, call(provider, api))
    assert not result.truncated and result.finish_reason


# ---- rate-limit headers, kept-alive connections ------------------------------------


@APIS
async def test_a_429_with_rate_limit_headers_is_retried_after_the_servers_delay(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider: str,
    api: str,
) -> None:
    headers = {**rate_limit_headers(provider, requests_left=0, tokens_left=0), "retry-after": "3"}
    provider_server.fail(provider, 429, headers=headers, message="slow down")
    error, _ = await failure(provider_pool, provider_settings, call(provider, api))
    assert error.error_type == ErrorType.RETRYABLE and error.retry_after_s == 3.0


@APIS
async def test_the_sdks_reuse_kept_alive_connections_and_survive_the_server_closing_them(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider: str,
    api: str,
) -> None:
    for _ in range(3):
        await complete(provider_pool, provider_settings, call(provider, api))
    assert [c.connection for c in provider_server.calls] == [1, 1, 1]
    # An error reply and a rate-limit header keep the connection too.
    busy = rate_limit_headers(provider, requests_left=1, tokens_left=1)
    provider_server.fail(provider, 503, headers=busy)
    await failure(provider_pool, provider_settings, call(provider, api))
    assert provider_server.calls[-1].connection == 1
    # The server drops an idle connection (as real ones do after a while):
    # the next call opens a new one instead of failing on the stale one.
    provider_server.keep_alive_s = 0.2
    await complete(provider_pool, provider_settings, call(provider, api))
    await asyncio.sleep(0.5)
    result, _ = await complete(provider_pool, provider_settings, call(provider, api))
    assert result.text
    assert provider_server.calls[-1].connection == 2


# ---- Anthropic prompt caching --------------------------------------------------------


def _anthropic_system_call(cache: str) -> LlmCall:
    return call("anthropic", prompt="Which file changed most?", system=CONTEXT, cache=cache)


async def test_anthropic_caches_a_long_system_prompt_and_reads_it_next_time(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    first, _ = await complete(provider_pool, provider_settings, _anthropic_system_call("auto"))
    second, _ = await complete(provider_pool, provider_settings, _anthropic_system_call("auto"))
    system_tokens = fake_tokens(CONTEXT)
    assert system_tokens >= ANTHROPIC_MIN_CACHED_TOKENS
    assert (first.usage.cache_write_tokens, first.usage.cache_read_tokens) == (system_tokens, 0)
    assert (second.usage.cache_write_tokens, second.usage.cache_read_tokens) == (0, system_tokens)
    # input_tokens is every prompt token, cached or not
    assert first.usage.input_tokens == second.usage.input_tokens > system_tokens
    body = provider_server.calls[0].body
    assert body["system"] == [
        {"type": "text", "text": CONTEXT, "cache_control": {"type": "ephemeral"}}
    ]


async def test_cache_off_sends_no_breakpoints_and_pays_full_input(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    for _ in range(2):
        result, _ = await complete(provider_pool, provider_settings, _anthropic_system_call("off"))
        assert result.usage.cache_read_tokens == result.usage.cache_write_tokens == 0
    assert all(c.body["system"] == CONTEXT for c in provider_server.calls)


async def test_siblings_sharing_a_context_first_read_it_from_the_cache(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    security, _ = await complete(
        provider_pool, provider_settings, call("anthropic", prompt=CONTEXT + "\n\nSecurity?")
    )
    style, _ = await complete(
        provider_pool, provider_settings, call("anthropic", prompt=CONTEXT + "\n\nStyle?")
    )
    shared = fake_tokens(CONTEXT + "\n\n")
    assert security.usage.cache_write_tokens == shared
    assert style.usage.cache_read_tokens == shared and style.usage.cache_write_tokens == 0
    content = provider_server.calls[1].body["messages"][-1]["content"]
    assert content == [
        {"type": "text", "text": CONTEXT + "\n\n", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Style?"},
    ]


async def test_a_short_prompt_is_sent_as_it_was(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    the_call = call("anthropic", prompt="short\n\nquestion", system="be brief")
    the_call.messages.insert(0, ChatMessage(role="assistant", content="before"))
    await complete(provider_pool, provider_settings, the_call)
    body = provider_server.calls[0].body
    assert body["system"] == "be brief"
    assert [m["content"] for m in body["messages"]] == ["before", "short\n\nquestion"]


async def test_a_long_conversation_caches_its_earlier_turns(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    the_call = call("anthropic", prompt="and now?")
    the_call.messages.insert(0, ChatMessage(role="assistant", content=CONTEXT))
    await complete(provider_pool, provider_settings, the_call)
    first = provider_server.calls[0].body["messages"][0]["content"]
    assert first == [{"type": "text", "text": CONTEXT, "cache_control": {"type": "ephemeral"}}]


async def test_openai_compatible_servers_get_no_prompt_cache_key(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    # The fake is not api.openai.com: a field a compatible server may not know stays out.
    await complete(provider_pool, provider_settings, call("openai", prompt=CONTEXT + "\n\nQ?"))
    assert "prompt_cache_key" not in provider_server.calls[0].body
    assert json.dumps(provider_server.calls[0].body).find(CONTEXT[:40]) >= 0
