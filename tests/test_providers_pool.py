"""ProviderPool (one client per config), ProviderSettings and JSON reply validation."""

from __future__ import annotations

import pytest
from fakes.provider_fixtures import FAKE_KEYS, FakeProviderServer, llm_call

from llmmixer.activities.llm import LlmActivities
from llmmixer.activities.providers.base import ProviderConfig, ProviderError
from llmmixer.activities.providers.pool import ProviderPool
from llmmixer.activities.providers.settings import ProviderSettings
from llmmixer.activities.providers.structured import validate_json_reply
from llmmixer.core.contracts import ErrorType

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
    assert s.api_key("openai") == "sk-o-1111111111"
    assert s.base_url("openai") == "https://proxy.example/v1"
    assert s.api_key("anthropic") == "sk-ant-2222222222" and s.base_url("anthropic") is None
    assert s.api_key("gemini") == "AIza-3333333333" and s.key_variable("gemini") == "GOOGLE_API_KEY"
    assert "nope" not in s.secrets() and len(s.secrets()) == 3
    assert "sk-" not in repr(s) and "AIza" not in repr(s)


def test_gemini_api_key_wins_over_google_api_key_and_blank_is_unset() -> None:
    s = ProviderSettings.from_env({"GEMINI_API_KEY": "g-1", "GOOGLE_API_KEY": "g-2"})
    assert s.api_key("gemini") == "g-1" and s.key_variable("gemini") == "GEMINI_API_KEY"
    assert ProviderSettings.from_env({"OPENAI_API_KEY": "  "}).api_key("openai") is None


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


def test_step_base_url_is_the_workers_endpoint_only_when_it_is_the_same_url() -> None:
    s = ProviderSettings.from_env(ENV)
    same = s.config_for("openai", "HTTPS://Proxy.Example:443/v1/")
    assert same == s.config_for("openai"), "the same endpoint spelled differently keeps the key"
    default = s.config_for("anthropic", "https://api.anthropic.com/")
    assert default.api_key == "sk-ant-2222222222" and not default.keyless
    for elsewhere in (
        "https://proxy.example/v2",  # the worker's host, another path: a shared gateway
        "https://proxy.example/v1/../v2",
        "http://proxy.example/v1",  # another scheme
        "https://proxy.example:8443/v1",
        "https://proxy.example.evil.example/v1",
        "https://proxy.example@evil.example/v1",
        "https://evil.example\\@proxy.example/v1",
    ):
        with pytest.raises(ProviderError) as info:
            s.config_for("openai", elsewhere)
        assert info.value.error_type == ErrorType.REJECTED, elsewhere
        assert not info.value.retryable


def test_step_base_url_elsewhere_names_the_operators_variable() -> None:
    s = ProviderSettings.from_env(ENV)
    with pytest.raises(ProviderError) as info:
        s.config_for("anthropic", "https://collector.example/")
    assert info.value.error_type == ErrorType.REJECTED
    message = info.value.message
    assert "LLMMIXER_ALLOWED_BASE_URLS=https://collector.example" in message
    assert "ANTHROPIC_BASE_URL" in message and "sk-ant" not in message


def test_a_listed_step_base_url_gets_no_key() -> None:
    s = ProviderSettings.from_env(
        {
            **ENV,
            "LLMMIXER_ALLOWED_BASE_URLS": " http://127.0.0.1:11434 ,https://llm.internal/v1/,",
        }
    )
    assert s.allowed_base_urls == ("http://127.0.0.1:11434", "https://llm.internal/v1")
    for provider in ("openai", "anthropic", "gemini"):
        local = s.config_for(provider, "http://127.0.0.1:11434/v1")
        assert local.keyless and local.api_key is None
        assert local.base_url == "http://127.0.0.1:11434/v1"
    assert s.config_for("openai", "https://llm.internal/v1/team-a").keyless
    for outside in ("https://llm.internal/v10", "https://llm.internal/", "http://127.0.0.1:1"):
        with pytest.raises(ProviderError, match="LLMMIXER_ALLOWED_BASE_URLS"):
            s.config_for("openai", outside)


@pytest.mark.parametrize(
    "value",
    [
        "localhost:11434",
        "ftp://files.example",
        "http://",
        "https://user:pw@llm.example",
        "http://llm.example/#frag",
        "http://llm.example/a/../b",
        "http://llm.example:port",
        "http://llm .example",
    ],
)
def test_a_bad_allowed_list_is_refused_naming_the_variable(value: str) -> None:
    with pytest.raises(ValueError) as info:
        ProviderSettings.from_env({"LLMMIXER_ALLOWED_BASE_URLS": f"http://ok.example,{value}"})
    message = str(info.value)
    assert message.startswith("LLMMIXER_ALLOWED_BASE_URLS: ")
    assert "for example LLMMIXER_ALLOWED_BASE_URLS=http://127.0.0.1:11434" in message
    assert "pw" not in message, "a password in the variable is not repeated"


def test_unset_or_blank_allowed_list_allows_nothing() -> None:
    assert ProviderSettings.from_env(ENV).allowed_base_urls == ()
    assert ProviderSettings.from_env({"LLMMIXER_ALLOWED_BASE_URLS": " "}).allowed_base_urls == ()


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
