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
"""

from __future__ import annotations

from collections.abc import Iterable

from anthropic import AsyncAnthropic, omit
from anthropic.types import MessageParam

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
from llmmixer.activities.providers.options import checked_provider_options
from llmmixer.activities.providers.structured import enforce_response_format, json_instruction
from llmmixer.core.contracts import LlmCall, Usage
from llmmixer.core.provider_options import AnthropicOptions
from llmmixer.core.providers import provider_spec

__all__ = ["DEFAULT_MAX_TOKENS", "AnthropicAdapter"]

DEFAULT_MAX_TOKENS = 4096


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
        self._secrets: tuple[str, ...] = tuple(s for s in (config.api_key, *secrets) if s)
        self._client = AsyncAnthropic(
            api_key=api_key,
            base_url=config.base_url or provider_spec(self.provider).default_base_url,
            timeout=config.timeout_s,
            max_retries=0,
            default_headers=keyless_headers("ANTHROPIC_CUSTOM_HEADERS", omit)
            if config.keyless
            else None,
        )

    async def aclose(self) -> None:
        await self._client.close()

    async def complete(self, call: LlmCall, on_text: TextCallback) -> ProviderResult:
        options = checked_provider_options("anthropic", AnthropicOptions, call.provider_options)
        try:
            result = await self._stream(call, options, on_text)
        except ProviderError:
            raise
        except Exception as exc:
            raise map_anthropic_error(exc, self._secrets, timeout_s=self._config.timeout_s) from exc
        return enforce_response_format(call, result)

    async def _stream(
        self, call: LlmCall, options: AnthropicOptions, on_text: TextCallback
    ) -> ProviderResult:
        messages: list[MessageParam] = []
        for m in call.messages:
            if m.role == "assistant":
                messages.append({"role": "assistant", "content": m.content})
            else:
                messages.append({"role": "user", "content": m.content})
        # This SDK version no longer types temperature/top_p (newer models
        # reject them); older models still take them, so they go in the body
        # only when the step sets them.
        extra: dict[str, object] = {}
        if call.temperature is not None:
            extra["temperature"] = call.temperature
        if call.top_p is not None:
            extra["top_p"] = call.top_p
        extra.update(options.body())
        system = call.system or ""
        if call.response_format == "json":
            system = f"{system}\n\n{json_instruction(call.json_schema)}".strip()
        parts: list[str] = []
        stopped = False
        async with self._client.messages.stream(
            model=call.model,
            max_tokens=call.max_tokens if call.max_tokens is not None else DEFAULT_MAX_TOKENS,
            messages=messages,
            system=system if system else omit,
            stop_sequences=list(call.stop) if call.stop else omit,
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
            raise refusal_error("anthropic", call.model, stop_reason)
        u = message.usage
        # Cached prompt tokens are reported apart from input_tokens; they are
        # still prompt tokens the step consumed.
        input_tokens = (
            u.input_tokens + (u.cache_creation_input_tokens or 0) + (u.cache_read_input_tokens or 0)
        )
        return ProviderResult(
            text="".join(parts),
            response_model=message.model or None,
            usage=Usage(input_tokens=input_tokens, output_tokens=u.output_tokens),
            finish_reason=stop_reason,
        )
