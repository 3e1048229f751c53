"""One place that turns each provider SDK's exceptions into a ``ProviderError``.

The retry decision follows the contract (section 8): 408, 409, 429, 5xx,
connection errors, timeouts and cut streams are retryable; 401/403 are auth
failures that name the worker's key variable; every other 4xx is rejected
and says which kind (bad request, model not found, content refused). A
``retry-after-ms`` or ``retry-after`` header becomes ``retry_after_s`` so the
activity can set Temporal's next retry delay.

Every message built here goes through :func:`redact` first: providers
sometimes echo the request (or the key) back in an error body, and an error
message ends up in workflow history, logs and the event stream. Request
headers are never read into a message.
"""

from __future__ import annotations

import asyncio
import email.utils
import html
import json
import re
import time
from collections.abc import Iterable, Mapping
from types import MappingProxyType, ModuleType
from typing import Any

import anthropic
import httpx
import httpx2
import openai
from google.genai import errors as genai_errors

from llmmixer.activities.providers.base import ProviderError
from llmmixer.core.contracts import ErrorType
from llmmixer.core.providers import PROVIDER_SPECS
from llmmixer.core.redaction import redact

__all__ = [
    "KEY_VARIABLES",
    "cut_stream_error",
    "malformed_stream_error",
    "map_anthropic_error",
    "map_gemini_error",
    "map_openai_error",
    "missing_key_error",
    "parse_retry_after",
    "redact",
    "refusal_error",
    "status_error",
    "stream_reported_error",
]

# The worker-side variable an auth message names for each provider's key: the
# first one the registry reads it from.
KEY_VARIABLES: Mapping[str, str] = MappingProxyType(
    {spec.name: spec.key_variables[0] for spec in PROVIDER_SPECS}
)

# Long enough to keep a provider's explanation, short enough for history.
_MAX_DETAIL = 600

_TRANSPORT_TIMEOUTS: tuple[type[BaseException], ...] = (
    httpx.TimeoutException,
    httpx2.TimeoutException,
    asyncio.TimeoutError,
    TimeoutError,
)
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    httpx.TransportError,
    httpx2.TransportError,
    ConnectionError,
)
try:
    # google-genai streams over aiohttp whenever aiohttp is installed (the s3
    # extra brings it in), and then its connection errors are aiohttp's.
    import aiohttp
except ImportError:  # pragma: no cover - the SDK then uses httpx2
    pass
else:
    _TRANSPORT_TIMEOUTS = (*_TRANSPORT_TIMEOUTS, aiohttp.ServerTimeoutError)
    _TRANSPORT_ERRORS = (
        *_TRANSPORT_ERRORS,
        aiohttp.ClientConnectionError,
        aiohttp.ClientPayloadError,
    )

_REFUSAL_WORDS = ("content_policy", "content policy", "content_filter", "safety", "refus")


