"""OpenTelemetry for llmmixer processes (clients and workers), from standard variables.

Tracing and GenAI metrics (OpenTelemetry, exported over OTLP)::

    OTEL_EXPORTER_OTLP_ENDPOINT     turns it on (or the _TRACES_ / _METRICS_ variants);
                                    unset: nothing is installed, exported or measured
    OTEL_EXPORTER_OTLP_PROTOCOL     http/protobuf (default) | grpc (needs
                                    opentelemetry-exporter-otlp-proto-grpc installed)
    OTEL_EXPORTER_OTLP_HEADERS, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, ...
                                    read by the OpenTelemetry SDK itself
    OTEL_SDK_DISABLED=true          off even when an endpoint is set
    LLMMIXER_OTEL_CAPTURE_CONTENT=1 put prompts and completions on LLM spans (off by default)

Temporal's own worker metrics (``LLMMIXER_PROMETHEUS_PORT``) are the worker's
alone: ``workers/telemetry.py``.

One trace: the client call, the workflow and its activities are joined by
``temporalio.contrib.opentelemetry.TracingInterceptor``, which carries the
context in Temporal headers. :func:`client_interceptors` gives it to clients
made by ``Connection.connect``; a worker built on such a client inherits it,
and ``mixer_worker`` adds it to workers whose client lacks it. It is active
whenever a real tracer provider is installed, whether by :func:`setup_telemetry`
or by an application that embeds llmmixer and set up OpenTelemetry itself.

OpenTelemetry's providers are process-wide by design, so installing them is
too: :func:`setup_telemetry` does it at most once per process. Spans leave
through an exporter that removes the values of secret variables
(``*_API_KEY``, ``*_TOKEN``, ``LLMMIXER_PAYLOAD_KEY``, ...) from every attribute,
event and status, a last guard behind the redaction done where errors arise.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, trace
from temporalio.client import Interceptor as ClientInterceptor
from temporalio.contrib.opentelemetry import TracingInterceptor

from llmmixer.core.redaction import redact
from llmmixer.core.secrets import is_secret_name
from llmmixer.runtime.settings import SettingProblem, SettingsError, TelemetryEnv

__all__ = [
    "TelemetrySettings",
    "client_interceptors",
    "flush_telemetry",
    "prometheus_address",
    "scrubbing_span_exporter",
    "secret_values",
    "setup_telemetry",
    "tracing_active",
]

log = logging.getLogger("llmmixer.telemetry")

_ENDPOINT_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
)


def secret_values(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The values of every variable that names a credential, longest first."""
    env = os.environ if environ is None else environ
    # What a secret name is comes from core.secrets, like the rest of redaction;
    # short values are ignored (see ``redact``).
    values = {value for name, value in env.items() if is_secret_name(name) and value}
    return tuple(sorted((v for v in values if len(v) >= 8), key=len, reverse=True))


@dataclass(frozen=True, kw_only=True)
class TelemetrySettings:
    """What :func:`setup_telemetry` installs; see the module docstring for the variables."""

    traces: bool = False
    metrics: bool = False
    protocol: str = "http/protobuf"
    prometheus_address: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TelemetrySettings:
        env = os.environ if environ is None else environ
        disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        general = bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
        traces = general or bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        metric = general or bool(env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
        # OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER=none switch one signal off.
        traces = traces and env.get("OTEL_TRACES_EXPORTER", "otlp") != "none"
        metric = metric and env.get("OTEL_METRICS_EXPORTER", "otlp") != "none"
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        )
        if protocol not in ("http/protobuf", "grpc"):
            # OpenTelemetry's variable, refused the way llmmixer's own are.
            name = "OTEL_EXPORTER_OTLP_PROTOCOL"
            raise SettingsError(
                [
                    SettingProblem(
                        name,
                        f"{name}: {protocol!r} is not supported: use http/protobuf (the "
                        f"default) or grpc; for example {name}=grpc",
                    )
                ]
            )
        return cls(
            traces=traces and not disabled,
            metrics=metric and not disabled,
            protocol=protocol,
            prometheus_address=prometheus_address(env),
        )

    @property
    def enabled(self) -> bool:
        return self.traces or self.metrics


def prometheus_address(environ: Mapping[str, str] | None = None) -> str | None:
    """``host:port`` for Temporal's Prometheus endpoint, or None when it is off.

    The host is loopback unless ``LLMMIXER_PROMETHEUS_HOST`` says otherwise: the
    endpoint has no authentication, and a worker on a shared host or a pod
    network should not publish it to everyone who can reach the port.
    """
    settings = TelemetryEnv.from_env(environ)
    port, host = settings.prometheus_port, settings.prometheus_host
    if port is None:
        return None
    # An IPv6 literal needs brackets before the port (``[::1]:9464``).
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- installing OpenTelemetry ------------------------------------------------------

_install_lock = threading.Lock()
_installed: TelemetrySettings | None = None
_shutdown_hooks: list[Any] = []


