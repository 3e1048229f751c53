"""In-memory OpenTelemetry for tests: every span and metric point llmmixer records.

OpenTelemetry's global providers can be set once per process; tests instead
swap them in for one test with ``monkeypatch`` (as OpenTelemetry's own test
utilities do), so the rest of the session keeps the no-op default and never
sees tracing turned on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.metrics import _internal as metrics_internal
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

__all__ = ["OtelCapture", "install_otel_capture"]


@dataclass
class OtelCapture:
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.spans if span.name == name]

    def points(self, metric: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, data point) of every point of ``metric`` recorded so far."""
        found: list[tuple[dict[str, Any], Any]] = []
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for item in scope.metrics:
                    if item.name == metric:
                        found += [(dict(p.attributes or {}), p) for p in item.data.data_points]
        return found

    def text(self) -> str:
        """Everything the spans carry, as one string (for looking for secrets)."""
        parts: list[str] = []
        for span in self.spans:
            parts.append(span.to_json())
        return "\n".join(parts)


def install_otel_capture(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtelCapture]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", tracer_provider)
    monkeypatch.setattr(metrics_internal, "_METER_PROVIDER", meter_provider)
    try:
        yield OtelCapture(exporter, reader, tracer_provider)
    finally:
        tracer_provider.shutdown()
        meter_provider.shutdown()
