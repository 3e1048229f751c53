"""Provider requests go where the operator says, whatever a spec or a plan asks.

The attacker writes a spec (or, through a decompose step, a plan) and wants
the worker's key. Two fake provider servers play it out: the worker's
environment points every SDK at ``provider_server`` (fake A) with the fake
keys; ``other_server`` (fake B) is the server the attacker names. B must
never receive a key, in a header, the query string or the body; where the
operator lists B in ``LLMMIXER_ALLOWED_BASE_URLS`` it is called, but without
the worker's key.
"""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from fakes.provider_server import FAKE_KEYS, FakeProviderServer, RawRequest, Reply
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from llmmixer.activities.llm import LlmActivities, LlmSettings
from llmmixer.activities.pricing import PriceTable
from llmmixer.activities.providers.base import ProviderError
from llmmixer.activities.providers.pool import ProviderPool
from llmmixer.activities.providers.settings import ProviderSettings
from llmmixer.client.mixer import MixerClient, RunFailed
from llmmixer.core.contracts import ChatMessage, ErrorType, LlmCall
from llmmixer.workers.worker import mixer_worker
from llmmixer.workflows.mixer import WORKFLOW_NAME
from llmmixer.workflows.records import RunStatus, StepStatus

MODELS = {"openai": "gpt-4.1-mini", "anthropic": "claude-haiku-4-5", "gemini": "gemini-2.5-flash"}
PROVIDERS = sorted(MODELS)
KEYS = tuple(FAKE_KEYS.values())
FAST_RETRY = {"max_attempts": 2, "initial_interval_s": 0.1, "backoff": 1.0, "max_interval_s": 1}


def leaked(server: FakeProviderServer) -> list[RawRequest]:
    """The requests that carried any of the worker's keys, anywhere."""
    return [r for r in server.requests if any(r.carries(key) for key in KEYS)]


def assert_never_got_a_key(server: FakeProviderServer) -> None:
    assert leaked(server) == [], "the worker's key reached a server the operator never named"
    for request in server.requests:
        # The SDKs insist on some credential; where one is sent it is a placeholder.
        for name in ("authorization", "x-api-key", "x-goog-api-key"):
            assert request.headers.get(name) in (None, "not-needed", "Bearer not-needed"), (
                name,
                request.headers.get(name),
            )
        query = parse_qs(urlsplit(request.target).query)
        assert query.get("key") in (None, ["not-needed"]), query


# --- provider_options: nothing in them moves a request ---------------------------------

# (provider, provider_options with "{B}" for fake B's base URL, the field to be named)
OPTION_ATTACKS: list[tuple[str, dict[str, Any], str]] = [
    (
        "gemini",
        {"generation_config": {"http_options": {"base_url": "{B}"}}},
        "provider_options.generation_config.http_options",
    ),
    (
        "gemini",
        {
            "generation_config": {
                "temperature": 0.2,
                "http_options": {"base_url": "{B}", "headers": {"x-goog-api-client": "x"}},
            }
        },
        "provider_options.generation_config.http_options",
    ),
    ("gemini", {"http_options": {"base_url": "{B}"}}, "provider_options.http_options"),
    (
        "gemini",
        {"generation_config": {"should_return_http_response": True}},
        "provider_options.generation_config.should_return_http_response",
    ),
    ("openai", {"extra_headers": {"x-forward-to": "{B}"}}, "provider_options.extra_headers"),
    ("openai", {"extra_query": {"key": "x"}}, "provider_options.extra_query"),
    ("openai", {"base_url": "{B}"}, "provider_options.base_url"),
    ("openai", {"default_headers": {"Host": "b"}}, "provider_options.default_headers"),
    ("openai", {"timeout": 0.001}, "provider_options.timeout"),
    ("openai", {"api_key": "sk-attacker-000000000000"}, "provider_options.api_key"),
    ("openai", {"seed": 7, "stream": False}, "provider_options.stream"),
    ("anthropic", {"extra_headers": {"x-forward-to": "{B}"}}, "provider_options.extra_headers"),
    ("anthropic", {"extra_query": {"key": "x"}}, "provider_options.extra_query"),
    ("anthropic", {"extra_body": {"model": "x"}}, "provider_options.extra_body"),
    ("anthropic", {"base_url": "{B}"}, "provider_options.base_url"),
    ("anthropic", {"default_headers": {"Host": "b"}}, "provider_options.default_headers"),
    ("anthropic", {"auth_token": "x"}, "provider_options.auth_token"),
    ("anthropic", {"tools": [{"type": "mcp", "url": "{B}"}]}, "provider_options.tools"),
]


