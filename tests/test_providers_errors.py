"""Error mapping for all three providers, through the real SDKs against the fake server."""

from __future__ import annotations

import email.utils
import time

import pytest
from fakes.provider_fixtures import FAKE_KEYS, FakeProviderServer, llm_call

from llmmixer.activities.providers.base import ProviderConfig, ProviderError
from llmmixer.activities.providers.errors import parse_retry_after, redact, status_error
from llmmixer.activities.providers.pool import ProviderPool
from llmmixer.activities.providers.settings import ProviderSettings
from llmmixer.core.contracts import ErrorType

MODELS = {"openai": "gpt-4.1", "anthropic": "claude-haiku-4-5", "gemini": "gemini-2.5-flash"}
KEY_VARS = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
}
PROVIDERS = pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])


async def failing_call(
    pool: ProviderPool, settings: ProviderSettings, provider: str, timeout_s: float = 10.0
) -> ProviderError:
    adapter = pool.get(settings.config_for(provider, timeout_s=timeout_s))
    with pytest.raises(ProviderError) as info:
        await adapter.complete(llm_call(provider, MODELS[provider]), lambda _: None)
    return info.value


@PROVIDERS
@pytest.mark.parametrize(
    ("headers", "expected"),
    [({"retry-after": "7"}, 7.0), ({"retry-after-ms": "1500"}, 1.5), ({}, None)],
)
async def test_429_is_retryable_with_retry_after(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider: str,
    headers: dict[str, str],
    expected: float | None,
) -> None:
    provider_server.fail(provider, 429, headers=headers, times=3)
    error = await failing_call(provider_pool, provider_settings, provider)
    assert error.error_type == ErrorType.RETRYABLE and error.retryable
    assert error.status_code == 429
    assert error.retry_after_s == expected
    assert provider_server.count(provider) == 1  # the SDK did not retry on its own


@PROVIDERS
@pytest.mark.parametrize("status", [408, 409, 500, 503, 529])
async def test_server_side_statuses_are_retryable(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider: str,
    status: int,
) -> None:
    provider_server.fail(provider, status, times=3)
    error = await failing_call(provider_pool, provider_settings, provider)
    assert error.error_type == ErrorType.RETRYABLE and error.status_code == status
    assert provider_server.count(provider) == 1


@PROVIDERS
@pytest.mark.parametrize(
    ("status", "message", "kind"),
    [
        (400, "max_tokens is too large", "bad request"),
        (404, "model xyz does not exist", "model not found"),
        (422, "unprocessable", "unprocessable request"),
    ],
)
async def test_other_4xx_are_rejected_naming_which(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider: str,
    status: int,
    message: str,
    kind: str,
) -> None:
    provider_server.fail(provider, status, message=message)
    error = await failing_call(provider_pool, provider_settings, provider)
    assert error.error_type == ErrorType.REJECTED and not error.retryable
    assert error.status_code == status
    assert kind in error.message and message in error.message


@PROVIDERS
async def test_a_4xx_content_policy_rejection_is_a_refusal(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider: str,
) -> None:
    provider_server.fail(provider, 400, message="blocked by our safety system")
    error = await failing_call(provider_pool, provider_settings, provider)
    assert error.error_type == ErrorType.REFUSED and not error.retryable
    assert error.status_code == 400 and "blocked by our safety system" in error.message


@PROVIDERS
@pytest.mark.parametrize("status", [401, 403])
async def test_auth_failures_name_the_worker_variable(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider: str,
    status: int,
) -> None:
    provider_server.fail(provider, status)
    error = await failing_call(provider_pool, provider_settings, provider)
    assert error.error_type == ErrorType.AUTH and not error.retryable
    assert f"Set a valid {KEY_VARS[provider]} on the worker" in error.message


@PROVIDERS
async def test_echoed_key_is_redacted(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider: str,
) -> None:
    provider_server.fail(provider, 401, echo_credential=True)
    error = await failing_call(provider_pool, provider_settings, provider)
    assert provider_server.calls[0].sent_key(FAKE_KEYS[KEY_VARS[provider]])  # it was sent...
    for key in FAKE_KEYS.values():  # ...and is in no part of the error
        assert key not in error.message and key not in str(error) and key not in repr(error)
    assert "[REDACTED]" in error.message


async def test_other_workers_keys_are_redacted_too(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
) -> None:
    # A key with no recognisable shape is only caught because the pool passes
    # every configured key to every adapter.
    odd_key = "plain-secret-value-123"
    pool = ProviderPool(secrets=(*provider_settings.secrets(), odd_key))
    try:
        provider_server.fail("openai", 400, message=f"bad header value {odd_key}")
        error = await failing_call(pool, provider_settings, "openai")
    finally:
        await pool.aclose()
    assert odd_key not in error.message and "[REDACTED]" in error.message


