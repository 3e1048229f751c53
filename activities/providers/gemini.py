"""Google Gemini through ``google-genai``'s async streaming call.

Retries: without ``HttpOptions.retry_options`` the SDK still makes a hidden
second try after a connection error on its aiohttp transport (used whenever
aiohttp is installed), and with default options it retries five times. An
explicit ``HttpRetryOptions(attempts=1)`` turns both off, so each request is
sent once and every attempt is a Temporal attempt.

``provider_options`` may carry ``safety_settings`` (a list of
``{"category": ..., "threshold": ...}``) and ``generation_config`` (the
``GenerateContentConfig`` fields that shape generation, e.g. ``top_k`` or
``thinking_config``; ``options.GeminiGenerationConfig`` lists them). Never
``http_options``: on a request it replaces the base URL and headers while the
client still adds the worker's key. A stream counts as complete only once a
candidate carried a ``finish_reason``; ``MAX_TOKENS`` marks it truncated.

Caching: Gemini caches a repeated prefix on its own (implicit caching) and
reports the cached part as ``cachedContentTokenCount``; the system
instruction and the messages are sent in order, so siblings that put their
shared context first hit it. Implicit hits are not guaranteed, so with
``cache: auto`` a context that several calls on this worker share (the
system instruction, earlier turns and the shared prefix of the last message,
``stable_prefix``) is also cached explicitly: the second call that sends it
creates a cache (``caches.create``, kept ``EXPLICIT_CACHE_TTL_S``) and it and
the later ones send only their own question with ``cached_content``. A
context under the minimum size, a model without explicit caching or any
failure to create one leaves those calls on implicit caching. Calls with
tools are not cached explicitly (the cache would have to hold the tools).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import pydantic
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from llmmixer.activities.providers.base import (
    NO_KEY_PLACEHOLDER,
    ProviderConfig,
    ProviderError,
    ProviderResult,
    TextCallback,
)
from llmmixer.activities.providers.errors import (
    cut_stream_error,
    map_gemini_error,
    missing_key_error,
    redact,
    refusal_error,
)
from llmmixer.activities.providers.options import OptionsCheck
from llmmixer.activities.providers.structured import (
    MIN_CACHED_PREFIX_CHARS,
    enforce_response_format,
    stable_prefix,
)
from llmmixer.core.contracts import ChatMessage, ErrorType, LlmCall, ToolCall, Usage
from llmmixer.core.provider_options import GeminiOptions, model_name_issue
from llmmixer.core.providers import provider_spec

__all__ = ["EXPLICIT_CACHE_TTL_S", "GeminiAdapter"]

log = logging.getLogger(__name__)

#: How long an explicit cache lives; siblings of one fan-out come within it.
EXPLICIT_CACHE_TTL_S = 300
# A cache this close to expiring is not handed to a call any more.
_CACHE_MARGIN_S = 30.0


@dataclass
class _Explicit:
    """One shared context's explicit cache on this worker (``name`` None: refused)."""

    name: str | None
    expires: float  # time.monotonic()


@dataclass(frozen=True)
class _Shared:
    """A call split into the context siblings share and what is its own."""

    key: str
    system: str | None
    context: list[types.Content]
    own: list[types.Content]


# Finish reasons meaning the model (or its filters) declined: a retry of the
# same prompt will not help, so they are rejections, not truncated successes.
_REFUSALS = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
)


def _enum_text(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value))


# The Gemini API takes a request of up to 20 MB; files are inline (base64,
# a third larger) while they fit well under it, and go through the Files API
# beyond.
INLINE_LIMIT_BYTES = 14 * 1024 * 1024