def _fill(value: Any, b_url: str) -> Any:
    return json.loads(json.dumps(value).replace("{B}", b_url))


def plan_built_call(provider: str, **fields: Any) -> LlmCall:
    """An ``LlmCall`` as the workflow builds it for a step a decompose plan named.

    The plan is model output: its fields arrive as JSON, with nothing checked
    but the step schema, so the activity is the boundary that must hold.
    """
    step = json.loads(json.dumps({"provider": provider, "model": MODELS[provider], **fields}))
    return LlmCall(
        workflow_id="wf-transport",
        step_id="planned",
        provider=step["provider"],
        model=step["model"],
        messages=[ChatMessage(role="user", content="hello")],
        base_url=step.get("base_url"),
        provider_options=step.get("provider_options", {}),
        timeout_s=10,
        has_fallback=False,
    )


async def _activities(environ: dict[str, str]) -> LlmActivities:
    return LlmActivities(
        ProviderSettings.from_env(environ),
        prices=PriceTable.load(),
        settings=LlmSettings(stream_deltas=False),
    )


async def _run(acts: LlmActivities, call: LlmCall) -> Any:
    try:
        return await ActivityEnvironment().run(acts.call_llm, call)
    finally:
        await acts.aclose()


@pytest.mark.parametrize(
    ("provider", "options", "field"),
    OPTION_ATTACKS,
    ids=[f"{p}-{f.rsplit('.', 1)[-1]}-{i}" for i, (p, _, f) in enumerate(OPTION_ATTACKS)],
)
async def test_provider_options_that_could_move_a_request_are_refused_before_any_request(
    provider: str,
    options: dict[str, Any],
    field: str,
    provider_server: FakeProviderServer,
    other_server: FakeProviderServer,
) -> None:
    activities = await _activities(provider_server.env())
    call = plan_built_call(
        provider, provider_options=_fill(options, other_server.base_url(provider))
    )
    with pytest.raises(ApplicationError) as info:
        await _run(activities, call)
    assert info.value.type == ErrorType.REJECTED and info.value.non_retryable
    assert field in info.value.message
    assert not any(key in info.value.message for key in KEYS)
    assert other_server.requests == []
    assert provider_server.requests == [], "a refused call must not reach the worker's endpoint"


@pytest.mark.parametrize(
    ("provider", "options", "field"),
    OPTION_ATTACKS,
    ids=[f"{p}-{f.rsplit('.', 1)[-1]}-{i}" for i, (p, _, f) in enumerate(OPTION_ATTACKS)],
)
async def test_each_adapter_refuses_them_too(
    provider: str,
    options: dict[str, Any],
    field: str,
    provider_server: FakeProviderServer,
    other_server: FakeProviderServer,
) -> None:
    """Defence in depth: an adapter used without the activity builds requests only
    from the checked settings."""
    settings = ProviderSettings.from_env(provider_server.env())
    pool = ProviderPool(secrets=settings.secrets())
    call = plan_built_call(
        provider, provider_options=_fill(options, other_server.base_url(provider))
    )
    try:
        with pytest.raises(ProviderError) as info:
            await pool.get(settings.config_for(provider)).complete(call, lambda _: None)
    finally:
        await pool.aclose()
    assert info.value.error_type == ErrorType.REJECTED and field in info.value.message
    assert other_server.requests == [] and provider_server.requests == []


