"""What a step's ``provider_options`` may say: generation settings, and nothing else.

``provider_options`` come from a spec or from a decompose plan (model output),
neither of which the worker's operator vouches for. They used to reach the
SDKs unchecked, and an SDK takes more than generation settings: google-genai's
``GenerateContentConfig`` has ``http_options``, which replaces the request's
``base_url`` and headers while the client still adds the worker's
``GEMINI_API_KEY``. One option sent the key to any server.

So each provider's options are an explicit schema of known generation
settings, closed at every level (``extra="forbid"``): anything that sets an
endpoint, a header, a query parameter, a timeout, a credential or the
transport is not in it, and an unknown key is an error naming its path
(``provider_options.generation_config.http_options: not allowed; ...``).
The adapters build their requests from the parsed model only, never from
the raw mapping.

Pure (pydantic only, no SDK): spec and plan validation call
:func:`provider_option_issues` with the same rules the activity enforces.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmmixer.core.providers import provider_names, provider_spec, resolve

__all__ = [
    "AnthropicOptions",
    "GeminiGenerationConfig",
    "GeminiOptions",
    "OpenAIOptions",
    "model_name_issue",
    "option_model",
    "provider_option_issues",
]


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def body(self) -> dict[str, Any]:
        """The settings that were given, as the JSON the provider's API takes."""
        return self.model_dump(mode="json", exclude_none=True, by_alias=True)


# --- Gemini (google-genai GenerateContentConfig, generation fields only) ----------------


class GeminiThinkingConfig(_Settings):
    include_thoughts: bool | None = None
    thinking_budget: int | None = None
    thinking_level: str | None = None