class GeminiAdapter:
    """Streams calls to the Gemini API (``generateContent`` with ``alt=sse``).

    ``inline_limit``: the most bytes of files a request carries inline; the
    files past it are uploaded through the Files API and sent by their URI.
    """

    provider = "gemini"

    def __init__(
        self,
        config: ProviderConfig,
        *,
        secrets: Iterable[str] = (),
        inline_limit: int = INLINE_LIMIT_BYTES,
    ) -> None:
        self._inline_limit = inline_limit
        if config.keyless:
            # A step's own endpoint: never the worker's key. The explicit
            # placeholder also stops the SDK from reading GEMINI_API_KEY or
            # GOOGLE_API_KEY from the environment on its own.
            api_key = NO_KEY_PLACEHOLDER
        elif config.api_key:
            api_key = config.api_key
        else:
            raise missing_key_error("gemini")
        self._config = config
        self._options = OptionsCheck()
        self._secrets: tuple[str, ...] = tuple(s for s in (config.api_key, *secrets) if s)
        self._client = genai.Client(
            api_key=api_key,
            vertexai=False,
            http_options=types.HttpOptions(
                base_url=config.base_url or provider_spec(self.provider).default_base_url,
                timeout=max(1, int(config.timeout_s * 1000)),  # milliseconds
                retry_options=types.HttpRetryOptions(attempts=1),
            ),
        )

        # Explicit caches by shared context; per adapter, so per worker and key.
        self._explicit: dict[str, _Explicit] = {}
        self._seen: dict[str, float] = {}
        self._creating: dict[str, asyncio.Lock] = {}

    async def aclose(self) -> None:
        await self._client.aio.aclose()

    async def _cached(
        self, call: LlmCall, config: types.GenerateContentConfig
    ) -> tuple[list[types.Content], types.GenerateContentConfig]:
        """The contents and config to send: the call's own part against a cache, if any."""
        contents = _contents(call, await self._uploaded(call))
        shared = _shared_context(call)
        if shared is None:
            return contents, config
        name = await self._explicit_cache(call.model, shared)
        if name is None:
            return contents, config
        # The system instruction is part of the cache; the request may not repeat it.
        update = {"cached_content": name, "system_instruction": None}
        return shared.own, config.model_copy(update=update)

    async def _open(
        self, model: str, contents: list[types.Content], config: types.GenerateContentConfig
    ) -> AsyncIterator[types.GenerateContentResponse]:
        """The stream, its first chunk already read: the SDK sends the request on that read."""
        stream = await self._client.aio.models.generate_content_stream(
            model=model, contents=contents, config=config
        )
        iterator = aiter(stream)
        try:
            first = await anext(iterator)
        except StopAsyncIteration:
            return _chunks(None, iterator)
        return _chunks(first, iterator)

    def _forget(self, name: str) -> None:
        for key in [k for k, e in self._explicit.items() if e.name == name]:
            del self._explicit[key]

    async def _explicit_cache(self, model: str, shared: _Shared) -> str | None:
        now = time.monotonic()
        for key in [k for k, e in self._explicit.items() if e.expires <= now]:
            del self._explicit[key]
        for key in [k for k, at in self._seen.items() if at + EXPLICIT_CACHE_TTL_S <= now]:
            del self._seen[key]
        if shared.key not in self._seen and shared.key not in self._explicit:
            # The first call with this context: one call alone does not pay
            # for a cache; implicit caching may still serve its siblings.
            self._seen[shared.key] = now
            return None
        lock = self._creating.setdefault(shared.key, asyncio.Lock())
        async with lock:  # siblings wait for one creation instead of making their own
            found = self._explicit.get(shared.key)
            if found is not None and found.expires - _CACHE_MARGIN_S > time.monotonic():
                return found.name
            try:
                cache = await self._client.aio.caches.create(
                    model=model,
                    config=types.CreateCachedContentConfig(
                        contents=shared.context,
                        system_instruction=shared.system,
                        ttl=f"{EXPLICIT_CACHE_TTL_S}s",
                    ),
                )
                name = cache.name
            except Exception as exc:
                # Too small for this model, a model without explicit caching,
                # or a passing failure: the call goes on with implicit caching.
                log.info("gemini: no explicit cache for %s (%s)", model, type(exc).__name__)
                name = None
            self._explicit[shared.key] = _Explicit(name, time.monotonic() + EXPLICIT_CACHE_TTL_S)
        self._creating.pop(shared.key, None)
        return name

    async def complete(self, call: LlmCall, on_text: TextCallback) -> ProviderResult:
        problem = model_name_issue("gemini", call.model)
        if problem is not None:
            # The model name is part of the URL; the key must not follow another path.
            raise ProviderError(ErrorType.REJECTED, problem)
        config = self._generation_config(call)
        try:
            result = await self._stream(call, config, on_text)
        except ProviderError:
            raise
        except Exception as exc:
            raise map_gemini_error(exc, self._secrets, timeout_s=self._config.timeout_s) from exc
        return result if result.truncated else enforce_response_format(call, result)

    def _generation_config(self, call: LlmCall) -> types.GenerateContentConfig:
        options = self._options.parsed("gemini", GeminiOptions, call.provider_options)
        # Built from the checked model only: no key of the raw mapping reaches the SDK.
        fields: dict[str, Any] = (
            options.generation_config.body() if options.generation_config is not None else {}
        )
        if call.system:
            fields["system_instruction"] = call.system
        if call.max_tokens is not None:
            fields["max_output_tokens"] = call.max_tokens
        if call.temperature is not None:
            fields["temperature"] = call.temperature
        if call.top_p is not None:
            fields["top_p"] = call.top_p
        if call.stop:
            fields["stop_sequences"] = list(call.stop)
        if call.response_format == "json":
            fields["response_mime_type"] = "application/json"
            if call.json_schema is not None:
                # Plain JSON Schema, as the step gives it (``response_schema``
                # wants Google's OpenAPI subset instead).
                fields["response_json_schema"] = call.json_schema
        if call.tools:
            fields["tools"] = [
                types.Tool(
                    function_declarations=[
                        types.FunctionDeclaration(
                            name=t.name,
                            description=t.description,
                            # Plain JSON Schema, as for response_json_schema.
                            parameters_json_schema=t.parameters,
                        )
                        for t in call.tools
                    ]
                )
            ]
            # Calls come back to the workflow; the SDK must never run one itself.
            fields["automatic_function_calling"] = types.AutomaticFunctionCallingConfig(
                disable=True
            )
        if options.safety_settings is not None:
            fields["safety_settings"] = [setting.body() for setting in options.safety_settings]
        try:
            return types.GenerateContentConfig(**fields)
        except pydantic.ValidationError as exc:
            detail = redact(str(exc), self._secrets)
            raise ProviderError(
                ErrorType.REJECTED,
                f"invalid gemini generation settings from the step or provider_options: {detail}",
            ) from None

    async def _stream(
        self, call: LlmCall, config: types.GenerateContentConfig, on_text: TextCallback
    ) -> ProviderResult:
        contents, sent = await self._cached(call, config)
        parts: list[str] = []
        finish_reason: str | None = None
        response_model: str | None = None
        usage = Usage()
        tool_calls: list[ToolCall] = []
        turn = sum(1 for m in call.messages if m.role == "assistant")
        try:
            stream = await self._open(call.model, contents, sent)
        except genai_errors.ClientError as exc:
            if sent.cached_content is None or exc.code not in (400, 403, 404):
                raise
            # The cache went before its time (deleted, or the clocks differ):
            # the call is sent whole, as it would have been without one.
            self._forget(sent.cached_content)
            stream = await self._open(call.model, _contents(call), config)
        async for chunk in stream:
            response_model = chunk.model_version or response_model
            feedback = chunk.prompt_feedback
            if feedback is not None and feedback.block_reason is not None:
                raise refusal_error(
                    "gemini",
                    call.model,
                    _enum_text(feedback.block_reason) or "blocked",
                    feedback.block_reason_message or "",
                )
            if chunk.usage_metadata is not None:
                meta = chunk.usage_metadata
                thoughts = meta.thoughts_token_count or 0
                usage = Usage(
                    input_tokens=meta.prompt_token_count or 0,
                    # Thinking tokens are billed as output tokens.
                    output_tokens=(meta.candidates_token_count or 0) + thoughts,
                    cache_read_tokens=meta.cached_content_token_count or 0,
                    reasoning_tokens=thoughts,
                )
            candidate = chunk.candidates[0] if chunk.candidates else None
            if candidate is None:
                continue
            if candidate.content is not None:
                for part in candidate.content.parts or []:
                    if part.text and not part.thought:
                        parts.append(part.text)
                        on_text(part.text)
                    if part.function_call is not None:
                        tool_calls.append(_tool_call(part, turn, len(tool_calls)))
            if candidate.finish_reason is not None:
                finish_reason = _enum_text(candidate.finish_reason)
        if finish_reason is None:
            raise cut_stream_error("gemini", call.model, "a finish_reason")
        if finish_reason in _REFUSALS:
            raise refusal_error("gemini", call.model, finish_reason)
        return ProviderResult(
            text="".join(parts),
            response_model=response_model,
            usage=usage,
            finish_reason=finish_reason,
            truncated=finish_reason == "MAX_TOKENS",
            tool_calls=tool_calls,
        )

    async def _uploaded(self, call: LlmCall) -> dict[str, str]:
        """sha256 -> Files API URI of each file past the inline limit (each uploaded once)."""
        uris: dict[str, str] = {}
        inline = 0
        for message in call.messages:
            for f in message.attachments:
                if f.sha256 in uris:
                    continue
                if inline + f.size <= self._inline_limit:
                    inline += f.size
                    continue
                uploaded = await self._client.aio.files.upload(
                    file=io.BytesIO(f.data),
                    config=types.UploadFileConfig(mime_type=f.media_type, display_name=f.name),
                )
                if not uploaded.uri:
                    raise ProviderError(
                        ErrorType.RETRYABLE, f"gemini: the Files API returned no URI for {f.name}"
                    )
                uris[f.sha256] = uploaded.uri
        return uris