def parse_retry_after(
    headers: Mapping[str, str] | None, *, now: float | None = None
) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (preferred) or ``retry-after``.

    ``retry-after`` may be delta-seconds or an HTTP date (RFC 9110). Returns
    None when neither header is present or parseable; never a negative delay.
    """
    if not headers:
        return None
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def missing_key_error(provider: str) -> ProviderError:
    """The call cannot be made: the worker has no key for ``provider``."""
    var = KEY_VARIABLES.get(provider, f"{provider.upper()}_API_KEY")
    return ProviderError(
        ErrorType.AUTH,
        f"no API key for {provider}: set {var} on the worker (the spec never carries keys)",
    )


def cut_stream_error(provider: str, model: str, missing: str) -> ProviderError:
    """A stream that ended (cleanly or not) before its terminal event."""
    return ProviderError(
        ErrorType.RETRYABLE,
        f"{provider} stream for {model} ended before {missing}: the reply was incomplete "
        "and was discarded; the call will be retried",
    )


def refusal_error(provider: str, model: str, reason: str, detail: str = "") -> ProviderError:
    """The model answered but declined (safety stop, content filter, refusal).

    One error type whatever the provider calls it, never retried: the same
    prompt is refused again. ``reason`` is the provider's own word for it.
    """
    said = f": {_clip(detail)}" if detail else ""
    return ProviderError(
        ErrorType.REFUSED,
        f"{provider}/{model} refused the request ({reason}){said}. Change the prompt or "
        "choose another model (`fallback_on: [refused]` lets the step try its next target); "
        "retrying the same prompt will not help",
        reason=reason,
    )


def malformed_stream_error(provider: str, detail: str) -> ProviderError:
    """A stream event that is not what the API defines (bad JSON, unknown shape)."""
    return ProviderError(
        ErrorType.RETRYABLE,
        f"{provider} sent a malformed stream event ({_clip(detail)}); the reply was discarded "
        "and the call will be retried",
    )


def status_error(
    provider: str,
    status: int,
    detail: str,
    headers: Mapping[str, str] | None,
    secrets: Iterable[str | None] = (),
) -> ProviderError:
    """Classify an HTTP error status from ``provider`` (shared by every adapter)."""
    detail = _clip(redact(detail, secrets)) or "no details given"
    retry_after = parse_retry_after(headers)
    if status in (401, 403):
        var = KEY_VARIABLES.get(provider, f"{provider.upper()}_API_KEY")
        what = "rejected the API key" if status == 401 else "denied permission for this key"
        return ProviderError(
            ErrorType.AUTH,
            f"{provider} {what} (HTTP {status}): {detail}. Set a valid {var} on the worker "
            "and restart it (the spec never carries keys)",
            status_code=status,
        )
    if status in (408, 409, 429) or status >= 500:
        reason = {408: "request timeout", 409: "conflict", 429: "rate limit"}.get(
            status, "server error"
        )
        when = f" after {retry_after:g} s (retry-after)" if retry_after is not None else ""
        return ProviderError(
            ErrorType.RETRYABLE,
            f"{provider} {reason} (HTTP {status}): {detail}; the call will be retried{when}",
            status_code=status,
            retry_after_s=retry_after,
        )
    kind, advice = _rejection(status, detail)
    if kind == "content refused":
        return ProviderError(
            ErrorType.REFUSED,
            f"{provider} refused the request (HTTP {status}): {detail}. {advice}",
            status_code=status,
            reason=f"HTTP {status}",
        )
    return ProviderError(
        ErrorType.REJECTED,
        f"{provider} rejected the request: {kind} (HTTP {status}): {detail}. {advice}",
        status_code=status,
    )


def _map_stainless_error(
    provider: str,
    sdk: ModuleType,
    exc: BaseException,
    secrets: Iterable[str | None],
    timeout_s: float | None,
) -> ProviderError:
    """The ``openai`` and ``anthropic`` SDKs share one generated error hierarchy."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, sdk.APIStatusError) and exc.status_code < 400:
        # Anthropic's `event: error` inside a stream that began with 200
        # (overloaded_error, api_error): the SDK builds a status error from
        # the 200 response, which is no rejection of the request.
        return stream_reported_error(provider, _body_message(exc.body, exc.message), secrets)
    if isinstance(exc, sdk.APIStatusError):
        detail = _body_message(exc.body, exc.message)
        if exc.response.headers.get("content-type", "").startswith("text/html"):
            # A proxy's or load balancer's page, not the provider's JSON; the
            # SDK may not have read its body (a stream), so the status says it.
            page = _plain(exc.body) if isinstance(exc.body, str) else ""
            detail = page or f"HTML error page: {exc.status_code} {exc.response.reason_phrase}"
        return status_error(provider, exc.status_code, detail, exc.response.headers, secrets)
    if isinstance(exc, sdk.APITimeoutError):
        return _timeout(provider, timeout_s)
    if isinstance(exc, sdk.APIConnectionError):
        return _connection(provider, exc, secrets)
    if isinstance(exc, sdk.APIError):
        # An error event inside a stream that had already started with 200.
        return stream_reported_error(provider, _body_message(exc.body, exc.message), secrets)
    return _transport_or_reraise(provider, exc, secrets, timeout_s)


def map_openai_error(
    exc: BaseException,
    secrets: Iterable[str | None] = (),
    *,
    timeout_s: float | None = None,
    provider: str = "openai",
) -> ProviderError:
    """Map an ``openai`` SDK (or transport) exception from ``provider``'s endpoint."""
    return _map_stainless_error(provider, openai, exc, secrets, timeout_s)


def map_anthropic_error(
    exc: BaseException, secrets: Iterable[str | None] = (), *, timeout_s: float | None = None
) -> ProviderError:
    """Map an ``anthropic`` SDK (or transport) exception."""
    return _map_stainless_error("anthropic", anthropic, exc, secrets, timeout_s)


