"""The narrow seam between the LLM activity and the provider SDKs.

One adapter per provider implements :class:`ProviderAdapter`: a single
``complete`` method that streams one :class:`~llmmixer.core.contracts.LlmCall`
and returns a :class:`ProviderResult`, or raises :class:`ProviderError`. Nothing
here imports Temporal: the activity turns a ``ProviderError`` into an
``ApplicationError`` whose ``type`` is ``error_type``.

Error model (every failure an adapter raises is a ``ProviderError``)::

    ProviderError.error_type
    ├── ErrorType.RETRYABLE       408/409/429/5xx, connection, timeout, cut stream
    ├── ErrorType.REJECTED        other 4xx: bad request, unknown model
    ├── ErrorType.REFUSED         the model or its filters declined (``reason`` says why)
    ├── ErrorType.TRUNCATED       the reply hit the token limit and may not pass
    ├── ErrorType.AUTH            401/403 or no key: set the named variable on the worker
    ├── ErrorType.CIRCUIT_OPEN    this worker's breaker for provider/model is open
    └── ErrorType.INVALID_OUTPUT  the reply failed JSON / JSON-schema validation
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from llmmixer.core.contracts import ErrorType, LlmCall, ToolCall, Usage

__all__ = [
    "NO_KEY_PLACEHOLDER",
    "RETRYABLE_ERROR_TYPES",
    "ProviderAdapter",
    "ProviderConfig",
    "ProviderError",
    "ProviderResult",
    "TextCallback",
    "keyless_headers",
    "parsed_tool_call",
]

TextCallback = Callable[[str], None]

# What a keyless endpoint is sent where an SDK insists on some key: explicit,
# so the SDK never reads the worker's own key from the environment instead.
NO_KEY_PLACEHOLDER = "not-needed"

# Failures that another attempt may fix. CIRCUIT_OPEN is included because the
# breaker closes again after its cool-down (``retry_after_s`` says when), and
# INVALID_OUTPUT because a model often gets the format right the next time,
# TRUNCATED because a sampled reply is often shorter the next time (the
# activity makes it final once continuing has not helped).
RETRYABLE_ERROR_TYPES: frozenset[str] = frozenset(
    {ErrorType.RETRYABLE, ErrorType.CIRCUIT_OPEN, ErrorType.INVALID_OUTPUT, ErrorType.TRUNCATED}
)


def keyless_headers(variable: str, omit: object) -> dict[str, Any]:
    """``default_headers`` for a keyless client that cancel what the SDK adds on its own.

    The openai and anthropic SDKs add every ``Name: value`` line of
    ``OPENAI_CUSTOM_HEADERS`` / ``ANTHROPIC_CUSTOM_HEADERS`` from the process
    environment to each request, ahead of their own key header; an operator's
    gateway credential there must not reach a step's own endpoint either.
    Each such header is dropped (``omit``, the SDK's own marker), and an
    ``Authorization`` one carries the placeholder instead.
    """
    headers: dict[str, Any] = {}
    for line in os.environ.get(variable, "").split("\n"):
        name = line.split(":", 1)[0].strip() if ":" in line else ""
        if name:
            headers[name] = (
                f"Bearer {NO_KEY_PLACEHOLDER}" if name.lower() == "authorization" else omit
            )
    return headers


def parsed_tool_call(call_id: str, name: str, arguments: str) -> ToolCall:
    """A tool call whose arguments came as a JSON string (OpenAI's APIs).

    Models do write broken JSON at times; that is the model's mistake, not a
    failed call, so it becomes the call's ``error`` (sent back to the model
    as the tool's result) instead of failing the whole turn.
    """
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as exc:
        return ToolCall(
            id=call_id,
            name=name,
            error=f"the arguments of tool {name!r} are not valid JSON ({exc.msg} at "
            f"character {exc.pos}): send them again as one JSON object",
        )
    if not isinstance(value, dict):
        return ToolCall(
            id=call_id,
            name=name,
            error=f"the arguments of tool {name!r} are a JSON {type(value).__name__}, "
            "not an object: send them again as one JSON object",
        )
    return ToolCall(id=call_id, name=name, arguments=value)


@dataclass(frozen=True)
class ProviderConfig:
    """Everything that decides which SDK client a call needs.

    A worker keeps one client per distinct config (see ``ProviderPool``), so two
    endpoints or two keys never share a connection pool. The key is excluded
    from ``repr`` so a config can be logged safely; it still takes part in
    equality and hashing, which is what keeps clients with different keys apart.

    ``timeout_s`` is the SDK's network timeout: connect, and each read, so on
    a stream it bounds the silence between two chunks, not the whole reply
    (the activity's start-to-close timeout bounds that).

    ``keyless`` marks a step's own endpoint that the operator allowed
    (``LLMMIXER_ALLOWED_BASE_URLS``): the adapter sends no key there, only
    a placeholder where the SDK insists on one, and never lets the SDK look
    for a key in the process environment.
    """

    provider: str
    api_key: str | None = field(default=None, repr=False)
    base_url: str | None = None
    timeout_s: float = 600.0
    keyless: bool = False


@dataclass
class ProviderResult:
    """A complete, terminated reply (never a cut stream).

    ``truncated``: the model stopped at the token limit (``finish_reason``
    is the provider's own word for it); the activity decides what that
    becomes (``LlmCall.on_truncation``). A truncated result has not been
    checked against ``response_format`` yet: only the joined reply is.
    """

    text: str
    response_model: str | None
    usage: Usage
    finish_reason: str | None
    truncated: bool = False
    #: How many times the activity asked the model to go on (0 from an adapter).
    continuations: int = 0
    #: The tools the model asked to call, in its order (empty: a final answer).
    tool_calls: list[ToolCall] = field(default_factory=list)


class ProviderError(Exception):
    """A provider failure, already classified and scrubbed of secrets.

    ``message`` is safe to record anywhere (history, logs, the event stream): the
    mapping functions in ``errors.py`` redact keys before building it, and every
    message says what the operator can do about it.
    """

    def __init__(
        self,
        error_type: str,
        message: str,
        *,
        status_code: int | None = None,
        retry_after_s: float | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.status_code = status_code
        self.retry_after_s = retry_after_s
        #: For a refusal, the provider's own reason (finish or block reason).
        self.reason = reason

    @property
    def retryable(self) -> bool:
        """Whether a later attempt of the same call may succeed."""
        return self.error_type in RETRYABLE_ERROR_TYPES

    def __repr__(self) -> str:
        return (
            f"ProviderError({self.error_type!r}, {self.message!r}, "
            f"status_code={self.status_code!r}, retry_after_s={self.retry_after_s!r})"
        )


@runtime_checkable
class ProviderAdapter(Protocol):
    """One provider behind one method.

    ``complete`` streams the call; ``on_text`` receives every text delta in
    order as it arrives (the activity heartbeats and forwards deltas through
    it, so it must be cheap and must not block). The returned text is the
    concatenation of the deltas. ``aclose`` releases the SDK client.
    """

    provider: str

    async def complete(self, call: LlmCall, on_text: TextCallback) -> ProviderResult: ...

    async def aclose(self) -> None: ...