async def test_known_generation_settings_still_reach_the_workers_endpoint(
    provider_server: FakeProviderServer, other_server: FakeProviderServer
) -> None:
    acts = await _activities(provider_server.env())
    call = plan_built_call(
        "gemini",
        provider_options={
            "safety_settings": [
                {"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_ONLY_HIGH"}
            ],
            "generation_config": {"top_k": 5, "seed": 3, "thinking_config": {"thinking_budget": 0}},
        },
    )
    await _run(acts, call)
    (request,) = provider_server.calls
    assert request.sent_key(FAKE_KEYS["GEMINI_API_KEY"])
    config = request.body["generationConfig"]
    assert config["topK"] == 5 and config["seed"] == 3
    # The SDK writes nested settings in either JSON spelling; the API takes both.
    assert config["thinkingConfig"] in ({"thinkingBudget": 0}, {"thinking_budget": 0})
    assert other_server.requests == []


# --- base_url: the key goes only to the worker's endpoint --------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_step_base_url_the_operator_did_not_list_is_refused(
    provider: str, provider_server: FakeProviderServer, other_server: FakeProviderServer
) -> None:
    acts = await _activities(provider_server.env())
    with pytest.raises(ApplicationError) as info:
        await _run(acts, plan_built_call(provider, base_url=other_server.base_url(provider)))
    assert info.value.type == ErrorType.REJECTED and info.value.non_retryable
    assert "LLMMIXER_ALLOWED_BASE_URLS" in info.value.message
    assert other_server.requests == [] and provider_server.requests == []


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_listed_step_base_url_is_called_without_the_workers_key(
    provider: str, provider_server: FakeProviderServer, other_server: FakeProviderServer
) -> None:
    acts = await _activities(
        {**provider_server.env(), "LLMMIXER_ALLOWED_BASE_URLS": other_server.url}
    )
    reply = await _run(acts, plan_built_call(provider, base_url=other_server.base_url(provider)))
    assert reply.text
    assert other_server.count(provider) == 1
    assert_never_got_a_key(other_server)
    assert provider_server.requests == []


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_listed_step_base_url_gets_no_gateway_credential_from_the_sdks_env_headers(
    provider: str,
    provider_server: FakeProviderServer,
    other_server: FakeProviderServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The SDKs add ``*_CUSTOM_HEADERS`` from the process environment to every request."""
    gateway = "gw-token-0123456789abcdef"
    variable = f"{provider.upper()}_CUSTOM_HEADERS"
    monkeypatch.setenv(variable, f"Authorization: Bearer {gateway}\nX-Gateway-Key: {gateway}")
    acts = await _activities(
        {**provider_server.env(), "LLMMIXER_ALLOWED_BASE_URLS": other_server.url}
    )
    await _run(acts, plan_built_call(provider, base_url=other_server.base_url(provider)))
    assert other_server.count(provider) == 1
    assert not any(r.carries(gateway) for r in other_server.requests)
    assert_never_got_a_key(other_server)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_step_base_url_on_the_workers_host_but_another_path_gets_no_key(
    provider: str, provider_server: FakeProviderServer
) -> None:
    """A shared gateway host: another path on it is another server as far as keys go."""
    acts = await _activities(provider_server.env())
    elsewhere = f"{provider_server.url}/someone-else{'/v1' if provider == 'openai' else ''}"
    with pytest.raises(ApplicationError) as info:
        await _run(acts, plan_built_call(provider, base_url=elsewhere))
    assert "LLMMIXER_ALLOWED_BASE_URLS" in info.value.message
    assert leaked(provider_server) == []


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_the_workers_own_endpoint_as_a_step_base_url_keeps_the_key(
    provider: str, provider_server: FakeProviderServer
) -> None:
    acts = await _activities(provider_server.env())
    same = provider_server.base_url(provider) + "/"
    await _run(acts, plan_built_call(provider, base_url=same))
    (call,) = provider_server.calls
    key = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}.get(
        provider, "GEMINI_API_KEY"
    )
    assert call.sent_key(FAKE_KEYS[key])


@pytest.mark.parametrize("model", ["%2e%2e/%2e%2e/other-tenant/x", "x#", "models/a/b", "a/../b"])
async def test_a_gemini_model_name_cannot_change_the_request_path(
    model: str, provider_server: FakeProviderServer
) -> None:
    """Gemini puts the model in the URL path: another path on the worker's host gets no key."""
    acts = await _activities(
        {**provider_server.env(), "GOOGLE_GEMINI_BASE_URL": f"{provider_server.url}/tenant-a/"}
    )
    call = plan_built_call("gemini").model_copy(update={"model": model})
    with pytest.raises(ApplicationError) as info:
        await _run(acts, call)
    assert info.value.type == ErrorType.REJECTED and info.value.non_retryable
    assert "not a plain model name" in info.value.message
    assert provider_server.requests == []


# --- the same attacks through a real worker: specs, fallbacks, plans -------------------


@pytest.fixture
def worker_env(
    provider_server: FakeProviderServer,
    other_server: FakeProviderServer,
    request: pytest.FixtureRequest,
) -> dict[str, str]:
    """A's endpoints and keys; ``{other}`` in a ``worker_env`` marker is B's URL."""
    env = provider_server.env()
    if marker := request.node.get_closest_marker("worker_env"):
        env.update({k: v.replace("{other}", other_server.url) for k, v in marker.kwargs.items()})
    return env


def spec(*steps: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    return {
        "name": "transport",
        "defaults": {"retry": FAST_RETRY, "max_tokens": 50, "on_failure": "fail", **defaults},
        "steps": list(steps),
    }


async def test_a_spec_started_by_any_means_cannot_send_the_key_with_provider_options(
    mixer: MixerClient, provider_server: FakeProviderServer, other_server: FakeProviderServer
) -> None:
    """Started straight through Temporal, as ``temporal workflow start`` would, so
    no client-side check stands between the spec and the worker."""
    b = other_server.base_url
    steps = [
        {
            "id": "gem-http-options",
            "provider": "gemini",
            "model": MODELS["gemini"],
            "prompt": "x",
            "provider_options": {
                "generation_config": {
                    "http_options": {"base_url": b("gemini"), "headers": {"x": "y"}}
                }
            },
        },
        {
            "id": "claude-headers",
            "provider": "anthropic",
            "model": MODELS["anthropic"],
            "prompt": "x",
            "provider_options": {"extra_headers": {"x": "y"}, "extra_query": {"key": "k"}},
        },
        {
            "id": "gpt-base-url",
            "provider": "openai",
            "model": MODELS["openai"],
            "prompt": "x",
            "provider_options": {"base_url": b("openai"), "default_headers": {"x": "y"}},
        },
    ]
    handle = await mixer.temporal.start_workflow(
        WORKFLOW_NAME,
        spec(*steps, on_failure="skip"),
        id=f"transport-{uuid.uuid4().hex[:8]}",
        task_queue=mixer.task_queue,
    )
    try:
        result = await mixer.get_handle(handle.id).result()
    except RunFailed as failed:
        # Spec validation may refuse these options before any step runs.
        assert "provider_options" in str(failed)
    else:
        for step_id, record in result.steps.items():
            assert record.status == StepStatus.SKIPPED, (step_id, record.error)
            assert record.attempts == 1, "a refusal is not retried"
            assert "provider_options." in (record.error or "")
    assert other_server.requests == []
    assert provider_server.requests == []


async def test_step_base_urls_the_operator_did_not_list_fail_in_a_run(
    mixer: MixerClient, provider_server: FakeProviderServer, other_server: FakeProviderServer
) -> None:
    steps = [
        {
            "id": f"{provider}-base-url",
            "provider": provider,
            "model": MODELS[provider],
            "prompt": "x",
            "base_url": other_server.base_url(provider),
        }
        for provider in PROVIDERS
    ]
    result = await (await mixer.start(spec(*steps, on_failure="skip"))).result()
    for step_id, record in result.steps.items():
        assert record.status == StepStatus.SKIPPED, (step_id, record.error)
        assert record.attempts == 1, "a refusal is not retried"
        assert "LLMMIXER_ALLOWED_BASE_URLS" in (record.error or "")
    assert other_server.requests == []
    assert provider_server.requests == []


async def test_a_fallback_target_elsewhere_gets_no_key(
    mixer: MixerClient, provider_server: FakeProviderServer, other_server: FakeProviderServer
) -> None:
    provider_server.fail("openai", 400, message="bad request")
    step = {
        "id": "a",
        "provider": "openai",
        "model": MODELS["openai"],
        "prompt": "x",
        "fallback": [
            {
                "provider": "anthropic",
                "model": MODELS["anthropic"],
                "base_url": other_server.anthropic_base_url,
            }
        ],
    }
    result = await (await mixer.start(spec(step, on_failure="skip"))).result()
    assert result.steps["a"].status == StepStatus.SKIPPED
    assert "LLMMIXER_ALLOWED_BASE_URLS" in (result.steps["a"].error or "")
    assert other_server.requests == []


@pytest.mark.worker_env(LLMMIXER_ALLOWED_BASE_URLS="http://localhost:1, {other}/")
async def test_a_listed_fallback_target_answers_without_the_key(
    mixer: MixerClient, provider_server: FakeProviderServer, other_server: FakeProviderServer
) -> None:
    provider_server.fail("openai", 400, message="bad request")
    other_server.reply("gemini", "from the listed server")
    step = {
        "id": "a",
        "provider": "openai",
        "model": MODELS["openai"],
        "prompt": "x",
        "fallback": [
            {
                "provider": "gemini",
                "model": MODELS["gemini"],
                "base_url": other_server.gemini_base_url,
            }
        ],
    }
    result = await (await mixer.start(spec(step))).result()
    assert result.status == RunStatus.COMPLETED
    assert result.steps["a"].output == "from the listed server"
    assert other_server.count("gemini") == 1
    assert_never_got_a_key(other_server)


async def test_a_decompose_plan_cannot_send_the_key_anywhere(
    mixer: MixerClient, provider_server: FakeProviderServer, other_server: FakeProviderServer
) -> None:
    b = other_server.base_url
    plan = json.dumps(
        {
            "steps": [
                {
                    "id": "leak-gemini",
                    "provider": "gemini",
                    "model": MODELS["gemini"],
                    "prompt": "x",
                    "provider_options": {
                        "generation_config": {
                            "http_options": {"base_url": b("gemini"), "headers": {"a": "b"}}
                        }
                    },
                },
                {
                    "id": "leak-openai",
                    "provider": "openai",
                    "model": "gpt-4.1-mini",
                    "prompt": "x",
                    "base_url": b("openai"),
                },
            ]
        }
    )
    for _ in range(FAST_RETRY["max_attempts"] + 1):
        provider_server.script("openai", Reply(text=plan), model="gpt-4.1")
    planner = {
        "id": "split",
        "kind": "decompose",
        "provider": "openai",
        "model": "gpt-4.1",
        "prompt": "plan it",
    }
    result = await (await mixer.start(spec(planner, on_failure="skip"))).result()
    assert other_server.requests == []
    for step_id in ("leak-gemini", "leak-openai"):
        record = result.steps.get(step_id)
        assert record is None or record.status != StepStatus.COMPLETED
    # Only the planner reached the worker's endpoint.
    assert {c.model for c in provider_server.calls} == {"gpt-4.1"}


async def test_a_worker_refuses_to_start_with_a_bad_allowed_list(client: Client) -> None:
    with pytest.raises(ValueError, match="LLMMIXER_ALLOWED_BASE_URLS") as info:
        async with mixer_worker(client, environ={"LLMMIXER_ALLOWED_BASE_URLS": "localhost:11434"}):
            pass
    assert "http://127.0.0.1:11434" in str(info.value)
