"""OpenAI (and any OpenAI-compatible server) through the ``openai`` SDK.

Both the Chat Completions API (default) and the Responses API
(``call.api == "responses"``) are streamed. The SDK's own retries are off
(``max_retries=0``): every attempt is a Temporal attempt, visible in history.

A stream counts as complete only when its terminal event arrived: a
``finish_reason`` on Chat Completions, ``response.completed`` or
``response.incomplete`` on Responses. Anything else is a cut stream and is
retryable, never a truncated success. A reply that stopped at the token
limit (``length``, ``max_output_tokens``) is marked truncated; a content
filter stop or a structured-output ``refusal`` is a refusal.

Prompt caching is automatic on OpenAI's side for a prefix of 1,024 tokens or
more: the system prompt goes first and each message in order, so steps
sharing a context hit the cache when they put it first. With ``cache: auto``
the official endpoint is also sent a ``prompt_cache_key`` derived from that
shared prefix, which routes the siblings' requests to the same cache.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from typing import Any

from openai import AsyncOpenAI, DefaultAsyncHttpxClient, omit
from openai.types.chat import ChatCompletionMessageParam
from openai.types.responses import ResponseInputParam

from llmmixer.activities.providers.base import (
    NO_KEY_PLACEHOLDER,
    ProviderConfig,
    ProviderError,
    ProviderResult,
    TextCallback,
    keyless_headers,
    parsed_tool_call,
)
from llmmixer.activities.providers.errors import (
    cut_stream_error,
    map_openai_error,
    missing_key_error,
    refusal_error,
    stream_reported_error,
)
from llmmixer.activities.providers.options import OptionsCheck
from llmmixer.activities.providers.ratelimit import http_event_hooks
from llmmixer.activities.providers.structured import enforce_response_format, stable_prefix
from llmmixer.core.attachments import IMAGE_TYPES, TEXT_TYPE
from llmmixer.core.contracts import Attachment, ErrorType, LlmCall, ToolCall, Usage
from llmmixer.core.provider_options import OpenAIOptions
from llmmixer.core.providers import provider_spec

__all__ = ["OpenAIAdapter"]

# Why a reply ended at the token limit, per API.
_TRUNCATED = frozenset({"length", "max_output_tokens"})


def _usage(
    prompt: int | None, completion: int | None, cached: int | None, reasoning: int | None
) -> Usage:
    return Usage(
        input_tokens=prompt or 0,
        output_tokens=completion or 0,
        cache_read_tokens=cached or 0,
        reasoning_tokens=reasoning or 0,
    )


class OpenAIAdapter:
    """Streams calls to OpenAI's Chat Completions or Responses API.

    Every message and registry look-up goes by ``provider``, so a provider
    that speaks OpenAI's API at another endpoint is a subclass that sets only
    its own registry name.
    """

    provider = "openai"

    def __init__(self, config: ProviderConfig, *, secrets: Iterable[str] = ()) -> None:
        # Local OpenAI-compatible servers (Ollama, vLLM) ignore the key but the
        # SDK insists on one: a step's own endpoint, or a worker endpoint
        # configured without a key, gets the placeholder.
        key = None if config.keyless else config.api_key
        if not key:
            if not config.base_url:
                raise missing_key_error(self.provider)
            key = NO_KEY_PLACEHOLDER
        self._config = config
        self._options = OptionsCheck()
        self._secrets: tuple[str, ...] = tuple(s for s in (config.api_key, *secrets) if s)
        # The official endpoint knows ``max_completion_tokens`` (and o-series
        # models refuse ``max_tokens``); compatible servers mostly know only
        # ``max_tokens``.
        default_url = provider_spec(self.provider).default_base_url
        self._official = not config.base_url or config.base_url.rstrip("/") == default_url.rstrip(
            "/"
        )
        self._client = AsyncOpenAI(
            api_key=key,
            base_url=config.base_url or default_url,
            timeout=config.timeout_s,
            max_retries=0,
            # The responses' rate-limit headers pace this worker's next calls.
            http_client=DefaultAsyncHttpxClient(event_hooks=http_event_hooks()),
            default_headers=keyless_headers("OPENAI_CUSTOM_HEADERS", omit)
            if config.keyless
            else None,
        )

    async def aclose(self) -> None:
        await self._client.close()

    async def complete(self, call: LlmCall, on_text: TextCallback) -> ProviderResult:
        options = self._options.parsed(self.provider, OpenAIOptions, call.provider_options)
        try:
            if call.api == "responses":
                result = await self._responses(call, options, on_text)
            else:
                result = await self._chat(call, options, on_text)
        except ProviderError:
            raise
        except Exception as exc:
            raise map_openai_error(
                exc, self._secrets, timeout_s=self._config.timeout_s, provider=self.provider
            ) from exc
        return result if result.truncated else enforce_response_format(call, result)

    def _cache_key(self, call: LlmCall) -> str | Any:
        """A ``prompt_cache_key`` for siblings sharing a prefix (official endpoint only).

        Compatible servers may refuse a field they do not know, so they get none.
        """
        if call.cache != "auto" or not self._official or not call.messages:
            return omit
        shared = stable_prefix(call.messages[-1].content)
        history = "\x00".join(m.content for m in call.messages[:-1])
        if not (call.system or history or shared):
            return omit
        digest = hashlib.sha256(
            "\x00".join((call.model, call.system or "", history, shared)).encode()
        ).hexdigest()
        return f"llmmixer-{digest[:32]}"

    # --- Chat Completions --------------------------------------------------------------

    async def _chat(
        self, call: LlmCall, options: OpenAIOptions, on_text: TextCallback
    ) -> ProviderResult:
        messages: list[ChatCompletionMessageParam] = []
        if call.system:
            messages.append({"role": "system", "content": call.system})
        for m in call.messages:
            if m.role == "tool":
                messages.append(
                    {"role": "tool", "tool_call_id": m.tool_call_id or "", "content": m.content}
                )
            elif m.tool_calls:
                messages.append(
                    {
                        "role": "assistant",
                        "content": m.content or None,
                        "tool_calls": [
                            {
                                "id": c.id,
                                "type": "function",
                                "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
                            }
                            for c in m.tool_calls
                        ],
                    }
                )
            elif m.role == "assistant":
                messages.append({"role": "assistant", "content": m.content})
            elif m.attachments:
                content: list[Any] = [_chat_part(f) for f in m.attachments]
                if m.content:
                    content.append({"type": "text", "text": m.content})
                messages.append({"role": "user", "content": content})
            else:
                messages.append({"role": "user", "content": m.content})
        response_format: Any = omit
        if call.response_format == "json":
            if call.json_schema is not None:
                response_format = {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": call.json_schema},
                }
            else:
                response_format = {"type": "json_object"}
        limit = call.max_tokens if call.max_tokens is not None else omit
        stream = await self._client.chat.completions.create(
            model=call.model,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            max_completion_tokens=limit if self._official else omit,
            max_tokens=omit if self._official else limit,
            temperature=call.temperature if call.temperature is not None else omit,
            top_p=call.top_p if call.top_p is not None else omit,
            stop=list(call.stop) if call.stop else omit,
            response_format=response_format,
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters,
                    },
                }
                for t in call.tools
            ]
            or omit,
            prompt_cache_key=self._cache_key(call),
            # No options (most calls): no body to dump.
            extra_body=(options.body() or None) if call.provider_options else None,
        )
        parts: list[str] = []
        refusal: list[str] = []
        finish_reason: str | None = None
        usage = Usage()
        response_model: str | None = None
        # Streamed tool calls: the first delta of each (by index) has its id
        # and name, the following ones pieces of its arguments.
        calls: dict[int, list[str]] = {}
        async with stream:
            async for chunk in stream:
                response_model = chunk.model or response_model
                if chunk.usage is not None:
                    u = chunk.usage
                    usage = _usage(
                        u.prompt_tokens,
                        u.completion_tokens,
                        u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0,
                        u.completion_tokens_details.reasoning_tokens
                        if u.completion_tokens_details
                        else 0,
                    )
                for choice in chunk.choices:
                    if choice.index != 0:
                        continue
                    delta = choice.delta.content if choice.delta is not None else None
                    if delta:
                        parts.append(delta)
                        on_text(delta)
                    if choice.delta is not None and choice.delta.refusal:
                        refusal.append(choice.delta.refusal)
                    for piece in (choice.delta.tool_calls if choice.delta else None) or []:
                        entry = calls.setdefault(piece.index, ["", "", ""])
                        entry[0] = piece.id or entry[0]
                        if piece.function is not None:
                            entry[1] += piece.function.name or ""
                            entry[2] += piece.function.arguments or ""
                    if choice.finish_reason:
                        finish_reason = choice.finish_reason
        if finish_reason is None:
            raise cut_stream_error(self.provider, call.model, "a finish_reason")
        if finish_reason == "content_filter":
            raise refusal_error(self.provider, call.model, finish_reason)
        if refusal and not parts:
            raise refusal_error(self.provider, call.model, "refusal", "".join(refusal))
        return ProviderResult(
            text="".join(parts),
            response_model=response_model,
            usage=usage,
            finish_reason=finish_reason,
            truncated=finish_reason in _TRUNCATED,
            tool_calls=[parsed_tool_call(*calls[index]) for index in sorted(calls)],
        )

    # --- Responses ---------------------------------------------------------------------

    async def _responses(
        self, call: LlmCall, options: OpenAIOptions, on_text: TextCallback
    ) -> ProviderResult:
        if call.stop:
            raise ProviderError(
                ErrorType.REJECTED,
                "the OpenAI Responses API has no stop sequences: remove `stop` from the step "
                "or use `api: chat`",
            )
        items: ResponseInputParam = []
        for m in call.messages:
            if m.role == "tool":
                items.append(
                    {
                        "type": "function_call_output",
                        "call_id": m.tool_call_id or "",
                        "output": m.content,
                    }
                )
                continue
            if m.attachments and m.role == "user":
                content: list[Any] = [_responses_part(f) for f in m.attachments]
                if m.content:
                    content.append({"type": "input_text", "text": m.content})
                items.append({"role": "user", "content": content})
            elif m.content or not m.tool_calls:
                items.append(
                    {"role": "assistant" if m.role == "assistant" else "user", "content": m.content}
                )
            items.extend(
                {
                    "type": "function_call",
                    "call_id": c.id,
                    "name": c.name,
                    "arguments": json.dumps(c.arguments),
                }
                for c in m.tool_calls
            )
        text_config: Any = omit
        if call.response_format == "json":
            if call.json_schema is not None:
                text_config = {
                    "format": {"type": "json_schema", "name": "output", "schema": call.json_schema}
                }
            else:
                text_config = {"format": {"type": "json_object"}}
        stream = await self._client.responses.create(
            model=call.model,
            input=items,
            instructions=call.system if call.system else omit,
            stream=True,
            # Nothing is kept server-side: the workflow's history is the record.
            store=False,
            max_output_tokens=call.max_tokens if call.max_tokens is not None else omit,
            temperature=call.temperature if call.temperature is not None else omit,
            top_p=call.top_p if call.top_p is not None else omit,
            text=text_config,
            tools=[
                {
                    "type": "function",
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                    # Strict mode would demand every property be required.
                    "strict": False,
                }
                for t in call.tools
            ]
            or omit,
            prompt_cache_key=self._cache_key(call),
            extra_body=(options.body() or None) if call.provider_options else None,
        )
        parts: list[str] = []
        refusal: list[str] = []
        finish_reason: str | None = None
        usage = Usage()
        response_model: str | None = None
        tool_calls: list[ToolCall] = []
        async with stream:
            async for event in stream:
                if event.type == "response.output_text.delta":
                    if event.delta:
                        parts.append(event.delta)
                        on_text(event.delta)
                elif event.type == "response.refusal.delta":
                    refusal.append(event.delta)
                elif event.type == "response.output_item.done":
                    if event.item.type == "function_call":
                        item = event.item
                        tool_calls.append(parsed_tool_call(item.call_id, item.name, item.arguments))
                elif event.type in ("response.completed", "response.incomplete"):
                    response = event.response
                    response_model = response.model or response_model
                    if response.usage is not None:
                        u = response.usage
                        usage = _usage(
                            u.input_tokens,
                            u.output_tokens,
                            u.input_tokens_details.cached_tokens if u.input_tokens_details else 0,
                            u.output_tokens_details.reasoning_tokens
                            if u.output_tokens_details
                            else 0,
                        )
                    if event.type == "response.completed":
                        finish_reason = "stop"
                    else:
                        details = response.incomplete_details
                        finish_reason = (details.reason if details else None) or "incomplete"
                elif event.type == "response.failed":
                    err = event.response.error
                    detail = f"{err.code}: {err.message}" if err else "no details given"
                    raise stream_reported_error(self.provider, detail, self._secrets)
                elif event.type == "error":
                    raise stream_reported_error(
                        self.provider, f"{event.code}: {event.message}", self._secrets
                    )
        if finish_reason is None:
            raise cut_stream_error(self.provider, call.model, "response.completed")
        if finish_reason == "content_filter":
            raise refusal_error(self.provider, call.model, finish_reason)
        if refusal and not parts:
            raise refusal_error(self.provider, call.model, "refusal", "".join(refusal))
        return ProviderResult(
            text="".join(parts),
            response_model=response_model,
            usage=usage,
            finish_reason=finish_reason,
            truncated=finish_reason in _TRUNCATED,
            tool_calls=tool_calls,
        )


# --- files --------------------------------------------------------------------------


def _data_url(f: Attachment) -> str:
    return f"data:{f.media_type};base64,{base64.b64encode(f.data).decode('ascii')}"


def _as_text(f: Attachment) -> str:
    # Neither API has a text-file part: the file's text goes in, named.
    return f"File {f.name}:\n{f.data.decode()}"


def _chat_part(f: Attachment) -> Any:
    """A Chat Completions content part: ``image_url`` (a data URL) or ``file``."""
    if f.media_type in IMAGE_TYPES:
        return {"type": "image_url", "image_url": {"url": _data_url(f)}}
    if f.media_type == TEXT_TYPE:
        return {"type": "text", "text": _as_text(f)}
    return {"type": "file", "file": {"filename": f.name, "file_data": _data_url(f)}}


def _responses_part(f: Attachment) -> Any:
    """A Responses input part: ``input_image`` or ``input_file``."""
    if f.media_type in IMAGE_TYPES:
        return {"type": "input_image", "image_url": _data_url(f), "detail": "auto"}
    if f.media_type == TEXT_TYPE:
        return {"type": "input_text", "text": _as_text(f)}
    return {"type": "input_file", "filename": f.name, "file_data": _data_url(f)}
