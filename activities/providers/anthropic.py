"""Anthropic's Messages API through the ``anthropic`` SDK's streaming helper.

``system`` is its own parameter, ``max_tokens`` is required by the API (4096
when the step gives none). Usage comes from ``message_start`` (input) and the
cumulative ``message_delta`` (output), as the SDK accumulates them into its
message snapshot. The stream counts as complete only once ``message_stop``
arrived; otherwise it is a cut stream, retryable.

The Messages API has no generic JSON mode that works on every model, so for
``response_format: json`` the format (and schema) is stated in the system
prompt and the reply is validated afterwards. A step that wants Anthropic's
structured outputs can pass ``output_config`` through ``provider_options``
(``options.AnthropicOptions`` lists what they may set).

Prompt caching (``cache: auto``): ``cache_control`` breakpoints go on the
system prompt, on the earlier turns of a conversation, and on the long
shared part of the last message, which is everything before its last
paragraph break (``stable_prefix``). Sibling steps that share a context put
it first and their own question after it, so each reads the context from
the cache at a tenth of the input price. Anthropic ignores a breakpoint on a
prefix shorter than the model's minimum, so marking is free when it does
not pay.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

from anthropic import AsyncAnthropic, DefaultAsyncHttpxClient, omit
from anthropic.types import MessageParam, TextBlockParam

from llmmixer.activities.providers.base import (
    NO_KEY_PLACEHOLDER,
    ProviderConfig,
    ProviderError,
    ProviderResult,
    TextCallback,
    keyless_headers,
)
from llmmixer.activities.providers.errors import (
    cut_stream_error,
    map_anthropic_error,
    missing_key_error,
    refusal_error,
)
from llmmixer.activities.providers.options import OptionsCheck
from llmmixer.activities.providers.ratelimit import http_event_hooks
from llmmixer.activities.providers.structured import (
    MIN_CACHED_PREFIX_CHARS,
    enforce_response_format,
    json_instruction,
    stable_prefix,
)
from llmmixer.core.attachments import IMAGE_TYPES, TEXT_TYPE
from llmmixer.core.contracts import Attachment, ChatMessage, LlmCall, ToolCall, Usage
from llmmixer.core.provider_options import AnthropicOptions
from llmmixer.core.providers import provider_spec

__all__ = ["DEFAULT_MAX_TOKENS", "AnthropicAdapter"]

DEFAULT_MAX_TOKENS = 4096
# Stop reasons that mean the reply was cut off, not finished.
_TRUNCATED = frozenset({"max_tokens", "model_context_window_exceeded"})
_BREAKPOINT: Any = {"type": "ephemeral"}


class AnthropicAdapter:
    """Streams calls to Anthropic's Messages API."""

    provider = "anthropic"

    def __init__(self, config: ProviderConfig, *, secrets: Iterable[str] = ()) -> None:
        if config.keyless:
            # A step's own endpoint: never the worker's key. The explicit
            # placeholder also stops the SDK from finding one in the
            # environment or a credentials profile on its own.
            api_key = NO_KEY_PLACEHOLDER
        elif config.api_key:
            api_key = config.api_key
        else:
            raise missing_key_error("anthropic")
        self._config = config
        self._options = OptionsCheck()
        self._secrets: tuple[str, ...] = tuple(s for s in (config.api_key, *secrets) if s)
        self._client = AsyncAnthropic(
            api_key=api_key,
            base_url=config.base_url or provider_spec(self.provider).default_base_url,
            timeout=config.timeout_s,
            max_retries=0,
            # The responses' rate-limit headers pace this worker's next calls.
            http_client=DefaultAsyncHttpxClient(event_hooks=http_event_hooks()),
            default_headers=keyless_headers("ANTHROPIC_CUSTOM_HEADERS", omit)
            if config.keyless
            else None,
        )

    async def aclose(self) -> None:
        await self._client.close()

    async def complete(self, call: LlmCall, on_text: TextCallback) -> ProviderResult:
        options = self._options.parsed("anthropic", AnthropicOptions, call.provider_options)
        try:
            result = await self._stream(call, options, on_text)
        except ProviderError:
            raise
        except Exception as exc:
            raise map_anthropic_error(exc, self._secrets, timeout_s=self._config.timeout_s) from exc
        return result if result.truncated else enforce_response_format(call, result)

    async def _stream(
        self, call: LlmCall, options: AnthropicOptions, on_text: TextCallback
    ) -> ProviderResult:
        cached = call.cache == "auto"
        system = call.system or ""
        if call.response_format == "json":
            system = f"{system}\n\n{json_instruction(call.json_schema)}".strip()
        system_param: Any = system or omit
        if cached and len(system) >= MIN_CACHED_PREFIX_CHARS:
            system_param = [{"type": "text", "text": system, "cache_control": _BREAKPOINT}]
        # Characters before each message: a breakpoint pays only past the minimum.
        before = len(system)
        messages: list[MessageParam] = []
        last = len(call.messages) - 1
        for index, m in enumerate(call.messages):
            if m.tool_calls or m.role == "tool":
                _append_tool_turn(messages, m)
                before += len(m.content)
                continue
            role: Any = "assistant" if m.role == "assistant" else "user"
            content: Any = m.content
            if cached and index == last - 1 and before + len(m.content) >= MIN_CACHED_PREFIX_CHARS:
                # The end of the earlier turns: a conversation's history is cached.
                content = [{"type": "text", "text": m.content, "cache_control": _BREAKPOINT}]
            elif cached and index == last:
                content = _last_blocks(m.content)
            if m.attachments:
                content = _file_blocks(m.attachments) + _text_blocks(content)
            before += len(m.content)
            messages.append({"role": role, "content": content})
        # This SDK version no longer types temperature/top_p (newer models
        # reject them); older models still take them, so they go in the body
        # only when the step sets them.
        extra: dict[str, object] = {}
        if call.temperature is not None:
            extra["temperature"] = call.temperature
        if call.top_p is not None:
            extra["top_p"] = call.top_p
        extra.update(options.body())
        parts: list[str] = []
        stopped = False
        async with self._client.messages.stream(
            model=call.model,
            max_tokens=call.max_tokens if call.max_tokens is not None else DEFAULT_MAX_TOKENS,
            messages=messages,
            system=system_param,
            stop_sequences=list(call.stop) if call.stop else omit,
            tools=[
                {"name": t.name, "description": t.description, "input_schema": t.parameters}
                for t in call.tools
            ]
            or omit,
            extra_body=extra or None,
        ) as stream:
            async for event in stream:
                if event.type == "text":
                    if event.text:
                        parts.append(event.text)
                        on_text(event.text)
                elif event.type == "message_stop":
                    stopped = True
            if not stopped:
                raise cut_stream_error("anthropic", call.model, "message_stop")
            message = stream.current_message_snapshot
        stop_reason = message.stop_reason
        if stop_reason == "refusal":
            raise refusal_error("anthropic", call.model, stop_reason, "".join(parts))
        u = message.usage
        # Cached prompt tokens are reported apart from input_tokens; they are
        # still prompt tokens the step consumed, priced at their own rates.
        written = u.cache_creation_input_tokens or 0
        read = u.cache_read_input_tokens or 0
        tool_calls = [
            ToolCall(id=block.id, name=block.name, arguments=_arguments(block.input))
            for block in message.content
            if block.type == "tool_use"
        ]
        return ProviderResult(
            tool_calls=tool_calls,
            text="".join(parts),
            response_model=message.model or None,
            usage=Usage(
                input_tokens=u.input_tokens + written + read,
                output_tokens=u.output_tokens,
                cache_read_tokens=read,
                cache_write_tokens=written,
            ),
            finish_reason=stop_reason,
            truncated=stop_reason in _TRUNCATED,
        )


