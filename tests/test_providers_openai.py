"""OpenAI adapter through the real ``openai`` SDK against the fake server."""

from __future__ import annotations

import time

import pytest
from fakes.provider_fixtures import FAKE_KEYS, FakeProviderServer, Reply, llm_call

from llmmixer.activities.providers.base import ProviderConfig, ProviderError
from llmmixer.activities.providers.openai import OpenAIAdapter
from llmmixer.activities.providers.pool import ProviderPool
from llmmixer.activities.providers.settings import ProviderSettings
from llmmixer.core.contracts import ChatMessage, ErrorType

MODEL = "gpt-4.1"


def adapter(
    pool: ProviderPool, settings: ProviderSettings, timeout_s: float = 10.0
) -> OpenAIAdapter:
    got = pool.get(settings.config_for("openai", timeout_s=timeout_s))
    assert isinstance(got, OpenAIAdapter)
    return got


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_streams_deltas_in_order_with_provider_usage(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    api: str,
) -> None:
    provider_server.script(
        "openai",
        Reply(chunks=["Hel", "lo", ", wor", "ld"], usage=(17, 4), model="gpt-4.1-2025-04-14"),
    )
    deltas: list[str] = []
    result = await adapter(provider_pool, provider_settings).complete(
        llm_call("openai", MODEL, system="be brief", api=api), deltas.append
    )
    assert deltas == ["Hel", "lo", ", wor", "ld"]
    assert result.text == "Hello, world"
    assert (result.usage.input_tokens, result.usage.output_tokens) == (17, 4)
    assert result.response_model == "gpt-4.1-2025-04-14"
    assert result.finish_reason == "stop"
    [call] = provider_server.calls
    assert call.api == api and call.stream and call.model == MODEL
    assert call.authorization_present and call.sent_key(FAKE_KEYS["OPENAI_API_KEY"])


