"""Gemini adapter through the real ``google-genai`` SDK against the fake server."""

from __future__ import annotations

import pytest
from fakes.provider_fixtures import FAKE_KEYS, FakeProviderServer, Reply, llm_call

from llmmixer.activities.providers.base import ProviderConfig, ProviderError
from llmmixer.activities.providers.gemini import GeminiAdapter
from llmmixer.activities.providers.pool import ProviderPool
from llmmixer.activities.providers.settings import ProviderSettings
from llmmixer.core.contracts import ChatMessage, ErrorType

MODEL = "gemini-2.5-flash"


def adapter(pool: ProviderPool, settings: ProviderSettings) -> GeminiAdapter:
    got = pool.get(settings.config_for("gemini", timeout_s=10.0))
    assert isinstance(got, GeminiAdapter)
    return got


async def test_streams_deltas_with_usage_metadata(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    provider_server.script(
        "gemini", Reply(chunks=["Sun", "ny ", "today"], usage=(12, 3), model="gemini-2.5-flash-001")
    )
    deltas: list[str] = []
    result = await adapter(provider_pool, provider_settings).complete(
        llm_call("gemini", MODEL), deltas.append
    )
    assert deltas == ["Sun", "ny ", "today"]
    assert result.text == "Sunny today"
    assert (result.usage.input_tokens, result.usage.output_tokens) == (12, 3)
    assert result.response_model == "gemini-2.5-flash-001"
    assert result.finish_reason == "STOP"
    [call] = provider_server.calls
    assert call.path.endswith(f"/models/{MODEL}:streamGenerateContent") and call.stream
    assert call.api_key_header_present and call.sent_key(FAKE_KEYS["GEMINI_API_KEY"])


async def test_request_shape_with_provider_options(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    safety = [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_ONLY_HIGH"}]
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    provider_server.script("gemini", Reply(text='{"a": "x"}'))
    call = llm_call(
        "gemini",
        MODEL,
        system="sys",
        max_tokens=64,
        temperature=0.1,
        top_p=0.5,
        stop=["##"],
        response_format="json",
        json_schema=schema,
        provider_options={"safety_settings": safety, "generation_config": {"top_k": 5}},
    )
    call.messages.insert(0, ChatMessage(role="assistant", content="prior"))
    await adapter(provider_pool, provider_settings).complete(call, lambda _: None)
    body = provider_server.calls[0].body
    assert [c["role"] for c in body["contents"]] == ["model", "user"]
    assert body["contents"][1]["parts"] == [{"text": "hello there"}]
    assert body["systemInstruction"]["parts"] == [{"text": "sys"}]
    config = body["generationConfig"]
    assert config["maxOutputTokens"] == 64 and config["temperature"] == 0.1
    assert config["topP"] == 0.5 and config["stopSequences"] == ["##"] and config["topK"] == 5
    assert config["responseMimeType"] == "application/json"
    assert config["responseJsonSchema"] == schema
    assert body["safetySettings"] == safety


async def test_unknown_provider_option_is_rejected_before_calling(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    with pytest.raises(ProviderError) as info:
        await adapter(provider_pool, provider_settings).complete(
            llm_call("gemini", MODEL, provider_options={"safety": []}), lambda _: None
        )
    assert info.value.error_type == ErrorType.REJECTED
    assert provider_server.count() == 0


async def test_server_error_is_sent_once_sdk_retries_are_off(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    provider_server.fail("gemini", 503, times=3)
    with pytest.raises(ProviderError) as info:
        await adapter(provider_pool, provider_settings).complete(
            llm_call("gemini", MODEL), lambda _: None
        )
    assert info.value.error_type == ErrorType.RETRYABLE and info.value.status_code == 503
    assert provider_server.count("gemini") == 1  # Temporal owns retries


@pytest.mark.parametrize("fault", ["cut", "truncate"])
async def test_stream_without_finish_reason_is_retryable(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    fault: str,
) -> None:
    script = provider_server.cut if fault == "cut" else provider_server.truncate
    script("gemini", after_chunks=2, text="a b c d")
    deltas: list[str] = []
    with pytest.raises(ProviderError) as info:
        await adapter(provider_pool, provider_settings).complete(
            llm_call("gemini", MODEL), deltas.append
        )
    assert info.value.error_type == ErrorType.RETRYABLE
    assert deltas == ["a", " b"]


async def test_safety_finish_is_rejected(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    provider_server.script("gemini", Reply(text="", finish_reason="SAFETY"))
    with pytest.raises(ProviderError) as info:
        await adapter(provider_pool, provider_settings).complete(
            llm_call("gemini", MODEL), lambda _: None
        )
    assert info.value.error_type == ErrorType.REFUSED and info.value.reason == "SAFETY"
    assert not info.value.retryable


async def test_json_reply_that_is_not_json_is_invalid_output(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    provider_server.script("gemini", Reply(text="{broken"))
    with pytest.raises(ProviderError) as info:
        await adapter(provider_pool, provider_settings).complete(
            llm_call("gemini", MODEL, response_format="json"), lambda _: None
        )
    assert info.value.error_type == ErrorType.INVALID_OUTPUT


def test_missing_key_fails_at_once() -> None:
    with pytest.raises(ProviderError) as info:
        GeminiAdapter(ProviderConfig("gemini", None, None, 5.0))
    assert info.value.error_type == ErrorType.AUTH
    assert "set GEMINI_API_KEY on the worker" in info.value.message