@PROVIDERS
async def test_connection_refused_is_retryable(provider: str) -> None:
    pool = ProviderPool()
    key = FAKE_KEYS[KEY_VARS[provider]]
    # Port 9 on loopback: nothing listens there.
    config = ProviderConfig(provider, key, "http://127.0.0.1:9/v1", 2.0)
    try:
        with pytest.raises(ProviderError) as info:
            await pool.get(config).complete(llm_call(provider, MODELS[provider]), lambda _: None)
    finally:
        await pool.aclose()
    assert info.value.error_type == ErrorType.RETRYABLE
    assert "connection" in info.value.message


@PROVIDERS
async def test_hang_is_a_retryable_timeout(
    provider_server: FakeProviderServer,
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider: str,
) -> None:
    provider_server.hang(provider)
    started = time.monotonic()
    error = await failing_call(provider_pool, provider_settings, provider, timeout_s=1.0)
    assert error.error_type == ErrorType.RETRYABLE
    assert time.monotonic() - started < 10


@PROVIDERS
async def test_missing_key_makes_no_http_call(
    provider_server: FakeProviderServer, provider: str
) -> None:
    settings = ProviderSettings.from_env(provider_server.env(keys=False))
    pool = ProviderPool()
    config = settings.config_for(provider)
    if provider == "openai":
        # a base URL means a local server that needs no key; the official
        # endpoint does need one
        config = ProviderConfig("openai", None, None, 5.0)
    with pytest.raises(ProviderError) as info:
        pool.get(config)
    assert info.value.error_type == ErrorType.AUTH
    assert info.value.message == (
        f"no API key for {provider}: set {KEY_VARS[provider]} on the worker "
        "(the spec never carries keys)"
    )
    assert len(pool) == 0 and provider_server.count() == 0


# --- pure functions ------------------------------------------------------------------


def test_redact_configured_and_generic_shapes() -> None:
    text = (
        "key my-configured-secret, openai sk-proj-abcdefghijklmnop, "
        "google AIzaSyA1234567890abcdefghijklmnop, Authorization: Bearer abc.def.ghijkl, "
        "url https://x/v1?key=zzz123&alt=sse"
    )
    out = redact(text, ["my-configured-secret", None, ""])
    for secret in (
        "my-configured-secret",
        "sk-proj-abcdefghijklmnop",
        "AIzaSyA1234567890abcdefghijklmnop",
        "abc.def.ghijkl",
        "zzz123",
    ):
        assert secret not in out
    assert "Bearer [REDACTED]" in out and "?key=[REDACTED]&alt=sse" in out
    assert redact("nothing secret here", ["abc"]) == "nothing secret here"


def test_redact_longest_secret_first() -> None:
    assert redact("X-longsecret-X", ["longsecret", "longsecret-X"]) == "X-[REDACTED]"


def test_parse_retry_after_forms() -> None:
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"Retry-After": date}, now=now) == pytest.approx(30, abs=1.5)
    assert parse_retry_after({"retry-after": "2.5"}) == 2.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "-3"}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after(None) is None


def test_status_error_messages_say_what_to_do() -> None:
    limited = status_error("openai", 429, "slow down", {"retry-after": "4"})
    assert "retried after 4 s" in limited.message
    missing = status_error("anthropic", 404, "no such model", None)
    assert "Check the step's model name" in missing.message


# --- the loopback guard ----------------------------------------------------------------


async def test_guard_stops_a_test_that_forgot_the_fake_server() -> None:
    from fakes.provider_fixtures import NonLoopbackTraffic

    pool = ProviderPool()
    try:
        adapter = pool.get(ProviderConfig("openai", "sk-test-000000000", None, 5.0))
        # not mapped to a provider outcome: it surfaces as itself, loudly
        with pytest.raises(NonLoopbackTraffic, match=r"non-loopback host 'api\.openai\.com'"):
            await adapter.complete(llm_call("openai", "gpt-4.1"), lambda _: None)
    finally:
        await pool.aclose()


def test_guard_refuses_raw_addresses() -> None:
    import socket

    from fakes.provider_fixtures import NonLoopbackTraffic

    with socket.socket() as sock, pytest.raises(NonLoopbackTraffic):
        sock.connect(("192.0.2.1", 443))  # TEST-NET-1: never routed anyway