# Ids for calls the API sent without one (the Gemini API matches a function
# response to its call by name and order); unique within a conversation.
_LOCAL_ID_PREFIX = "gemini-call-"


def _tool_call(part: types.Part, turn: int, index: int) -> ToolCall:
    fc = part.function_call
    assert fc is not None
    call = ToolCall(
        id=fc.id or f"{_LOCAL_ID_PREFIX}{turn}-{index}",
        name=fc.name or "",
        arguments=dict(fc.args or {}),
    )
    if part.thought_signature:
        # Thinking models want their signature back with the call next turn.
        call.signature = base64.b64encode(part.thought_signature).decode("ascii")
    return call


async def _chunks(
    first: types.GenerateContentResponse | None,
    rest: AsyncIterator[types.GenerateContentResponse],
) -> AsyncIterator[types.GenerateContentResponse]:
    if first is None:
        return
    yield first
    async for chunk in rest:
        yield chunk


def _shared_context(call: LlmCall) -> _Shared | None:
    """What a call shares with its siblings, when it is worth an explicit cache."""
    # Attached files are sent as they are: the explicit cache covers text only.
    if call.cache != "auto" or call.tools or not call.messages:
        return None
    if any(m.attachments for m in call.messages):
        return None
    *history, last = call.messages
    if last.role != "user" or any(m.role == "tool" or m.tool_calls for m in call.messages):
        return None
    prefix = stable_prefix(last.content)
    size = len(call.system or "") + sum(len(m.content) for m in history) + len(prefix)
    if size < MIN_CACHED_PREFIX_CHARS:
        return None
    context_messages = [*history, ChatMessage(role="user", content=prefix)] if prefix else history
    own = last.content[len(prefix) :]
    digest = hashlib.sha256(call.model.encode())
    for text in (call.system or "", *(f"{m.role}:{m.content}" for m in context_messages)):
        digest.update(b"\x00" + text.encode())
    return _Shared(
        key=digest.hexdigest(),
        system=call.system or None,
        context=_contents(call.model_copy(update={"messages": context_messages})),
        own=[types.Content(role="user", parts=[types.Part(text=own)])],
    )


