"""ProviderPool (one client per config), ProviderSettings and JSON reply validation."""

from __future__ import annotations

import pytest
from fakes.provider_fixtures import FAKE_KEYS, FakeProviderServer, llm_call

from llmmixer.activities.contracts import ErrorType
from llmmixer.activities.llm import LlmActivities
from llmmixer.activities.providers.base import ProviderConfig, ProviderError
from llmmixer.activities.providers.pool import ProviderPool
from llmmixer.activities.providers.settings import ProviderSettings
from llmmixer.activities.providers.structured import validate_json_reply

# --- pool ----------------------------------------------------------------------------


async def test_pool_reuses_one_client_per_config(provider_server: FakeProviderServer) -> None:
    pool = ProviderPool()
    key = FAKE_KEYS["OPENAI_API_KEY"]
    try:
        a = pool.get(ProviderConfig("openai", key, provider_server.openai_base_url, 5.0))
        again = pool.get(ProviderConfig("openai", key, provider_server.openai_base_url, 5.0))
        assert again is a and len(pool) == 1
        # and the same client really serves repeated calls
        for _ in range(2):
            await again.complete(llm_call("openai", "gpt-4.1"), lambda _: None)
        assert provider_server.count("openai") == 2
    finally:
        await pool.aclose()
    assert len(pool) == 0


async def test_separate_configs_get_separate_clients(provider_server: FakeProviderServer) -> None:
    pool = ProviderPool()
    base = ProviderConfig("openai", "sk-one-000000000", provider_server.openai_base_url, 5.0)
    variants = [
        base,
        ProviderConfig("openai", "sk-two-000000000", base.base_url, 5.0),
        ProviderConfig("openai", base.api_key, provider_server.url + "/other/v1", 5.0),
        ProviderConfig("openai", base.api_key, base.base_url, 9.0),
        ProviderConfig("anthropic", base.api_key, provider_server.anthropic_base_url, 5.0),
    ]
    try:
        adapters = [pool.get(v) for v in variants]
        assert len({id(a) for a in adapters}) == len(variants) == len(pool)
        # the second key is really used by its own client
        await adapters[1].complete(llm_call("openai", "gpt-4.1"), lambda _: None)
        assert provider_server.calls[0].sent_key("sk-two-000000000")
    finally:
        await pool.aclose()


async def test_warm_up_builds_the_clients_a_call_will_use_before_any_call(
    provider_server: FakeProviderServer,
) -> None:
    # Keys for OpenAI and Anthropic only: Gemini is skipped, not an error.
    env = {
        "OPENAI_API_KEY": FAKE_KEYS["OPENAI_API_KEY"],
        "OPENAI_BASE_URL": provider_server.openai_base_url,
        "ANTHROPIC_API_KEY": FAKE_KEYS["ANTHROPIC_API_KEY"],
        "ANTHROPIC_BASE_URL": provider_server.anthropic_base_url,
    }
    settings = ProviderSettings.from_env(env)
    pool = ProviderPool(secrets=settings.secrets())
    llm = LlmActivities(settings, pool=pool)
    try:
        llm.warm_up()
        assert len(pool) == 2
        warmed = pool.get(settings.config_for("openai", None, 600.0))
        assert len(pool) == 2  # a step with the default timeout reuses the warm client
        await warmed.complete(llm_call("openai", "gpt-4.1"), lambda _: None)
        assert provider_server.count("openai") == 1
    finally:
        await llm.aclose()


def test_pool_does_not_cache_a_failed_build() -> None:
    pool = ProviderPool()
    with pytest.raises(ProviderError):
        pool.get(ProviderConfig("anthropic", None, None, 5.0))
    assert len(pool) == 0


def test_pool_unknown_provider() -> None:
    with pytest.raises(ValueError, match="unknown provider 'mistral'"):
        ProviderPool().get(ProviderConfig("mistral", "k", None, 5.0))


def test_config_repr_hides_the_key() -> None:
    config = ProviderConfig("openai", "sk-very-secret-000", "http://127.0.0.1:1/v1", 5.0)
    assert "sk-very-secret-000" not in repr(config)
    assert config != ProviderConfig("openai", "sk-other-000000", config.base_url, 5.0)


# --- settings ------------------------------------------------------------------------

ENV = {
    "OPENAI_API_KEY": "sk-o-1111111111",
    "OPENAI_BASE_URL": "https://proxy.example/v1",
    "ANTHROPIC_API_KEY": "sk-ant-2222222222",
    "GOOGLE_API_KEY": "AIza-3333333333",
    "UNRELATED_API_KEY": "nope",
}


