"""Validation of ``response_format: json`` replies.

Providers' JSON modes are best-effort (Anthropic has none on the Messages API,
OpenAI-compatible servers may ignore it), so every JSON reply is checked here
whatever the provider promised. A reply that fails is ``INVALID_OUTPUT``,
which is retryable: the next attempt often gets the format right. A schema
that is itself invalid is the spec's fault, so that one is ``REJECTED``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jsonschema
import jsonschema.exceptions
import jsonschema.validators

from llmmixer.activities.providers.base import ProviderError, ProviderResult
from llmmixer.core.contracts import ErrorType, LlmCall
from llmmixer.core.documents import DocumentError, load_json_document, strip_code_fence

__all__ = [
    "MIN_CACHED_PREFIX_CHARS",
    "enforce_response_format",
    "json_instruction",
    "stable_prefix",
    "validate_json_reply",
]

# About 1,024 tokens, the smallest prefix any provider caches: marking less
# pays nothing, and a split message must not change what short prompts send.
MIN_CACHED_PREFIX_CHARS = 4096

# Models (Claude especially) like to wrap JSON in a Markdown fence.
_MAX_SHOWN = 300


def json_instruction(schema: dict[str, Any] | None) -> str:
    """A system-prompt addition for providers without a native JSON mode."""
    text = "Reply with a single JSON value only: no prose, no Markdown fences."
    if schema is not None:
        text += " The JSON must match this JSON Schema:\n" + json.dumps(schema, sort_keys=True)
    return text


def validate_json_reply(text: str, schema: dict[str, Any] | None = None) -> str:
    """Check that ``text`` is JSON (matching ``schema`` when given); return the JSON text.

    A single surrounding Markdown code fence is removed, so the returned text
    parses with ``json.loads`` as it is. Raises ``ProviderError(INVALID_OUTPUT)``
    naming what is wrong, or ``ProviderError(REJECTED)`` when ``schema`` itself
    is not a valid JSON Schema.
    """
    # Model output: the safe loader bounds size and depth, so a deeply nested
    # reply is an invalid answer, never a RecursionError.
    body = strip_code_fence(text)
    try:
        value: Any = load_json_document(body, source="the reply")
    except DocumentError as exc:
        shown = body if len(body) <= _MAX_SHOWN else body[:_MAX_SHOWN] + "…"
        raise ProviderError(
            ErrorType.INVALID_OUTPUT,
            f"reply is not valid JSON ({exc}); "
            f"reply began: {shown!r}. The call will be retried; if it keeps failing, "
            "state the expected JSON in the prompt or raise max_tokens (a cut reply is not JSON)",
        ) from None
    if schema is None:
        return body
    validator_cls = jsonschema.validators.validator_for(schema)
    try:
        validator_cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise ProviderError(
            ErrorType.REJECTED,
            f"the step's json_schema is not a valid JSON Schema: {exc.message}; fix json_schema",
        ) from None
    error = jsonschema.exceptions.best_match(validator_cls(schema).iter_errors(value))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise ProviderError(
            ErrorType.INVALID_OUTPUT,
            f"reply JSON does not match json_schema at {where}: {error.message}. "
            "The call will be retried; if it keeps failing, describe the schema in the prompt",
        )
    return body


def enforce_response_format(call: LlmCall, result: ProviderResult) -> ProviderResult:
    """Validate ``result`` against ``call.response_format``; every adapter ends with this."""
    if call.response_format != "json" or result.tool_calls:
        # A turn that calls tools is not the answer yet: the format applies
        # to the final one.
        return result
    text = validate_json_reply(result.text, call.json_schema)
    return dataclasses.replace(result, text=text)


def stable_prefix(text: str) -> str:
    """The part of a prompt that sibling steps are likely to share, or "".

    Prompts laid out for caching put the long shared context first and each
    step's own question after its last paragraph break; that question is
    what differs between siblings. The prefix ends with the break, so the
    prefix and the rest joined are the text as it was.
    """
    cut = text.rfind("\n\n")
    if cut < MIN_CACHED_PREFIX_CHARS:
        return ""
    return text[: cut + 2]
