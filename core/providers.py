"""Every provider llmmixer can call, declared once.

Each :class:`ProviderSpec` says everything the rest of the code needs to know
about one provider: its name in specs, the worker variables that hold its key
and its endpoint, the SDK's default endpoint, where its adapter and its
``provider_options`` schema live, its section of ``prices.toml``, the model
a planner and a dry run name for it, and its OpenTelemetry name. Validation,
worker settings, ``llmmixer doctor``, the client pool, pricing and telemetry
all read this tuple; adding a provider is one adapter module and one entry
here.

Pure on purpose (standard library only, no other llmmixer module): the
workflow sandbox imports it through ``contracts.PROVIDERS``, and ``llmmixer
validate`` must never import an SDK. So the adapter and option schema are
named as ``"module:attribute"`` and imported only when a call needs them.
"""

from __future__ import annotations

import datetime
import importlib
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MODEL_RETIREMENTS",
    "PROVIDER_SPECS",
    "ModelRetirement",
    "ProviderSpec",
    "RetirementNotice",
    "model_retirement",
    "provider_names",
    "provider_spec",
    "resolve",
    "retirement_notice",
    "unknown_provider_message",
]


# Kept in step with core/attachments.py's MEDIA_TYPES (this module imports
# nothing of llmmixer).
_IMAGES = ("image/png", "image/jpeg", "image/gif", "image/webp")
_ALL_FILES = (*_IMAGES, "application/pdf", "text/plain")


@dataclass(frozen=True)
class ProviderSpec:
    """One provider: what the worker reads, builds, prices and reports for it."""

    #: The name specs and plans use (``provider: openai``).
    name: str
    #: Worker variables that may hold the key, first set one wins
    #: (``GEMINI_API_KEY``, then ``GOOGLE_API_KEY``).
    key_variables: tuple[str, ...]
    #: The worker variable that moves this provider's endpoint (keys go there).
    base_url_variable: str
    #: The SDK's own default, written out so a client never falls back to
    #: reading the process environment behind our back.
    default_base_url: str
    #: ``"module:Class"`` of the adapter; the class takes
    #: ``(config, secrets=...)``. Imported on first use: it imports the SDK.
    adapter: str
    #: ``"module:Class"`` of the closed pydantic model of ``provider_options``.
    #: Must import no SDK: spec and plan validation load it.
    options: str
    #: The table name of this provider's models in ``prices.toml``.
    price_key: str
    #: A model named for this provider where any model would do: the planner's
    #: description of "any model" and the dry-run responder's targets.
    example_model: str
    #: ``gen_ai.provider.name`` (OpenTelemetry GenAI conventions).
    otel_name: str
    #: Media types of the files a step may attach (core/attachments.py) ...
    attachment_types: tuple[str, ...] = _ALL_FILES
    #: ... and at a step's own ``base_url`` (a compatible server, which may
    #: take fewer kinds of parts than the provider itself).
    own_endpoint_attachment_types: tuple[str, ...] = _ALL_FILES

    def attachment_refusal(self, media_type: str, *, own_endpoint: bool) -> str | None:
        """Why this provider cannot be sent a file of ``media_type``, or None."""
        accepted = self.own_endpoint_attachment_types if own_endpoint else self.attachment_types
        if media_type in accepted:
            return None
        where = f"{self.name} at a step's own base_url" if own_endpoint else self.name
        return f"{where} takes {', '.join(accepted) or 'no files'}, not {media_type}"


_OPTIONS = "llmmixer.core.provider_options"

PROVIDER_SPECS: tuple[ProviderSpec, ...] = (
    ProviderSpec(
        name="anthropic",
        key_variables=("ANTHROPIC_API_KEY",),
        base_url_variable="ANTHROPIC_BASE_URL",
        default_base_url="https://api.anthropic.com",
        adapter="llmmixer.activities.providers.anthropic:AnthropicAdapter",
        options=f"{_OPTIONS}:AnthropicOptions",
        price_key="anthropic",
        example_model="claude-sonnet-5-5",
        otel_name="anthropic",
    ),
    ProviderSpec(
        name="openai",
        key_variables=("OPENAI_API_KEY",),
        base_url_variable="OPENAI_BASE_URL",
        default_base_url="https://api.openai.com/v1",
        adapter="llmmixer.activities.providers.openai:OpenAIAdapter",
        options=f"{_OPTIONS}:OpenAIOptions",
        price_key="openai",
        example_model="gpt-4.1-mini",
        otel_name="openai",
        # OpenAI-compatible servers (Ollama, vLLM) take image_url parts, but
        # few take `file` parts: a PDF there would fail at every attempt.
        own_endpoint_attachment_types=(*_IMAGES, "text/plain"),
    ),
    ProviderSpec(
        name="gemini",
        key_variables=("GEMINI_API_KEY", "GOOGLE_API_KEY"),
        base_url_variable="GOOGLE_GEMINI_BASE_URL",
        default_base_url="https://generativelanguage.googleapis.com/",
        adapter="llmmixer.activities.providers.gemini:GeminiAdapter",
        options=f"{_OPTIONS}:GeminiOptions",
        price_key="gemini",
        example_model="gemini-2.5-flash",
        otel_name="gcp.gemini",
    ),
)