class GeminiGenerationConfig(_Settings):
    """The ``GenerateContentConfig`` fields that shape what the model generates.

    Left out on purpose: ``http_options`` and ``should_return_http_response``
    (transport), ``tools``/``tool_config``/``automatic_function_calling`` (the
    activity does not run tools), ``cached_content`` and ``labels`` (other
    resources on the account), ``system_instruction`` (the step's ``system``).
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: float | None = None
    candidate_count: int | None = None
    max_output_tokens: int | None = None
    stop_sequences: list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    response_logprobs: bool | None = None
    logprobs: int | None = None
    response_mime_type: str | None = None
    response_schema: dict[str, Any] | None = None
    response_json_schema: dict[str, Any] | None = None
    response_modalities: list[str] | None = None
    media_resolution: str | None = None
    thinking_config: GeminiThinkingConfig | None = None


class GeminiSafetySetting(_Settings):
    category: str
    threshold: str
    method: str | None = None


class GeminiOptions(_Settings):
    safety_settings: list[GeminiSafetySetting] | None = None
    generation_config: GeminiGenerationConfig | None = None


# --- Anthropic (Messages API request body) ---------------------------------------------


class AnthropicThinking(_Settings):
    type: str
    budget_tokens: int | None = None
    display: str | None = None


class AnthropicOutputFormat(_Settings):
    type: str
    json_schema: dict[str, Any] = Field(alias="schema")


class AnthropicOutputConfig(_Settings):
    effort: str | None = None
    format: AnthropicOutputFormat | None = None


class AnthropicMetadata(_Settings):
    user_id: str | None = None


class AnthropicOptions(_Settings):
    """Body fields of a Messages request beyond the step's own settings.

    Left out on purpose: the SDK's request arguments (``extra_headers``,
    ``extra_query``, ``extra_body``, ``timeout``) and client arguments
    (``base_url``, ``api_key``, ``auth_token``, ``default_headers``), and
    ``tools``, ``mcp_servers`` and ``container``, which make Anthropic's
    servers reach other servers on the step's behalf.
    """

    top_k: int | None = None
    thinking: AnthropicThinking | None = None
    output_config: AnthropicOutputConfig | None = None
    metadata: AnthropicMetadata | None = None
    service_tier: str | None = None
    inference_geo: str | None = None
    speed: str | None = None


# --- OpenAI (Chat Completions / Responses request body) --------------------------------


class OpenAIReasoning(_Settings):
    effort: str | None = None
    summary: str | None = None


class OpenAIOptions(_Settings):
    """Body fields of a Chat Completions or Responses request, plus the sampling
    settings OpenAI-compatible servers (vLLM and the like) commonly add.

    Left out on purpose: the SDK's request and client arguments (headers,
    query, base URL, timeout, key), ``stream``/``model``/``messages``/``store``
    (the adapter's to set), and tools.
    """

    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, int] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    reasoning_effort: str | None = None
    reasoning: OpenAIReasoning | None = None
    verbosity: str | None = None
    service_tier: str | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    truncation: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None


def option_model(provider: str) -> type[BaseModel] | None:
    """The closed schema of ``provider``'s options, as the provider registry names it.

    None for a provider the registry does not declare. Resolved on each call
    rather than into a table at import: a provider's schema may live in its own
    (SDK-free) module that itself builds on this one.
    """
    try:
        reference = provider_spec(provider).options
    except ValueError:
        return None
    model = resolve(reference)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"provider registry: {provider}'s options {reference!r} is not a model")
    return model


# Gemini puts the model name in the request path (``models/{model}:streamGenerateContent``).
# A name with '/', '%', '#' or dot segments would reach another path on the
# worker's endpoint with the worker's key (``%2e%2e/`` gets past the SDK's own
# check), so only plain names are sent. OpenAI and Anthropic send it in the body.
_GEMINI_MODEL = re.compile(r"(?:models/|tunedModels/)?[A-Za-z0-9][A-Za-z0-9._-]*")


def model_name_issue(provider: str, model: str) -> str | None:
    """Why ``model`` cannot be sent to ``provider``, or None when it can."""
    if provider == "gemini" and (not _GEMINI_MODEL.fullmatch(model) or ".." in model):
        return (
            f"gemini model name {model!r} is not a plain model name: use letters, digits, "
            "'.', '-' and '_' (optionally after models/ or tunedModels/), e.g. gemini-2.5-flash"
        )
    return None


def provider_option_issues(provider: str, options: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every problem with ``options`` for ``provider``, as ``(field path, message)``.

    Paths start at ``provider_options`` (``provider_options.safety_settings[0].threshold``).
    An empty list means the activity will accept them. For a provider this
    module does not know, any option is an issue (unknown providers are
    reported by the spec's own validation).
    """
    model = option_model(provider)
    if model is None:
        if not options:
            return []
        return [
            (
                "provider_options",
                f"no provider_options are known for provider {provider!r}: use one of "
                f"{', '.join(provider_names())}",
            )
        ]
    if not isinstance(options, Mapping):
        return [("provider_options", "must be a mapping of option names to values")]
    try:
        model.model_validate(dict(options))
    except ValidationError as error:
        return [_issue(provider, model, detail) for detail in error.errors()]
    return []


def _issue(provider: str, model: type[BaseModel], detail: Any) -> tuple[str, str]:
    loc: tuple[int | str, ...] = tuple(detail.get("loc", ()))
    path = "provider_options" + "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc
    )
    if detail.get("type") == "extra_forbidden":
        where = _path_of(loc[:-1])
        known = ", ".join(_field_names(_model_at(model, loc[:-1])))
        return (
            path,
            f"not allowed; {provider} provider_options{where} take only these "
            f"settings: {known}. Endpoints, headers, timeouts and keys are set by the "
            "worker's operator, never by a spec or a plan",
        )
    return (path, str(detail.get("msg", "invalid value")))


def _path_of(loc: Sequence[int | str]) -> str:
    names = [str(part) for part in loc if not isinstance(part, int)]
    return "." + ".".join(names) if names else ""


def _field_names(model: type[BaseModel] | None) -> list[str]:
    if model is None:
        return []
    return [info.alias or name for name, info in model.model_fields.items()]


def _model_at(model: type[BaseModel], loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The nested settings model that the path ``loc`` leads to."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        fields = current.model_fields
        info = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
        current = _submodel(info.annotation) if info is not None else None
    return current


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _submodel(arg)
            if found is not None:
                return found
    return None