def setup_telemetry(environ: Mapping[str, str] | None = None) -> TelemetrySettings:
    """Install OTLP tracing/metrics from the environment, at most once per process.

    Returns what is in force: the first call's settings, since OpenTelemetry's
    providers cannot be replaced. With no endpoint set this installs nothing:
    the OpenTelemetry API stays a no-op and llmmixer adds no interceptor.
    """
    global _installed
    with _install_lock:
        if _installed is not None:
            return _installed
        settings = TelemetrySettings.from_env(environ)
        if settings.enabled:
            _install(settings, environ)
        _installed = settings
        return settings


def _install(settings: TelemetrySettings, environ: Mapping[str, str] | None) -> None:
    # Imported here so that processes without telemetry never load the SDK.
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": _service_name(environ)})
    secrets = secret_values(environ)
    if settings.traces:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        tracer_provider = TracerProvider(resource=resource)
        exporter = scrubbing_span_exporter(_otlp_span_exporter(settings.protocol), secrets)
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(tracer_provider)
        _shutdown_hooks.append(tracer_provider)
    if settings.metrics:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        reader = PeriodicExportingMetricReader(_otlp_metric_exporter(settings.protocol))
        meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        metrics.set_meter_provider(meter_provider)
        _shutdown_hooks.append(meter_provider)
    log.info(
        "OpenTelemetry on: traces=%s metrics=%s protocol=%s",
        settings.traces,
        settings.metrics,
        settings.protocol,
    )


def _service_name(environ: Mapping[str, str] | None) -> str:
    env = os.environ if environ is None else environ
    return env.get("OTEL_SERVICE_NAME") or "llmmixer"


def _otlp_span_exporter(protocol: str) -> Any:
    # Both exporters read endpoint, headers, timeout and TLS from OTEL_* themselves.
    if protocol == "grpc":
        return _grpc_exporter("trace_exporter", "OTLPSpanExporter")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter()


def _otlp_metric_exporter(protocol: str) -> Any:
    if protocol == "grpc":
        return _grpc_exporter("metric_exporter", "OTLPMetricExporter")
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetricExporter,
    )

    return HttpMetricExporter()


def _grpc_exporter(module: str, name: str) -> Any:
    # The gRPC exporter is optional (it pulls in grpcio); http/protobuf is the default.
    try:
        loaded = importlib.import_module(f"opentelemetry.exporter.otlp.proto.grpc.{module}")
    except ImportError as error:
        raise RuntimeError(
            "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs "
            "`pip install opentelemetry-exporter-otlp-proto-grpc`, "
            "or use http/protobuf (the default)"
        ) from error
    return getattr(loaded, name)()


def flush_telemetry(timeout_ms: int = 5000) -> None:
    """Export what is buffered; for processes that leave without running atexit hooks."""
    for provider in _shutdown_hooks:
        try:
            provider.force_flush(timeout_ms)
        except Exception:  # telemetry must never turn a success into a failure
            log.warning("could not flush telemetry", exc_info=True)


def tracing_active() -> bool:
    """Whether a real tracer provider is installed (by llmmixer or by the application)."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def client_interceptors() -> list[ClientInterceptor]:
    """Interceptors for a new client: the tracing one when tracing is active."""
    return [TracingInterceptor()] if tracing_active() else []


# ---- span scrubbing --------------------------------------------------------------


def scrubbing_span_exporter(inner: Any, secrets: Sequence[str]) -> Any:
    """Wrap a ``SpanExporter`` so no exported span carries a secret value."""
    from opentelemetry.sdk.trace.export import SpanExporter

    class _Scrubbing(SpanExporter):
        def export(self, spans: Sequence[Any]) -> Any:
            return inner.export([_scrub_span(span, secrets) for span in spans])

        def shutdown(self) -> None:
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return bool(inner.force_flush(timeout_millis))

    return _Scrubbing()


def _scrub_value(value: Any, secrets: Sequence[str]) -> Any:
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, list | tuple):
        return [_scrub_value(item, secrets) for item in value]
    return value


def _scrub_span(span: Any, secrets: Sequence[str]) -> Any:
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.trace import Status

    def scrub(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
        return {key: _scrub_value(value, secrets) for key, value in (attributes or {}).items()}

    status = span.status
    description = status.description
    dirty = _scrub_value(description or "", secrets) != (description or "")
    attributes = scrub(span.attributes)
    events = [Event(event.name, scrub(event.attributes), event.timestamp) for event in span.events]
    dirty = dirty or attributes != dict(span.attributes or {})
    dirty = dirty or any(
        new.attributes != dict(old.attributes or {})
        for new, old in zip(events, span.events, strict=True)
    )
    if not dirty:
        return span
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attributes,
        events=events,
        links=span.links,
        kind=span.kind,
        status=Status(status.status_code, redact(description, secrets) if description else None),
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )
