"""Anthropic adapter through the real ``anthropic`` SDK against the fake server."""

from __future__ import annotations

import json

import pytest
from fakes.provider_fixtures import FAKE_KEYS, FakeProviderServer, Reply, llm_call

from llmmixer.activities.providers.anthropic import DEFAULT_MAX_TOKENS, AnthropicAdapter
from llmmixer.activities.providers.base import ProviderConfig, ProviderError
from llmmixer.activities.providers.pool import ProviderPool
from llmmixer.activities.providers.settings import ProviderSettings
from llmmixer.core.contracts import ChatMessage, ErrorType

MODEL = "claude-haiku-4-5"


def adapter(pool: ProviderPool, settings: ProviderSettings) -> AnthropicAdapter:
    got = pool.get(settings.config_for("anthropic", timeout_s=10.0))
    assert isinstance(got, AnthropicAdapter)
    return got


async def test_streams_deltas_with_usage_from_start_and_delta_events(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    provider_server.script(
        "anthropic",
        Reply(
            chunks=["The ", "answer ", "is 42."], usage=(31, 9), model="claude-haiku-4-5-20251001"
        ),
    )
    deltas: list[str] = []
    result = await adapter(provider_pool, provider_settings).complete(
        llm_call("anthropic", MODEL, system="be exact"), deltas.append
    )
    assert deltas == ["The ", "answer ", "is 42."]
    assert result.text == "The answer is 42."
    # input from message_start, output from the cumulative message_delta
    assert (result.usage.input_tokens, result.usage.output_tokens) == (31, 9)
    assert result.response_model == "claude-haiku-4-5-20251001"
    assert result.finish_reason == "end_turn"
    [call] = provider_server.calls
    # this SDK generation sends the key as a bearer token rather than x-api-key
    assert call.authorization_present or call.api_key_header_present
    assert call.sent_key(FAKE_KEYS["ANTHROPIC_API_KEY"])


async def test_request_shape(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    call = llm_call("anthropic", MODEL, system="sys", temperature=0.2, stop=["STOP"])
    call.messages.insert(0, ChatMessage(role="assistant", content="before"))
    await adapter(provider_pool, provider_settings).complete(call, lambda _: None)
    body = provider_server.calls[0].body
    assert body["system"] == "sys"  # its own parameter, not a message
    assert body["messages"] == [
        {"role": "assistant", "content": "before"},
        {"role": "user", "content": "hello there"},
    ]
    assert body["max_tokens"] == DEFAULT_MAX_TOKENS == 4096
    assert body["temperature"] == 0.2 and body["stop_sequences"] == ["STOP"]
    assert body["stream"] is True


async def test_explicit_max_tokens_is_sent(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    await adapter(provider_pool, provider_settings).complete(
        llm_call("anthropic", MODEL, max_tokens=77), lambda _: None
    )
    assert provider_server.calls[0].body["max_tokens"] == 77


@pytest.mark.parametrize("fault", ["cut", "truncate"])
async def test_stream_without_message_stop_is_retryable(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    fault: str,
) -> None:
    script = provider_server.cut if fault == "cut" else provider_server.truncate
    script("anthropic", after_chunks=1, text="partial reply here")
    deltas: list[str] = []
    with pytest.raises(ProviderError) as info:
        await adapter(provider_pool, provider_settings).complete(
            llm_call("anthropic", MODEL), deltas.append
        )
    assert info.value.error_type == ErrorType.RETRYABLE
    assert deltas == ["partial"]
    if fault == "truncate":
        assert "message_stop" in info.value.message


async def test_refusal_stop_reason_is_a_refusal_carrying_the_reason(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    provider_server.script("anthropic", Reply(text="I can't help", finish_reason="refusal"))
    with pytest.raises(ProviderError) as info:
        await adapter(provider_pool, provider_settings).complete(
            llm_call("anthropic", MODEL), lambda _: None
        )
    assert info.value.error_type == ErrorType.REFUSED and not info.value.retryable
    assert info.value.reason == "refusal" and "I can't help" in info.value.message


async def test_json_mode_states_schema_and_validates(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    schema = {"type": "object", "required": ["ok"]}
    provider_server.script("anthropic", Reply(text='```json\n{"ok": true}\n```'))
    result = await adapter(provider_pool, provider_settings).complete(
        llm_call("anthropic", MODEL, system="sys", response_format="json", json_schema=schema),
        lambda _: None,
    )
    assert json.loads(result.text) == {"ok": True}  # fence removed
    system = provider_server.calls[0].body["system"]
    assert system.startswith("sys") and "JSON" in system and '"required": ["ok"]' in system


async def test_json_mode_schema_mismatch_is_invalid_output(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    provider_server.script("anthropic", Reply(text='{"other": 1}'))
    with pytest.raises(ProviderError) as info:
        await adapter(provider_pool, provider_settings).complete(
            llm_call("anthropic", MODEL, response_format="json", json_schema={"required": ["ok"]}),
            lambda _: None,
        )
    assert info.value.error_type == ErrorType.INVALID_OUTPUT
    assert "'ok' is a required property" in info.value.message


def test_missing_key_fails_at_once_even_with_base_url(provider_server: FakeProviderServer) -> None:
    with pytest.raises(ProviderError) as info:
        AnthropicAdapter(ProviderConfig("anthropic", None, provider_server.anthropic_base_url, 5))
    assert info.value.error_type == ErrorType.AUTH
    assert "set ANTHROPIC_API_KEY on the worker" in info.value.message
    assert provider_server.count() == 0