async def test_chat_request_carries_every_parameter(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    call = llm_call(
        "openai",
        MODEL,
        system="sys",
        max_tokens=123,
        temperature=0.3,
        top_p=0.9,
        stop=["END"],
        provider_options={"seed": 7},
    )
    call.messages.insert(0, ChatMessage(role="assistant", content="earlier"))
    await adapter(provider_pool, provider_settings).complete(call, lambda _: None)
    body = provider_server.calls[0].body
    assert body["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "assistant", "content": "earlier"},
        {"role": "user", "content": "hello there"},
    ]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    # a custom base_url is an OpenAI-compatible server: it gets max_tokens
    assert body["max_tokens"] == 123 and "max_completion_tokens" not in body
    assert (body["temperature"], body["top_p"], body["stop"], body["seed"]) == (
        0.3,
        0.9,
        ["END"],
        7,
    )
    assert "response_format" not in body


async def test_responses_request_uses_instructions_and_does_not_store(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    await adapter(provider_pool, provider_settings).complete(
        llm_call("openai", MODEL, system="sys", max_tokens=50, api="responses"), lambda _: None
    )
    body = provider_server.calls[0].body
    assert body["instructions"] == "sys"
    assert body["input"] == [{"role": "user", "content": "hello there"}]
    assert body["max_output_tokens"] == 50 and body["store"] is False


async def test_unscripted_reply_is_deterministic(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    a = adapter(provider_pool, provider_settings)
    first = await a.complete(llm_call("openai", MODEL, "ping 1"), lambda _: None)
    second = await a.complete(llm_call("openai", MODEL, "ping 1"), lambda _: None)
    other = await a.complete(llm_call("openai", MODEL, "ping 2"), lambda _: None)
    assert first.text == second.text and "ping 1" in first.text
    assert other.text != first.text


async def test_slow_stream_delivers_deltas_as_they_arrive(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    provider_server.script("openai", Reply(chunks=["a", "b", "c", "d"], chunk_delay_s=0.1))
    seen: list[float] = []
    await adapter(provider_pool, provider_settings).complete(
        llm_call("openai", MODEL), lambda _: seen.append(time.monotonic())
    )
    assert len(seen) == 4
    # buffered delivery would bunch them up at the end
    assert seen[-1] - seen[0] >= 0.25


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("fault", ["cut", "truncate"])
async def test_incomplete_stream_is_retryable_not_success(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    api: str,
    fault: str,
) -> None:
    if fault == "cut":
        provider_server.cut("openai", after_chunks=2, text="one two three four")
    else:
        provider_server.truncate("openai", after_chunks=2, text="one two three four")
    deltas: list[str] = []
    with pytest.raises(ProviderError) as info:
        await adapter(provider_pool, provider_settings).complete(
            llm_call("openai", MODEL, api=api), deltas.append
        )
    assert info.value.error_type == ErrorType.RETRYABLE and info.value.retryable
    assert deltas == ["one", " two"]


async def test_hang_times_out_as_retryable(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    provider_server.hang("openai")
    started = time.monotonic()
    with pytest.raises(ProviderError) as info:
        await adapter(provider_pool, provider_settings, timeout_s=0.5).complete(
            llm_call("openai", MODEL), lambda _: None
        )
    assert info.value.error_type == ErrorType.RETRYABLE
    assert "did not answer within 0.5 s" in info.value.message
    assert time.monotonic() - started < 5


async def test_content_filter_is_a_refusal(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    provider_server.script("openai", Reply(text="", finish_reason="content_filter"))
    with pytest.raises(ProviderError) as info:
        await adapter(provider_pool, provider_settings).complete(
            llm_call("openai", MODEL), lambda _: None
        )
    assert info.value.error_type == ErrorType.REFUSED and not info.value.retryable
    assert info.value.reason == "content_filter" and "refused" in info.value.message


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_json_mode_valid_reply(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    api: str,
) -> None:
    schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
    provider_server.script("openai", Reply(chunks=['{"n"', ": 3}"]))
    result = await adapter(provider_pool, provider_settings).complete(
        llm_call("openai", MODEL, response_format="json", json_schema=schema, api=api),
        lambda _: None,
    )
    assert result.text == '{"n": 3}'
    body = provider_server.calls[0].body
    fmt = body["response_format"] if api == "chat" else body["text"]["format"]
    assert fmt["type"] == "json_schema"
    schema_sent = fmt["json_schema"]["schema"] if api == "chat" else fmt["schema"]
    assert schema_sent == schema


async def test_json_mode_without_schema_asks_for_json_object(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    result = await adapter(provider_pool, provider_settings).complete(
        llm_call("openai", MODEL, response_format="json"), lambda _: None
    )
    assert provider_server.calls[0].body["response_format"] == {"type": "json_object"}
    assert result.text.startswith("{")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("not json at all", "not valid JSON"),
        ('{"n": "three"}', "does not match json_schema at n"),
    ],
)
async def test_json_mode_invalid_reply_is_invalid_output(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    reply: str,
    expected: str,
) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    provider_server.script("openai", Reply(text=reply))
    with pytest.raises(ProviderError) as info:
        await adapter(provider_pool, provider_settings).complete(
            llm_call("openai", MODEL, response_format="json", json_schema=schema),
            lambda _: None,
        )
    assert info.value.error_type == ErrorType.INVALID_OUTPUT and info.value.retryable
    assert expected in info.value.message


async def test_responses_api_refuses_stop_sequences_before_calling(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    with pytest.raises(ProviderError) as info:
        await adapter(provider_pool, provider_settings).complete(
            llm_call("openai", MODEL, api="responses", stop=["x"]), lambda _: None
        )
    assert info.value.error_type == ErrorType.REJECTED and "api: chat" in info.value.message
    assert provider_server.count() == 0


def test_missing_key_fails_at_once() -> None:
    with pytest.raises(ProviderError) as info:
        OpenAIAdapter(ProviderConfig("openai", None, None, 5.0))
    assert info.value.error_type == ErrorType.AUTH
    assert info.value.message == (
        "no API key for openai: set OPENAI_API_KEY on the worker (the spec never carries keys)"
    )


async def test_local_server_runs_without_key(provider_server: FakeProviderServer) -> None:
    local = OpenAIAdapter(ProviderConfig("openai", None, provider_server.openai_base_url, 5.0))
    try:
        result = await local.complete(llm_call("openai", "llama3"), lambda _: None)
    finally:
        await local.aclose()
    assert "llama3" in result.text
    assert provider_server.calls[0].sent_key("not-needed")