def _last_blocks(text: str) -> str | list[TextBlockParam]:
    """The last message, with a cache breakpoint after its shared prefix if it has one."""
    prefix = stable_prefix(text)
    if not prefix:
        return text
    return [
        {"type": "text", "text": prefix, "cache_control": _BREAKPOINT},
        {"type": "text", "text": text[len(prefix) :]},
    ]


def _file_blocks(files: list[Attachment]) -> list[Any]:
    """Image and document blocks, before the turn's text (Anthropic reads images best first)."""
    blocks: list[Any] = []
    for f in files:
        if f.media_type == TEXT_TYPE:
            source: Any = {"type": "text", "media_type": TEXT_TYPE, "data": f.data.decode()}
            blocks.append({"type": "document", "source": source, "title": f.name})
            continue
        encoded = base64.b64encode(f.data).decode("ascii")
        source = {"type": "base64", "media_type": f.media_type, "data": encoded}
        if f.media_type in IMAGE_TYPES:
            blocks.append({"type": "image", "source": source})
        else:
            blocks.append({"type": "document", "source": source, "title": f.name})
    return blocks


def _text_blocks(content: str | list[Any]) -> list[Any]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return list(content)


def _arguments(value: object) -> dict[str, Any]:
    # The SDK parses the streamed input JSON; an object is what the API promises.
    return dict(value) if isinstance(value, dict) else {"input": value}


def _append_tool_turn(messages: list[MessageParam], m: ChatMessage) -> None:
    """A tool loop's turn as content blocks: ``tool_use`` from the model, ``tool_result`` back.

    The results of parallel calls must all be in the one user message that
    follows the model's turn, so consecutive tool turns share a message.
    """
    if m.role == "tool":
        block: Any = {
            "type": "tool_result",
            "tool_use_id": m.tool_call_id or "",
            "content": m.content,
        }
        if m.is_error:
            block["is_error"] = True
        previous = messages[-1] if messages else None
        if (
            previous is not None
            and previous["role"] == "user"
            and isinstance(previous["content"], list)
            and all(
                isinstance(b, dict) and b.get("type") == "tool_result" for b in previous["content"]
            )
        ):
            previous["content"].append(block)
        else:
            messages.append({"role": "user", "content": [block]})
        return
    blocks: list[Any] = [{"type": "text", "text": m.content}] if m.content else []
    blocks += [
        {"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments} for c in m.tool_calls
    ]
    messages.append({"role": "assistant", "content": blocks})
