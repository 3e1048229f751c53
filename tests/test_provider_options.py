"""``provider_option_issues``: the schema spec validation and the activity share.

Every option that could move a request (an endpoint, a header, a query
parameter, a timeout, a credential) is an issue naming its path; the
generation settings the examples and docs use are not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from llmmixer.core.provider_options import provider_option_issues

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("gemini", {"generation_config": {"http_options": {}}}, "generation_config.http_options"),
    (
        "gemini",
        {"generation_config": {"http_options": {"base_url": "http://b", "headers": {"a": "b"}}}},
        "generation_config.http_options",
    ),
    ("gemini", {"http_options": {"base_url": "http://b"}}, "http_options"),
    (
        "gemini",
        {"generation_config": {"should_return_http_response": True}},
        "generation_config.should_return_http_response",
    ),
    ("gemini", {"generation_config": {"tools": []}}, "generation_config.tools"),
    ("gemini", {"generation_config": {"cached_content": "x"}}, "generation_config.cached_content"),
    (
        "gemini",
        {"generation_config": {"thinking_config": {"http_options": {}}}},
        "generation_config.thinking_config.http_options",
    ),
    (
        "gemini",
        {"safety_settings": [{"category": "c", "threshold": "t", "headers": {}}]},
        "safety_settings[0].headers",
    ),
    *(
        ("openai", {name: {}}, name)
        for name in (
            "extra_headers",
            "extra_query",
            "extra_body",
            "default_headers",
            "default_query",
            "base_url",
            "api_key",
            "organization",
            "timeout",
            "http_client",
            "stream",
            "model",
            "messages",
            "store",
            "tools",
        )
    ),
    ("openai", {"reasoning": {"effort": "low", "url": "x"}}, "reasoning.url"),
    *(
        ("anthropic", {name: {}}, name)
        for name in (
            "extra_headers",
            "extra_query",
            "extra_body",
            "default_headers",
            "base_url",
            "api_key",
            "auth_token",
            "timeout",
            "tools",
            "mcp_servers",
            "container",
            "max_tokens",
            "model",
        )
    ),
    ("anthropic", {"metadata": {"user_id": "u", "url": "x"}}, "metadata.url"),
]


@pytest.mark.parametrize(
    ("provider", "options", "path"), REFUSED, ids=[f"{p}-{f}" for p, _, f in REFUSED]
)
def test_an_option_outside_the_schema_is_an_issue_naming_its_path(
    provider: str, options: dict[str, Any], path: str
) -> None:
    issues = provider_option_issues(provider, options)
    assert [p for p, _ in issues] == [f"provider_options.{path}"]
    message = issues[0][1]
    assert message.startswith("not allowed; ")
    assert "worker's operator" in message


def test_the_message_lists_what_is_allowed_there() -> None:
    ((path, message),) = provider_option_issues(
        "gemini", {"generation_config": {"http_options": {"base_url": "http://b"}}}
    )
    assert path == "provider_options.generation_config.http_options"
    assert "gemini provider_options.generation_config take only these settings:" in message
    assert "top_k" in message and "thinking_config" in message
    assert "http_options" not in message.split(":", 1)[1]


ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    (
        "gemini",
        {
            "safety_settings": [
                {"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_ONLY_HIGH"}
            ],
            "generation_config": {
                "top_k": 5,
                "candidate_count": 1,
                "seed": 1,
                "presence_penalty": 0.1,
                "response_mime_type": "application/json",
                "response_schema": {"type": "OBJECT"},
                "thinking_config": {"thinking_budget": 1024, "include_thoughts": False},
            },
        },
    ),
    (
        "anthropic",
        {
            "top_k": 40,
            "thinking": {"type": "enabled", "budget_tokens": 2048},
            "output_config": {
                "effort": "high",
                "format": {"type": "json_schema", "schema": {"type": "object"}},
            },
            "metadata": {"user_id": "u-1"},
            "service_tier": "auto",
        },
    ),
    (
        "openai",
        {
            "seed": 7,
            "reasoning_effort": "low",
            "reasoning": {"effort": "low", "summary": "auto"},
            "logit_bias": {"50256": -100},
            "frequency_penalty": 0.5,
            "metadata": {"team": "a"},
            "top_k": 20,
            "min_p": 0.05,
        },
    ),
]


@pytest.mark.parametrize(("provider", "options"), ACCEPTED, ids=[p for p, _ in ACCEPTED])
def test_generation_settings_are_accepted(provider: str, options: dict[str, Any]) -> None:
    assert provider_option_issues(provider, options) == []


def test_a_wrong_value_is_an_issue_with_pydantics_reason() -> None:
    issues = provider_option_issues("openai", {"seed": "seven"})
    assert [p for p, _ in issues] == ["provider_options.seed"]
    assert "integer" in issues[0][1]


def test_no_options_and_unknown_providers() -> None:
    assert provider_option_issues("openai", {}) == []
    assert provider_option_issues("mistral", {}) == []
    ((path, message),) = provider_option_issues("mistral", {"x": 1})
    assert path == "provider_options" and "anthropic, openai, gemini" in message


def test_every_example_spec_keeps_validating() -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        default = (spec.get("defaults") or {}).get("provider")
        for step in spec.get("steps", []):
            options = step.get("provider_options")
            if options:
                provider = step.get("provider") or default
                assert provider_option_issues(provider, options) == [], (path.name, step["id"])


def test_a_worker_that_remembered_the_empty_case_still_refuses_every_bad_call() -> None:
    """The activity and each adapter keep the answer for calls without options;
    a call with options, or a model name that would move the request, is
    still checked every time."""
    from llmmixer.activities.providers.base import ProviderError
    from llmmixer.activities.providers.options import OptionsCheck
    from llmmixer.core.contracts import ErrorType
    from llmmixer.core.provider_options import GeminiOptions

    check = OptionsCheck()
    for _ in range(2):
        check.check("gemini", {}, "gemini-2.5-flash")
        assert check.parsed("gemini", GeminiOptions, {}) == GeminiOptions()
    with pytest.raises(ProviderError) as bad_model:
        check.check("gemini", {}, "..%2f..%2fv1beta/files")
    assert bad_model.value.error_type == ErrorType.REJECTED
    moved = {"generation_config": {"http_options": {"base_url": "http://attacker.test"}}}
    for attempt in (
        lambda: check.check("gemini", moved),
        lambda: check.parsed("gemini", GeminiOptions, moved),
    ):
        with pytest.raises(ProviderError) as refused:
            attempt()
        assert refused.value.error_type == ErrorType.REJECTED
        assert "generation_config.http_options" in refused.value.message
    # Options for a provider without a schema are refused every time.
    for _ in range(2):
        with pytest.raises(ProviderError, match="no provider_options are known"):
            check.check("nosuch", {"seed": 1})