def provider_names() -> tuple[str, ...]:
    """The names in declaration order (the order messages list them in)."""
    return tuple(spec.name for spec in PROVIDER_SPECS)


def unknown_provider_message(provider: str) -> str:
    """What every layer says about a provider name that is not declared here."""
    return f"unknown provider {provider!r}: use one of {', '.join(provider_names())}"


def provider_spec(provider: str) -> ProviderSpec:
    """The entry for ``provider``; ``ValueError`` listing the known names otherwise."""
    for spec in PROVIDER_SPECS:
        if spec.name == provider:
            return spec
    raise ValueError(unknown_provider_message(provider))


def resolve(reference: str) -> Any:
    """The object a ``"module:attribute"`` reference names, importing the module."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


# ---- model retirements -----------------------------------------------------------------


@dataclass(frozen=True)
class ModelRetirement:
    """A model the provider stops serving on ``retires``, and what to use instead."""

    provider: str
    #: The base name; its dated snapshots (``claude-sonnet-4-5-20250929``) are included.
    model: str
    #: The first day requests to the model fail.
    retires: datetime.date
    replacement: str


# From Anthropic's model deprecations page and the end-of-life dates the
# anthropic SDK warns with (anthropic/_data/deprecated_models.py), checked
# 2026-11-28; replacements are the current models of the same line. Partner
# platforms (Bedrock, Vertex) keep their own schedules and names, so only the
# Claude API's names are listed. Only read to tell a spec's owner what to
# change: validation never depends on the date, so a spec that ran once still
# replays and validates, and its model is still priced (prices.toml keeps it).
MODEL_RETIREMENTS: tuple[ModelRetirement, ...] = (
    ModelRetirement(
        "anthropic", "claude-sonnet-4-5", datetime.date(2026, 11, 30), "claude-sonnet-5-5"
    ),
    ModelRetirement("anthropic", "claude-opus-4-5", datetime.date(2027, 1, 22), "claude-opus-5-5"),
    ModelRetirement("anthropic", "claude-opus-4-1", datetime.date(2026, 8, 5), "claude-opus-5-5"),
    ModelRetirement(
        "anthropic", "claude-sonnet-4", datetime.date(2026, 6, 15), "claude-sonnet-5-5"
    ),
    ModelRetirement("anthropic", "claude-opus-4", datetime.date(2026, 6, 15), "claude-opus-5-5"),
    ModelRetirement(
        "anthropic", "claude-sonnet-4-0", datetime.date(2026, 6, 15), "claude-sonnet-5-5"
    ),
    ModelRetirement("anthropic", "claude-opus-4-0", datetime.date(2026, 6, 15), "claude-opus-5-5"),
    ModelRetirement(
        "anthropic", "claude-3-7-sonnet", datetime.date(2026, 2, 19), "claude-sonnet-5-5"
    ),
    ModelRetirement("anthropic", "claude-3-opus", datetime.date(2026, 1, 5), "claude-opus-5-5"),
    ModelRetirement(
        "anthropic", "claude-3-5-sonnet", datetime.date(2025, 10, 28), "claude-sonnet-5-5"
    ),
)

# A dated snapshot (-20250929) or an alias (-latest) of a base name.
_SNAPSHOT = re.compile(r"(-\d{8}|-latest)$")


def model_retirement(provider: str, model: str) -> ModelRetirement | None:
    """The retirement of ``model`` (or of its base name) at ``provider``, or None."""
    name = model.strip().lower()
    base = _SNAPSHOT.sub("", name)
    for retirement in MODEL_RETIREMENTS:
        if retirement.provider == provider and retirement.model in (name, base):
            return retirement
    return None


@dataclass(frozen=True)
class RetirementNotice:
    """What to tell the owner of a spec naming a retiring or retired model."""

    #: True once the model is past its end of life: calls to it fail.
    retired: bool
    message: str


def retirement_notice(provider: str, model: str, today: datetime.date) -> RetirementNotice | None:
    """The notice for ``provider``/``model`` on ``today``, or None for a current model."""
    retirement = model_retirement(provider, model)
    if retirement is None:
        return None
    when = retirement.retires.isoformat()
    if today >= retirement.retires:
        return RetirementNotice(
            True,
            f"{provider} retired {model} on {when}, so calls to it fail: "
            f"change it to {retirement.replacement}",
        )
    return RetirementNotice(
        False,
        f"{provider} retires {model} on {when} (calls to it fail from then on): "
        f"change it to {retirement.replacement}",
    )