def test_from_env_reads_only_contract_variables() -> None:
    s = ProviderSettings.from_env(ENV)
    assert s.openai_api_key == "sk-o-1111111111"
    assert s.openai_base_url == "https://proxy.example/v1"
    assert s.anthropic_api_key == "sk-ant-2222222222" and s.anthropic_base_url is None
    assert s.gemini_api_key == "AIza-3333333333" and s.gemini_key_variable == "GOOGLE_API_KEY"
    assert "nope" not in s.secrets() and len(s.secrets()) == 3
    assert "sk-" not in repr(s) and "AIza" not in repr(s)


def test_gemini_api_key_wins_over_google_api_key_and_blank_is_unset() -> None:
    s = ProviderSettings.from_env({"GEMINI_API_KEY": "g-1", "GOOGLE_API_KEY": "g-2"})
    assert s.gemini_api_key == "g-1" and s.gemini_key_variable == "GEMINI_API_KEY"
    assert ProviderSettings.from_env({"OPENAI_API_KEY": "  "}).openai_api_key is None


def test_describe_never_contains_a_key() -> None:
    s = ProviderSettings.from_env({**ENV, "ANTHROPIC_BASE_URL": "https://u:pw@a.example/?t=x"})
    described = s.describe()
    text = str(described)
    for secret in (*s.secrets(), "pw", "t=x"):
        assert secret not in text
    assert described["openai"] == {
        "key_variable": "OPENAI_API_KEY",
        "key_set": True,
        "base_url": "https://proxy.example/v1",
        "base_url_default": False,
    }
    assert described["gemini"]["key_variable"] == "GOOGLE_API_KEY"
    assert described["anthropic"]["base_url"] == "https://a.example/"


def test_config_for_uses_worker_endpoint_and_key() -> None:
    s = ProviderSettings.from_env(ENV)
    config = s.config_for("openai", timeout_s=12)
    assert config == ProviderConfig("openai", "sk-o-1111111111", "https://proxy.example/v1", 12)


def test_step_base_url_on_another_origin_gets_no_key() -> None:
    s = ProviderSettings.from_env(ENV)
    local = s.config_for("openai", "http://127.0.0.1:11434/v1")
    assert local.base_url == "http://127.0.0.1:11434/v1" and local.api_key is None
    same_origin = s.config_for("openai", "https://proxy.example/v2")
    assert same_origin.api_key == "sk-o-1111111111"
    default_origin = s.config_for("anthropic", "https://api.anthropic.com/")
    assert default_origin.api_key == "sk-ant-2222222222"


def test_step_base_url_elsewhere_for_a_keyed_provider_says_what_to_set() -> None:
    s = ProviderSettings.from_env(ENV)
    with pytest.raises(ProviderError) as info:
        s.config_for("anthropic", "https://collector.example/")
    assert info.value.error_type == ErrorType.AUTH
    assert "set ANTHROPIC_BASE_URL on the worker" in info.value.message
    assert "sk-ant" not in info.value.message


def test_config_for_unknown_provider() -> None:
    with pytest.raises(ValueError, match="use one of anthropic, openai, gemini"):
        ProviderSettings().config_for("mistral")


# --- structured output ---------------------------------------------------------------


def test_json_reply_fence_is_removed() -> None:
    assert validate_json_reply('```json\n{"a": 1}\n```') == '{"a": 1}'
    assert validate_json_reply("[1, 2]") == "[1, 2]"


def test_invalid_json_and_schema_mismatch_are_invalid_output() -> None:
    with pytest.raises(ProviderError) as info:
        validate_json_reply("{'single': 'quotes'}")
    assert info.value.error_type == ErrorType.INVALID_OUTPUT and info.value.retryable
    schema = {"type": "object", "properties": {"items": {"type": "array", "maxItems": 1}}}
    with pytest.raises(ProviderError) as info:
        validate_json_reply('{"items": [1, 2]}', schema)
    assert info.value.error_type == ErrorType.INVALID_OUTPUT
    assert "at items" in info.value.message


def test_an_invalid_schema_is_the_specs_fault() -> None:
    with pytest.raises(ProviderError) as info:
        validate_json_reply("{}", {"type": "no-such-type"})
    assert info.value.error_type == ErrorType.REJECTED and "fix json_schema" in info.value.message