def _contents(call: LlmCall, uploaded: dict[str, str] | None = None) -> list[types.Content]:
    """The conversation as Gemini contents; a tool loop's turns as function call/response parts.

    The responses to parallel calls go together in the one user content
    that follows the model's turn. Files come before a turn's text: inline
    data, or the URI of their upload (``uploaded``, by sha256).
    """
    uploaded = uploaded or {}
    contents: list[types.Content] = []
    for m in call.messages:
        if m.role == "tool":
            response = types.Part(
                function_response=types.FunctionResponse(
                    id=None
                    if (m.tool_call_id or "").startswith(_LOCAL_ID_PREFIX)
                    else m.tool_call_id,
                    name=m.tool_name or "",
                    response={"error": m.content} if m.is_error else {"output": m.content},
                )
            )
            last = contents[-1] if contents else None
            if (
                last is not None
                and last.role == "user"
                and last.parts
                and all(p.function_response is not None for p in last.parts)
            ):
                last.parts.append(response)
            else:
                contents.append(types.Content(role="user", parts=[response]))
            continue
        parts = [
            types.Part.from_uri(file_uri=uploaded[f.sha256], mime_type=f.media_type)
            if f.sha256 in uploaded
            else types.Part.from_bytes(data=f.data, mime_type=f.media_type)
            for f in m.attachments
        ]
        if m.content or not (m.tool_calls or m.attachments):
            parts.append(types.Part(text=m.content))
        for c in m.tool_calls:
            parts.append(
                types.Part(
                    function_call=types.FunctionCall(
                        id=None if c.id.startswith(_LOCAL_ID_PREFIX) else c.id,
                        name=c.name,
                        args=c.arguments,
                    ),
                    thought_signature=base64.b64decode(c.signature) if c.signature else None,
                )
            )
        contents.append(
            types.Content(role="model" if m.role == "assistant" else "user", parts=parts)
        )
    return contents
