"""GenAI spans and metrics for provider calls and commands, on the OpenTelemetry API.

Spans and instruments come from the *global* OpenTelemetry providers, looked
up at each call. A worker
installs real ones only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (see
``runtime/telemetry.py``), or an embedding application installs its own;
otherwise the API's no-op tracer and meter make every call here a handful of
attribute look-ups, with nothing recorded or exported.

What is recorded (OpenTelemetry GenAI semantic conventions where they exist)::

    span "chat {model}" (CLIENT), one per provider call (one activity attempt)
        gen_ai.operation.name, gen_ai.provider.name, gen_ai.request.model,
        gen_ai.request.max_tokens, gen_ai.request.temperature, gen_ai.request.top_p,
        gen_ai.response.model, gen_ai.response.finish_reasons,
        gen_ai.usage.input_tokens, gen_ai.usage.output_tokens, error.type,
        llmmixer.workflow_id, llmmixer.step_id, llmmixer.attempt, llmmixer.cost_usd
        gen_ai.system_instructions / gen_ai.input.messages / gen_ai.output.messages
            only when LLMMIXER_OTEL_CAPTURE_CONTENT=1 (prompts can be confidential)
    span "command {executable}" (INTERNAL), one per PTY command
        process.executable.name, process.exit.code, llmmixer.pty.mode, error.type
    histogram gen_ai.client.operation.duration (s)      per call, with error.type on failure
    histogram gen_ai.client.token.usage ({token})       gen_ai.token.type = input | output
    counter   llmmixer.step.executions                  kind, outcome = success | error | cancelled
    counter   llmmixer.cost (USD)                       by provider and model (unknown price: 0)
    counter   llmmixer.circuit_breaker.transitions      provider, model, from, to

Secrets: exception messages are never recorded as they are. A span's status
carries the ``ProviderError`` message, which the provider error mapping has
already redacted, and goes through :func:`redact` again with the worker's
keys; automatic exception recording is off because a traceback would include
the SDK's original exception (whose message may echo the key).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util.types import AttributeValue

from llmmixer.activities.providers.base import ProviderError, ProviderResult
from llmmixer.activities.providers.breaker import BreakerState
from llmmixer.core.contracts import CommandCall, LlmCall, Usage
from llmmixer.core.providers import PROVIDER_SPECS
from llmmixer.core.redaction import redact
from llmmixer.runtime.settings import TelemetryEnv

__all__ = [
    "CAPTURE_CONTENT_VARIABLES",
    "breaker_state_changed",
    "capture_content",
    "observe_command",
    "observe_llm_call",
]

T = TypeVar("T")

# Either variable turns on prompt/completion capture; the second is the one
# OpenTelemetry's own GenAI instrumentations read.
CAPTURE_CONTENT_VARIABLES = (
    "LLMMIXER_OTEL_CAPTURE_CONTENT",
    "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
)
_TRUE = frozenset({"1", "true", "yes", "on"})

# gen_ai.provider.name well-known values for llmmixer's provider names.
_PROVIDER_NAMES: Mapping[str, str] = MappingProxyType(
    {spec.name: spec.otel_name for spec in PROVIDER_SPECS}
)

_SCOPE = "llmmixer"

# Bucket advice from the GenAI semantic conventions.
_DURATION_BUCKETS = [
    *(0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
]
_TOKEN_BUCKETS = [4**power for power in range(14)]


class _Instruments:
    def __init__(self, meter: metrics.Meter) -> None:
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="Duration of GenAI operations (one provider call)",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Tokens used per provider call, by gen_ai.token.type",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
        )
        self.executions = meter.create_counter(
            "llmmixer.step.executions",
            unit="{execution}",
            description="Step executions (activity attempts) by kind and outcome",
        )
        self.cost = meter.create_counter(
            "llmmixer.cost",
            unit="USD",
            description="Provider cost from the price table, by provider and model",
        )
        self.breaker_transitions = meter.create_counter(
            "llmmixer.circuit_breaker.transitions",
            unit="{transition}",
            description="Circuit-breaker state changes on this worker",
        )


# Instruments per meter provider: looked up on every use rather than bound at
# import, so they follow whichever provider is installed now (a worker sets
# it up after importing this module; tests swap in an in-memory one).
_instruments_by_provider: dict[int, tuple[metrics.MeterProvider, _Instruments]] = {}


def _instruments() -> _Instruments:
    provider = metrics.get_meter_provider()
    cached = _instruments_by_provider.get(id(provider))
    if cached is None or cached[0] is not provider:
        cached = (provider, _Instruments(provider.get_meter(_SCOPE)))
        _instruments_by_provider[id(provider)] = cached
    return cached[1]


def _tracer() -> trace.Tracer:
    return trace.get_tracer(_SCOPE)


def capture_content(environ: Mapping[str, str] | None = None) -> bool:
    """Whether prompts and completions may be put on spans."""
    env = os.environ if environ is None else environ
    # OpenTelemetry's own switch is read the way its instrumentations read it;
    # ours comes from the settings tree (checked when the worker starts).
    otel = env.get(CAPTURE_CONTENT_VARIABLES[1], "").strip().lower() in _TRUE
    return otel or TelemetryEnv.from_env(env).capture_content


async def observe_llm_call(
    call: LlmCall,
    run: Callable[[], Awaitable[ProviderResult]],
    *,
    cost: Callable[[Usage], float | None],
    secrets: Iterable[str] = (),
    attempt: int = 1,
    with_content: bool | None = None,
) -> ProviderResult:
    """Run one provider call (``run``) inside a GenAI client span, and record its metrics.

    ``with_content``: whether prompts and completions go on the span; None
    reads :func:`capture_content` now. A worker reads it once and passes it:
    parsing the settings from the environment cost every call more than the
    span itself.
    """
    secrets = tuple(secrets)
    provider = _PROVIDER_NAMES.get(call.provider, call.provider)
    metric_attrs: dict[str, AttributeValue] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": call.model,
    }
    span_attrs: dict[str, AttributeValue] = {
        **metric_attrs,
        "gen_ai.output.type": "json" if call.response_format == "json" else "text",
        "llmmixer.workflow_id": call.workflow_id,
        "llmmixer.step_id": call.step_id,
        "llmmixer.attempt": attempt,
    }
    for name, value in (
        ("gen_ai.request.max_tokens", call.max_tokens),
        ("gen_ai.request.temperature", call.temperature),
        ("gen_ai.request.top_p", call.top_p),
    ):
        if value is not None:
            span_attrs[name] = value
    if call.stop:
        span_attrs["gen_ai.request.stop_sequences"] = list(call.stop)
    if with_content is None:
        with_content = capture_content()
    if with_content:
        span_attrs.update(_input_content(call, secrets))

    instruments = _instruments()
    started = time.monotonic()
    with _tracer().start_as_current_span(
        f"chat {call.model}",
        kind=SpanKind.CLIENT,
        attributes=span_attrs,
        # Off on purpose: see the module docstring (tracebacks can carry keys).
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            result = await run()
        except ProviderError as error:
            error_type = error.error_type
            span.set_attribute("error.type", error_type)
            if error.status_code is not None:
                span.set_attribute("http.response.status_code", error.status_code)
            span.set_status(StatusCode.ERROR, redact(error.message, secrets))
            elapsed = time.monotonic() - started
            instruments.duration.record(elapsed, {**metric_attrs, "error.type": error_type})
            instruments.executions.add(1, _execution_attrs("llm", "error", call, error_type))
            raise
        except BaseException as error:
            # Cancellation (workflow cancelled, heartbeat timeout) or a bug: only
            # the class name is recorded, never the message.
            error_type = type(error).__qualname__
            outcome = "cancelled" if _is_cancellation(error) else "error"
            span.set_attribute("error.type", error_type)
            span.set_status(StatusCode.ERROR, error_type)
            elapsed = time.monotonic() - started
            instruments.duration.record(elapsed, {**metric_attrs, "error.type": error_type})
            instruments.executions.add(1, _execution_attrs("llm", outcome, call, error_type))
            raise

        response_model = result.response_model or call.model
        usage = result.usage
        price = cost(usage)
        span.set_attribute("gen_ai.response.model", response_model)
        span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
        if result.finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [result.finish_reason])
        if price is not None:
            span.set_attribute("llmmixer.cost_usd", price)
        if with_content:
            span.set_attribute(
                "gen_ai.output.messages",
                _messages_json(
                    [("assistant", result.text)], secrets, finish_reason=result.finish_reason
                ),
            )

    done_attrs = {**metric_attrs, "gen_ai.response.model": response_model}
    instruments.duration.record(time.monotonic() - started, done_attrs)
    instruments.tokens.record(usage.input_tokens, {**done_attrs, "gen_ai.token.type": "input"})
    instruments.tokens.record(usage.output_tokens, {**done_attrs, "gen_ai.token.type": "output"})
    if price:
        model_attrs = {"gen_ai.provider.name": provider, "gen_ai.request.model": call.model}
        instruments.cost.add(price, model_attrs)
    instruments.executions.add(1, _execution_attrs("llm", "success", call, None))
    return result


async def observe_command(
    call: CommandCall,
    executable: str,
    run: Callable[[], Awaitable[T]],
) -> T:
    """Run one command (``run`` returns a ``RunOutcome``) inside a span."""
    name = os.path.basename(executable) or executable
    attrs: dict[str, AttributeValue] = {
        "process.executable.name": name,
        "process.executable.path": executable,
        "llmmixer.workflow_id": call.workflow_id,
        "llmmixer.step_id": call.step_id,
    }
    if capture_content():
        # Arguments can carry prompts (agent steps); same switch as LLM content.
        attrs["process.command_args"] = list(call.argv)
    instruments = _instruments()
    with _tracer().start_as_current_span(
        f"command {name}",
        attributes=attrs,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            outcome = await run()
        except BaseException as error:
            raised = type(error).__qualname__
            span.set_attribute("error.type", raised)
            span.set_status(StatusCode.ERROR, raised)
            kind = "cancelled" if _is_cancellation(error) else "error"
            instruments.executions.add(1, {"llmmixer.step.kind": "pty", "llmmixer.outcome": kind})
            raise
        exit_code: int | None = getattr(outcome, "exit_code", None)
        mode = getattr(outcome, "mode", None)
        if exit_code is not None:
            span.set_attribute("process.exit.code", exit_code)
        if mode is not None:
            span.set_attribute("llmmixer.pty.mode", str(mode))
        error_type: str | None = None
        if getattr(outcome, "timed_out", False):
            error_type = "CommandTimeout"
        elif exit_code not in call.success_codes:
            error_type = "CommandFailed"
        if error_type is not None:
            span.set_attribute("error.type", error_type)
            span.set_status(StatusCode.ERROR, f"{error_type} (exit code {exit_code})")
    instruments.executions.add(
        1,
        {
            "llmmixer.step.kind": "pty",
            "llmmixer.outcome": "error" if error_type else "success",
            **({"error.type": error_type} if error_type else {}),
        },
    )
    return outcome


def breaker_state_changed(provider: str, model: str, old: BreakerState, new: BreakerState) -> None:
    """``BreakerBoard(on_change=...)`` hook: count every state change."""
    _instruments().breaker_transitions.add(
        1,
        {
            "gen_ai.provider.name": _PROVIDER_NAMES.get(provider, provider),
            "gen_ai.request.model": model,
            "llmmixer.breaker.from": str(old),
            "llmmixer.breaker.to": str(new),
        },
    )


# ---- helpers ---------------------------------------------------------------------


def _execution_attrs(
    kind: str, outcome: str, call: LlmCall, error_type: str | None
) -> dict[str, AttributeValue]:
    attrs: dict[str, AttributeValue] = {
        "llmmixer.step.kind": kind,
        "llmmixer.outcome": outcome,
        "gen_ai.provider.name": _PROVIDER_NAMES.get(call.provider, call.provider),
        "gen_ai.request.model": call.model,
    }
    if error_type:
        attrs["error.type"] = error_type
    return attrs


def _is_cancellation(error: BaseException) -> bool:
    return isinstance(error, asyncio.CancelledError)


def _input_content(call: LlmCall, secrets: tuple[str, ...]) -> dict[str, AttributeValue]:
    attrs: dict[str, AttributeValue] = {
        "gen_ai.input.messages": _messages_json(
            [(message.role, message.content) for message in call.messages], secrets
        )
    }
    if call.system:
        attrs["gen_ai.system_instructions"] = json.dumps(
            [{"type": "text", "content": redact(call.system, secrets)}]
        )
    return attrs


def _messages_json(
    messages: list[tuple[str, str]],
    secrets: tuple[str, ...],
    *,
    finish_reason: str | None = None,
) -> str:
    # The conventions' JSON shape: role + parts; a prompt pasted with a key in
    # it is still redacted.
    out: list[dict[str, Any]] = []
    for role, content in messages:
        message: dict[str, Any] = {
            "role": role,
            "parts": [{"type": "text", "content": redact(content, secrets)}],
        }
        if finish_reason is not None:
            message["finish_reason"] = finish_reason
        out.append(message)
    return json.dumps(out, ensure_ascii=False)
