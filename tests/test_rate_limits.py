"""A worker's own rate limits: calls wait before the provider would answer 429.

Through the real SDKs against the fake server. Budgets are per minute in
``LLMMIXER_RATE_LIMITS``; the tests shrink the limiter's window to a second
or a few so the spacing shows quickly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shlex
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import temporal_binary
from fakes.provider_fixtures import FakeProviderServer, Reply, llm_call
from fakes.provider_server import rate_limit_headers
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from llmmixer.activities.llm import LlmActivities, LlmSettings
from llmmixer.activities.pricing import PriceTable
from llmmixer.activities.providers.ratelimit import RateKey, RateLimiter, RateLimitWait
from llmmixer.activities.providers.settings import ProviderSettings
from llmmixer.client.mixer import MixerClient, RunFailed
from llmmixer.core.contracts import ErrorType, LlmCall, LlmReply
from llmmixer.runtime.settings import ProviderEnv, RateLimitRule, Settings, SettingsError

MODELS = {"anthropic": "claude-haiku-4-5", "openai": "gpt-4.1-mini", "gemini": "gemini-2.5-flash"}


def rules(text: str) -> tuple[RateLimitRule, ...]:
    return ProviderEnv.from_env({"LLMMIXER_RATE_LIMITS": text}).rate_limits


@pytest.fixture
async def activities(
    provider_settings: ProviderSettings, request: pytest.FixtureRequest
) -> AsyncIterator[Any]:
    """``build(limiter)``: LlmActivities on the fake server with that limiter; closed after."""
    built: list[LlmActivities] = []

    def build(limiter: RateLimiter) -> LlmActivities:
        acts = LlmActivities(
            provider_settings,
            prices=PriceTable.load(),
            settings=LlmSettings(stream_deltas=False),
            rate_limiter=limiter,
        )
        built.append(acts)
        # Clients built now, so the first call's arrival is not late by an SDK import.
        acts.warm_up()
        return acts

    yield build
    for acts in built:
        await acts.aclose()


def environment(
    start_to_close_s: float = 60.0, heartbeat_timeout_s: float | None = None
) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info,
        started_time=datetime.now(UTC),
        start_to_close_timeout=timedelta(seconds=start_to_close_s),
        heartbeat_timeout=timedelta(seconds=heartbeat_timeout_s) if heartbeat_timeout_s else None,
    )
    return env


async def run(
    acts: LlmActivities, call: LlmCall, env: ActivityEnvironment | None = None
) -> LlmReply:
    reply: LlmReply = await (env or environment()).run(acts.call_llm, call)
    return reply


def arrivals(server: FakeProviderServer) -> list[float]:
    return sorted(call.received_at for call in server.calls)


@pytest.mark.parametrize("provider", list(MODELS))
async def test_calls_beyond_the_requests_budget_are_spaced_out(
    activities: Any, provider_server: FakeProviderServer, provider: str
) -> None:
    model = MODELS[provider]
    # 2 requests per 2 s window: two at once, then one a second.
    acts = activities(RateLimiter(rules(f"{provider}:{model}=2rpm"), window_s=2.0))
    started = time.monotonic()
    replies = await asyncio.gather(*(run(acts, llm_call(provider, model)) for _ in range(4)))
    assert all(reply.text for reply in replies)
    first, second, third, fourth = arrivals(provider_server)
    # Lower bounds from the start only: a busy machine can delay any request
    # further, but no request may arrive before the budget allows it.
    assert second - first < 0.9
    assert third - started >= 0.9
    assert fourth - started >= 1.9


async def test_a_star_entry_gives_each_model_its_own_budget(
    activities: Any, provider_server: FakeProviderServer
) -> None:
    acts = activities(RateLimiter(rules("openai:*=1rpm"), window_s=5.0))
    await asyncio.gather(
        run(acts, llm_call("openai", "gpt-4.1-mini")), run(acts, llm_call("openai", "gpt-4.1"))
    )
    first, second = arrivals(provider_server)
    assert second - first < 2.5  # two models, one request each: nobody waits 5 s


async def test_tokens_are_reserved_before_the_call_and_settled_with_its_usage(
    activities: Any, provider_server: FakeProviderServer
) -> None:
    # 1000 tokens per 10 s. Each call reserves its prompt and max_tokens (900),
    # so the second waits while the first is in flight; the first's reply used
    # a few tokens only, and settling gives the rest back at once, so the
    # second goes as soon as the first ends instead of after ~8 s of refill.
    acts = activities(RateLimiter(rules("openai:gpt-4.1-mini=1000tpm"), window_s=10.0))
    provider_server.script(
        "openai", Reply(text="slow", think_s=0.6, usage=(5, 5)), Reply(text="next", usage=(5, 5))
    )
    call = llm_call("openai", "gpt-4.1-mini", max_tokens=900)
    first_task = asyncio.create_task(run(acts, call))
    await asyncio.sleep(0.1)
    second = await run(acts, call)
    first = await first_task
    assert (first.text, second.text) == ("slow", "next")
    a, b = arrivals(provider_server)
    assert 0.5 <= b - a < 5.0  # refill alone would take ~8 s


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_headers_reporting_no_requests_left_hold_the_next_call_until_the_reset(
    activities: Any, provider_server: FakeProviderServer, provider: str
) -> None:
    model = MODELS[provider]
    acts = activities(RateLimiter())  # no budget configured: only the headers count
    empty = rate_limit_headers(provider, requests_left=0, tokens_left=90000, reset_s=1.0)
    provider_server.script(provider, Reply(text="one", headers=empty), Reply(text="two"))
    # Had the worker sent at once, this 429 would have been the answer.
    provider_server.script(provider, Reply(status=429, headers={"retry-after": "5"}))
    first = await run(acts, llm_call(provider, model))
    provider_server.reset()
    provider_server.script(provider, Reply(text="two"))
    started = asyncio.get_running_loop().time()
    second = await run(acts, llm_call(provider, model))
    waited = asyncio.get_running_loop().time() - started
    assert (first.text, second.text) == ("one", "two")
    assert 0.7 <= waited < 4.0  # the 429 would have asked for 5 s
    assert provider_server.count(provider) == 1  # the second call, once: no 429 seen


async def test_plenty_left_in_the_headers_does_not_slow_anything(
    activities: Any, provider_server: FakeProviderServer
) -> None:
    acts = activities(RateLimiter())
    plenty = rate_limit_headers("openai", requests_left=900, tokens_left=90000, reset_s=30.0)
    provider_server.script("openai", Reply(text="one", headers=plenty), Reply(text="two"))
    await run(acts, llm_call("openai", "gpt-4.1-mini"))
    await run(acts, llm_call("openai", "gpt-4.1-mini"))
    first, second = arrivals(provider_server)
    assert second - first < 3.0  # a slowdown would spread calls over the 30 s reset


async def test_a_wait_longer_than_half_the_time_left_fails_retryable_with_that_delay(
    activities: Any, provider_server: FakeProviderServer
) -> None:
    acts = activities(RateLimiter(rules("openai:gpt-4.1-mini=1rpm")))  # one a minute
    await run(acts, llm_call("openai", "gpt-4.1-mini"), environment(start_to_close_s=20))
    with pytest.raises(ApplicationError) as raised:
        await run(acts, llm_call("openai", "gpt-4.1-mini"), environment(start_to_close_s=20))
    error = raised.value
    assert error.type == ErrorType.RETRYABLE and not error.non_retryable
    assert "LLMMIXER_RATE_LIMITS" in error.message and "retried in" in error.message
    assert error.next_retry_delay is not None
    assert 55 <= error.next_retry_delay.total_seconds() <= 61
    assert provider_server.count() == 1  # the refused call never reached the provider


async def test_waiting_heartbeats_and_says_what_it_waits_for(
    activities: Any, provider_server: FakeProviderServer
) -> None:
    acts = activities(RateLimiter(rules("openai:gpt-4.1-mini=1rpm"), window_s=1.5))
    await run(acts, llm_call("openai", "gpt-4.1-mini"))
    env = environment(heartbeat_timeout_s=0.4)
    beats: list[Any] = []
    env.on_heartbeat = lambda *details: beats.extend(details)
    await run(acts, llm_call("openai", "gpt-4.1-mini"), env)
    assert any("rate limit" in str(beat.get("waiting_for", "")) for beat in beats)


async def test_a_cancelled_wait_takes_nothing_from_the_budget() -> None:
    limiter = RateLimiter(rules("openai:m=1rpm"), window_s=0.5)
    key = RateKey("openai", "m")
    await limiter.acquire(key)
    waiting = asyncio.create_task(limiter.acquire(key))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0.5)  # the one request is back
    started = asyncio.get_running_loop().time()
    await limiter.acquire(key, max_wait_s=0.05)  # would raise had the cancelled one taken it
    assert asyncio.get_running_loop().time() - started < 0.05
    with pytest.raises(RateLimitWait):
        await limiter.acquire(key, max_wait_s=0.05)


async def test_an_unlimited_call_goes_at_once_but_never_past_a_paused_or_queued_one() -> None:
    """``acquire_now`` is the shortcut for keys nothing holds back, and only for them."""
    clock = [100.0]
    limiter = RateLimiter(rules("openai:budgeted=5rpm"), clock=lambda: clock[0])
    free, budgeted = RateKey("openai", "free"), RateKey("openai", "budgeted")
    assert limiter.acquire_now(free) is not None
    assert limiter.acquire_now(budgeted) is None  # the operator's budget is always counted
    # The provider's headers said none left for 2 s: the next call must wait.
    limiter.observe(
        free, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}
    )
    assert limiter.acquire_now(free) is None
    queued = asyncio.create_task(limiter.acquire(free))
    await asyncio.sleep(0.05)
    clock[0] += 10  # the pause is over, but a call is still queued in acquire
    assert limiter.acquire_now(free) is None
    await queued
    assert limiter.acquire_now(free) is not None


@pytest.fixture
def worker_env(provider_server: FakeProviderServer) -> dict[str, str]:
    return {**provider_server.env(), "LLMMIXER_RATE_LIMITS": "openai:gpt-4.1-mini=1rpm"}


async def test_the_workers_variable_limits_its_calls_and_the_step_says_why(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    step = {"provider": "openai", "model": "gpt-4.1-mini", "timeout_s": 20}
    run_spec = {
        "name": "limited",
        "defaults": {"retry": {"max_attempts": 1}, "on_failure": "fail"},
        "steps": [
            {"id": "a", **step, "prompt": "first"},
            {"id": "b", **step, "needs": ["a"], "prompt": "second after {{ steps.a.output }}"},
        ],
    }
    handle = await mixer.start(run_spec)
    with pytest.raises(RunFailed):
        await handle.result()
    progress = await handle.progress()
    assert progress.steps["a"].output
    error = progress.steps["b"].error or ""
    assert "LLMMIXER_RATE_LIMITS (requests)" in error and "openai/gpt-4.1-mini" in error
    assert provider_server.count() == 1


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("openai=5rps", "'5rps'"),
        ("mistral:large=5rpm", "use one of anthropic, openai, gemini"),
        ("openai:a=5rpm,openai:a=6rpm", "openai:a is listed twice"),
        ("openai", "is not provider:model=<limits>"),
        ("openai:a=0rpm", "above 0"),
        ("openai:a=5rpm/6rpm", "rpm twice"),
    ],
)
def test_a_bad_rate_limit_names_the_variable_and_shows_an_example_that_parses(
    value: str, says: str
) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"LLMMIXER_RATE_LIMITS": value})
    message = str(raised.value)
    assert message.startswith("LLMMIXER_RATE_LIMITS: ") and says in message
    example = message.rsplit("for example LLMMIXER_RATE_LIMITS=", 1)[1]
    assert rules(example)
    with pytest.raises(SettingsError):
        ProviderSettings.from_env({"LLMMIXER_RATE_LIMITS": value})


def test_rate_limits_parse_per_model_with_a_star_fallback() -> None:
    parsed = rules("anthropic:claude-sonnet-5-5=50rpm/40000tpm, openai=500RPM")
    assert [str(rule) for rule in parsed] == [
        "anthropic:claude-sonnet-5-5=50rpm/40000tpm",
        "openai:*=500rpm",
    ]
    limiter = RateLimiter(parsed)
    assert limiter.rule(RateKey("openai", "gpt-4.1")) == parsed[1]
    assert limiter.rule(RateKey("anthropic", "claude-haiku-4-5")) is None
    assert ProviderSettings.from_env({"LLMMIXER_RATE_LIMITS": "openai:*=500rpm"}).rate_limits == (
        RateLimitRule("openai", "*", 500, None),
    )


def _readme_queue_command() -> list[str]:
    """The README's `temporal task-queue config set` command, as its words."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("### Rate limits", 1)[1].split("\n## ", 1)[0]
    start = section.index("temporal task-queue config set")
    lines: list[str] = []
    for line in section[start:].splitlines():
        lines.append(line.strip().removesuffix("\\").strip())
        if not line.rstrip().endswith("\\"):
            break
    return shlex.split(" ".join(lines))


async def test_the_readmes_server_side_queue_limit_is_accepted_by_temporal(
    env: WorkflowEnvironment,
) -> None:
    words = _readme_queue_command()
    address = env.client.service_client.config.target_host
    binary = temporal_binary()

    def temporal(*args: str) -> str:
        done = subprocess.run(
            [binary, *args, "--address", address], check=True, capture_output=True, text=True
        )
        return done.stdout

    await asyncio.to_thread(temporal, *words[1:])
    queue = words[words.index("--task-queue") + 1]
    shown = await asyncio.to_thread(
        temporal,
        "task-queue",
        "config",
        "get",
        "--task-queue",
        queue,
        "--task-queue-type",
        "activity",
        "--output",
        "json",
    )
    limit = json.loads(shown)["queueRateLimit"]["rateLimit"]["requestsPerSecond"]
    assert limit == float(words[words.index("--queue-rps-limit") + 1])