def map_gemini_error(
    exc: BaseException, secrets: Iterable[str | None] = (), *, timeout_s: float | None = None
) -> ProviderError:
    """Map a ``google-genai`` SDK (or transport) exception."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, genai_errors.UnknownApiResponseError):
        return malformed_stream_error("gemini", redact(str(exc), secrets))
    if isinstance(exc, genai_errors.APIError):
        headers = getattr(exc.response, "headers", None)
        detail = " ".join(str(p) for p in (exc.status, exc.message) if p)
        return status_error("gemini", int(exc.code or 500), detail, headers, secrets)
    return _transport_or_reraise("gemini", exc, secrets, timeout_s)


# --- helpers -------------------------------------------------------------------------


_HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"<[^>]+>")


def _plain(text: str) -> str:
    """An HTML error page (a proxy's 502) as the words a person would read on it."""
    head = text.lstrip()[:200].lower()
    if not (head.startswith("<!doctype html") or head.startswith("<html") or "<body" in head):
        return text
    title = _HTML_TITLE.search(text)
    body = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", text, flags=re.IGNORECASE | re.DOTALL)
    words = html.unescape(_HTML_TAG.sub(" ", body))
    if title:
        heading = html.unescape(title.group(1)).strip()
        return f"HTML error page: {heading}" if heading else f"HTML error page: {words}"
    return f"HTML error page: {words}"


def _clip(text: str) -> str:
    text = " ".join(_plain(text).split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"


def _body_message(body: object, fallback: str) -> str:
    """The provider's own explanation from an error body, not the SDK's wrapper text."""
    if isinstance(body, Mapping):
        err: Any = body.get("error", body)
        if isinstance(err, Mapping):
            message = err.get("message")
            kind = err.get("type") or err.get("code")
            if isinstance(message, str) and message:
                return f"{kind}: {message}" if isinstance(kind, str) and kind else message
        elif isinstance(err, str) and err:
            return err
    return fallback


def _rejection(status: int, detail: str) -> tuple[str, str]:
    lowered = detail.lower()
    if any(word in lowered for word in _REFUSAL_WORDS):
        return (
            "content refused",
            "Change the prompt or choose another model; retrying the same prompt will not help.",
        )
    if status == 404:
        return (
            "model not found",
            "Check the step's model name (and base_url) for this provider.",
        )
    if status == 413:
        return ("request too large", "Shorten the prompt or lower max_tokens.")
    if status == 402:
        return ("payment required", "Check the provider account's billing and quota.")
    if status == 422:
        return ("unprocessable request", "Fix the step's parameters.")
    return (
        "bad request",
        "Fix the step's parameters (model, max_tokens, temperature, stop, json_schema).",
    )


def _timeout(provider: str, timeout_s: float | None) -> ProviderError:
    within = f" within {timeout_s:g} s" if timeout_s is not None else ""
    return ProviderError(
        ErrorType.RETRYABLE,
        f"{provider} did not answer{within} (timeout); the call will be retried "
        "(raise the step's timeout_s if the model is slow)",
    )


def _connection(provider: str, exc: BaseException, secrets: Iterable[str | None]) -> ProviderError:
    cause = exc.__cause__ or exc.__context__ or exc
    what = type(cause).__name__
    text = _clip(redact(str(cause), secrets))
    return ProviderError(
        ErrorType.RETRYABLE,
        f"connection to {provider} failed or dropped ({what}: {text or 'no details'}); "
        "the call will be retried (check the worker's network and the provider's base URL)",
    )


def stream_reported_error(
    provider: str, detail: str, secrets: Iterable[str | None] = ()
) -> ProviderError:
    """An error event inside a stream that had started with HTTP 200 (overload, server fault)."""
    return ProviderError(
        ErrorType.RETRYABLE,
        f"{provider} reported an error inside the stream: {_clip(redact(detail, secrets))}; "
        "the call will be retried",
    )


def _transport_or_reraise(
    provider: str,
    exc: BaseException,
    secrets: Iterable[str | None],
    timeout_s: float | None,
) -> ProviderError:
    if isinstance(exc, _TRANSPORT_TIMEOUTS):
        return _timeout(provider, timeout_s)
    if isinstance(exc, _TRANSPORT_ERRORS):
        return _connection(provider, exc, secrets)
    if isinstance(exc, json.JSONDecodeError):
        return malformed_stream_error(provider, redact(str(exc), secrets))
    # Anything else is a bug in our code or the SDK's, not a provider outcome:
    # the caller re-raises the original so its traceback is kept.
    raise exc
