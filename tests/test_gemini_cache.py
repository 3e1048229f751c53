"""Gemini's explicit context cache for siblings that share a long context.

Through google-genai against the fake server's ``cachedContents`` endpoint:
the second call with a shared context creates a cache and sends only its own
question; later siblings reuse it; anything the API refuses leaves the calls
on implicit caching, and they still succeed.
"""

from __future__ import annotations

import json
from typing import Any

from fakes.provider_fixtures import FakeProviderServer, llm_call
from fakes.provider_server import GEMINI_MIN_CACHED_TOKENS, fake_tokens

from llmmixer.activities.providers.base import ProviderResult
from llmmixer.activities.providers.pool import ProviderPool
from llmmixer.activities.providers.settings import ProviderSettings

MODEL = "gemini-2.5-flash"
# Long enough for Gemini's explicit-cache minimum, as the fake counts tokens.
CONTEXT = "The contract under review says: " + "clause text, " * 700 + "\n\n"
assert fake_tokens(CONTEXT) >= GEMINI_MIN_CACHED_TOKENS


async def ask(
    pool: ProviderPool, settings: ProviderSettings, question: str, **fields: Any
) -> ProviderResult:
    adapter = pool.get(settings.config_for("gemini"))
    return await adapter.complete(llm_call("gemini", MODEL, question, **fields), lambda _: None)


def sent_text(body: dict[str, Any]) -> str:
    return json.dumps(body.get("contents"))


async def test_siblings_after_the_first_read_the_shared_context_from_one_explicit_cache(
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider_server: FakeProviderServer,
) -> None:
    system = "You review contracts."
    first = await ask(provider_pool, provider_settings, CONTEXT + "Any risks?", system=system)
    second = await ask(provider_pool, provider_settings, CONTEXT + "Who pays?", system=system)
    third = await ask(provider_pool, provider_settings, CONTEXT + "When?", system=system)
    # One cache, holding the context and the system instruction, made by the second call.
    (created,) = provider_server.gemini_caches
    assert "clause text" in json.dumps(created["contents"])
    assert created["systemInstruction"]["parts"][0]["text"] == system
    assert created["ttl"].endswith("s")
    calls = provider_server.calls
    assert "cachedContent" not in calls[0].body and "clause text" in sent_text(calls[0].body)
    for call, question in ((calls[1], "Who pays?"), (calls[2], "When?")):
        assert call.body["cachedContent"] == "cachedContents/fake-1"
        assert "clause text" not in sent_text(call.body) and question in sent_text(call.body)
        assert "systemInstruction" not in call.body
    assert first.usage.cache_read_tokens == 0
    assert second.usage.cache_read_tokens >= GEMINI_MIN_CACHED_TOKENS
    assert third.usage.cache_read_tokens == second.usage.cache_read_tokens
    assert second.usage.input_tokens > second.usage.cache_read_tokens


async def test_a_model_that_refuses_a_cache_leaves_the_calls_on_implicit_caching(
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider_server: FakeProviderServer,
) -> None:
    provider_server.refuse_gemini_caches = True
    replies = [
        await ask(provider_pool, provider_settings, CONTEXT + question)
        for question in ("Any risks?", "Who pays?", "When?")
    ]
    assert all(reply.text for reply in replies)
    assert len(provider_server.gemini_caches) == 1  # asked once, not on every call
    for call in provider_server.calls:
        assert "cachedContent" not in call.body and "clause text" in sent_text(call.body)


async def test_a_short_context_or_cache_off_is_sent_whole_without_a_cache(
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider_server: FakeProviderServer,
) -> None:
    short = "A short note.\n\n"
    for question in ("One?", "Two?"):
        await ask(provider_pool, provider_settings, short + question)
        await ask(provider_pool, provider_settings, CONTEXT + question, cache="off")
    assert provider_server.gemini_caches == []
    assert all("cachedContent" not in call.body for call in provider_server.calls)


async def test_a_cache_gone_before_its_time_is_not_the_calls_failure(
    provider_pool: ProviderPool,
    provider_settings: ProviderSettings,
    provider_server: FakeProviderServer,
) -> None:
    await ask(provider_pool, provider_settings, CONTEXT + "Any risks?")
    await ask(provider_pool, provider_settings, CONTEXT + "Who pays?")
    provider_server.reset()  # the server forgets its caches
    reply = await ask(provider_pool, provider_settings, CONTEXT + "When?")
    assert reply.text
    rejected, whole = provider_server.calls
    assert rejected.body.get("cachedContent") and "cachedContent" not in whole.body
    assert "clause text" in sent_text(whole.body)
