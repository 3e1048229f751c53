"""OpenTelemetry: one trace per run, GenAI attributes and metrics, exporters, Prometheus.

Spans and metrics are captured in memory (``fakes.otel_capture``) and checked
against what the fake provider reported; exporting over OTLP is checked
against a local collector in a child process, so this process's OpenTelemetry
globals stay untouched.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes.otel_capture import OtelCapture, install_otel_capture
from fakes.provider_server import FakeProviderServer, Reply
from opentelemetry.trace import SpanKind, StatusCode
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter

from llmmixer.activities.providers.base import ProviderError, ProviderResult
from llmmixer.activities.providers.breaker import BreakerBoard, BreakerPolicy
from llmmixer.activities.telemetry import breaker_state_changed, observe_llm_call
from llmmixer.client.mixer import MixerClient
from llmmixer.core.contracts import ErrorType, Usage
from llmmixer.runtime.telemetry import (
    TelemetrySettings,
    client_interceptors,
    scrubbing_span_exporter,
    tracing_active,
)
from llmmixer.workers.telemetry import worker_interceptors
from llmmixer.workers.worker import WorkerSettings, mixer_worker
from llmmixer.workflows.records import RunStatus

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtelCapture]:
    yield from install_otel_capture(monkeypatch)


@pytest.fixture
def worker_env(provider_server: FakeProviderServer) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "LLMMIXER_PTY_ALLOW": "*",
        **provider_server.env(),
    }


@pytest.fixture
async def traced(
    otel: OtelCapture, client: Client, task_queue: str, worker_env: dict[str, str]
) -> AsyncIterator[MixerClient]:
    """A client with the tracing interceptor, as ``Connection.connect`` makes it, and a worker."""
    interceptors = client_interceptors()
    assert [type(i) for i in interceptors] == [TracingInterceptor]
    traced_client = Client(
        client.service_client,
        namespace=client.namespace,
        data_converter=pydantic_data_converter,
        interceptors=interceptors,
    )
    # The worker inherits the client's interceptor; adding another would double spans.
    assert worker_interceptors(traced_client) == []
    settings = WorkerSettings(task_queue=task_queue, shutdown_grace_s=2.0)
    async with mixer_worker(traced_client, settings, environ=worker_env) as worker, worker:
        yield MixerClient(traced_client, task_queue)


async def test_one_trace_from_the_client_call_through_workflow_to_provider_and_command(
    traced: MixerClient, otel: OtelCapture, provider_server: FakeProviderServer
) -> None:
    provider_server.script("openai", Reply(text="draft", usage=(11, 7), model="gpt-4.1-mini-2025"))
    provider_server.script("anthropic", Reply(text="final", usage=(23, 5)))
    spec = {
        "name": "traced",
        "defaults": {"retry": {"max_attempts": 1}},
        "steps": [
            {
                "id": "draft",
                "provider": "openai",
                "model": "gpt-4.1-mini",
                "prompt": "secret plans",
                "max_tokens": 300,
                "temperature": 0.25,
            },
            {"id": "shell", "kind": "pty", "command": ["echo", "hi"]},
            {
                "id": "final",
                "provider": "anthropic",
                "model": "claude-haiku-4-5",
                "needs": ["draft", "shell"],
                "prompt": "improve {{steps.draft.output}}",
            },
        ],
    }
    handle = await traced.start(spec)
    result = await handle.result()
    assert result.status == RunStatus.COMPLETED

    [start] = otel.named("StartWorkflow:MixerWorkflow")
    trace_id = start.context.trace_id
    [draft] = [s for s in otel.named("chat gpt-4.1-mini")]
    [final] = otel.named("chat claude-haiku-4-5")
    [command] = otel.named("command echo")
    run_activity = {s.context.span_id: s for s in otel.named("RunActivity:llmmixer.call_llm")}
    assert otel.named("RunWorkflow:MixerWorkflow")
    # One trace: client call, workflow, activities and the spans inside them.
    for span in (draft, final, command, *run_activity.values()):
        assert span.context.trace_id == trace_id, span.name
    assert draft.parent is not None and draft.parent.span_id in run_activity

    attrs = dict(draft.attributes or {})
    assert draft.kind == SpanKind.CLIENT
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "gpt-4.1-mini"
    assert attrs["gen_ai.response.model"] == "gpt-4.1-mini-2025"
    assert attrs["gen_ai.request.max_tokens"] == 300
    assert attrs["gen_ai.request.temperature"] == 0.25
    assert attrs["gen_ai.usage.input_tokens"] == 11
    assert attrs["gen_ai.usage.output_tokens"] == 7
    assert attrs["llmmixer.step_id"] == "draft"
    assert attrs["llmmixer.cost_usd"] == pytest.approx(result.steps["draft"].cost_usd)
    # Content stays off unless LLMMIXER_OTEL_CAPTURE_CONTENT=1.
    assert not any(key.startswith("gen_ai.input") for key in attrs)
    assert "secret plans" not in otel.text()
    final_attrs = dict(final.attributes or {})
    assert final_attrs["gen_ai.provider.name"] == "anthropic"
    assert final_attrs["gen_ai.usage.input_tokens"] == 23
    assert final_attrs["gen_ai.usage.output_tokens"] == 5
    command_attrs = dict(command.attributes or {})
    assert command_attrs["process.executable.name"] == "echo"
    assert command_attrs["process.exit.code"] == 0

    tokens = {
        (a["gen_ai.request.model"], a["gen_ai.token.type"]): p.sum
        for a, p in otel.points("gen_ai.client.token.usage")
    }
    assert tokens == {
        ("gpt-4.1-mini", "input"): 11,
        ("gpt-4.1-mini", "output"): 7,
        ("claude-haiku-4-5", "input"): 23,
        ("claude-haiku-4-5", "output"): 5,
    }
    durations = otel.points("gen_ai.client.operation.duration")
    assert sorted(p.count for _, p in durations) == [1, 1]
    assert all(a["gen_ai.operation.name"] == "chat" for a, _ in durations)
    costs = {a["gen_ai.request.model"]: p.value for a, p in otel.points("llmmixer.cost")}
    assert costs["gpt-4.1-mini"] == pytest.approx(result.steps["draft"].cost_usd)
    assert costs["claude-haiku-4-5"] == pytest.approx(result.steps["final"].cost_usd)
    outcomes: dict[tuple[str, str], int] = {}
    for a, p in otel.points("llmmixer.step.executions"):
        key = (a["llmmixer.step.kind"], a["llmmixer.outcome"])
        outcomes[key] = outcomes.get(key, 0) + p.value
    assert outcomes == {("llm", "success"): 2, ("pty", "success"): 1}


async def test_provider_failures_mark_the_span_and_carry_error_type(
    traced: MixerClient, otel: OtelCapture, provider_server: FakeProviderServer
) -> None:
    provider_server.fail("gemini", 503, message="unavailable", times=2)
    provider_server.script("gemini", Reply(text="ok", usage=(4, 2)))
    spec = {
        "name": "flaky",
        "defaults": {
            "retry": {"max_attempts": 3, "initial_interval_s": 0.1, "backoff": 1.0},
        },
        "steps": [{"id": "g", "provider": "gemini", "model": "gemini-2.5-flash", "prompt": "x"}],
    }
    result = await (await traced.start(spec)).result()
    assert result.steps["g"].attempts == 3
    spans = otel.named("chat gemini-2.5-flash")
    assert len(spans) == 3
    failed = [s for s in spans if s.status.status_code == StatusCode.ERROR]
    assert len(failed) == 2
    for span in failed:
        attrs = dict(span.attributes or {})
        assert attrs["error.type"] == ErrorType.RETRYABLE
        assert attrs["http.response.status_code"] == 503
        assert attrs["gen_ai.provider.name"] == "gcp.gemini"
        assert not span.events  # no exception (and so no traceback) recorded
    assert sorted(dict(s.attributes or {})["llmmixer.attempt"] for s in spans) == [1, 2, 3]
    by_error = {
        a.get("error.type"): p.count for a, p in otel.points("gen_ai.client.operation.duration")
    }
    assert by_error == {ErrorType.RETRYABLE: 2, None: 1}


async def test_content_is_captured_only_when_enabled_and_redacted(
    otel: OtelCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fakes.provider_fixtures import llm_call

    call = llm_call("openai", "gpt-4.1", prompt="use key sk-live-abcdefgh12345678 please")

    async def answer() -> ProviderResult:
        return ProviderResult(
            "the answer", "gpt-4.1", Usage(input_tokens=3, output_tokens=2), "stop"
        )

    await observe_llm_call(call, answer, cost=lambda usage: None)
    [plain] = otel.named("chat gpt-4.1")
    assert "gen_ai.input.messages" not in (plain.attributes or {})

    monkeypatch.setenv("LLMMIXER_OTEL_CAPTURE_CONTENT", "1")
    otel.exporter.clear()
    await observe_llm_call(call, answer, cost=lambda usage: None, secrets=["planted-secret-1"])
    [span] = otel.named("chat gpt-4.1")
    attrs = dict(span.attributes or {})
    sent = json.loads(str(attrs["gen_ai.input.messages"]))
    assert sent[0]["role"] == "user"
    assert "[REDACTED]" in sent[0]["parts"][0]["content"]
    assert "sk-live-abcdefgh12345678" not in otel.text()
    received = json.loads(str(attrs["gen_ai.output.messages"]))
    assert received == [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": "the answer"}],
            "finish_reason": "stop",
        }
    ]
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)


async def test_a_provider_error_span_never_carries_the_raw_exception(otel: OtelCapture) -> None:
    from fakes.provider_fixtures import llm_call

    secret = "worker-key-0123456789"

    async def fail() -> ProviderResult:
        try:
            raise RuntimeError(f"SDK said: bad key {secret}")
        except RuntimeError as sdk_error:
            raise ProviderError(ErrorType.AUTH, f"401 from openai for {secret}") from sdk_error

    with pytest.raises(ProviderError):
        await observe_llm_call(
            llm_call("openai", "gpt-4.1"), fail, cost=lambda usage: None, secrets=[secret]
        )
    [span] = otel.named("chat gpt-4.1")
    assert span.status.status_code == StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == ErrorType.AUTH
    assert secret not in otel.text()
    assert "[REDACTED]" in (span.status.description or "")


def test_breaker_state_changes_are_counted(otel: OtelCapture) -> None:
    clock = [0.0]
    board = BreakerBoard(
        BreakerPolicy(min_calls=1, cooldown_s=10),
        clock=lambda: clock[0],
        on_change=breaker_state_changed,
    )
    board.record_failure("openai", "gpt-4.1", ProviderError(ErrorType.RETRYABLE, "503"))
    clock[0] = 11.0
    board.before_call("openai", "gpt-4.1")
    board.record_success("openai", "gpt-4.1")
    moves = [
        (a["llmmixer.breaker.from"], a["llmmixer.breaker.to"], p.value)
        for a, p in otel.points("llmmixer.circuit_breaker.transitions")
    ]
    assert sorted(moves) == [
        ("closed", "open", 1),
        ("half_open", "closed", 1),
        ("open", "half_open", 1),
    ]


def test_nothing_is_on_without_configuration() -> None:
    assert not tracing_active()
    assert client_interceptors() == []
    settings = TelemetrySettings.from_env({})
    assert not settings.enabled and settings.prometheus_address is None
    assert TelemetrySettings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}).enabled
    disabled = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}
    assert not TelemetrySettings.from_env(disabled).enabled
    with pytest.raises(ValueError, match="LLMMIXER_PROMETHEUS_PORT"):
        TelemetrySettings.from_env({"LLMMIXER_PROMETHEUS_PORT": "metrics"})
    with pytest.raises(ValueError, match="http/protobuf"):
        TelemetrySettings.from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_the_exporter_scrubs_secret_values_from_every_span() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    inner = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(
        SimpleSpanProcessor(scrubbing_span_exporter(inner, ["tok-planted-98765"]))
    )
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("leaky", attributes={"a": "x tok-planted-98765 y"}) as span:
        span.add_event("e", {"b": ["tok-planted-98765"]})
        span.set_status(StatusCode.ERROR, "failed with tok-planted-98765")
    with tracer.start_as_current_span("clean", attributes={"a": "fine"}):
        pass
    leaky, clean = inner.get_finished_spans()
    assert "tok-planted-98765" not in leaky.to_json()
    assert dict(leaky.attributes or {})["a"] == "x [REDACTED] y"
    assert leaky.status.description == "failed with [REDACTED]"
    assert dict(clean.attributes or {}) == {"a": "fine"}
    provider.shutdown()


class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        _Collector.received.append((self.path, body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[str]:
    _Collector.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_otlp_export_when_the_endpoint_is_set(collector: str, tmp_path: Path) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    script = textwrap.dedent(
        """
        import asyncio
        from llmmixer.core.contracts import ChatMessage, LlmCall, Usage
        from llmmixer.activities.providers.base import ProviderResult
        from llmmixer.activities.telemetry import observe_llm_call
        from llmmixer.runtime.telemetry import flush_telemetry, setup_telemetry, tracing_active

        settings = setup_telemetry()
        assert settings.traces and tracing_active()
        call = LlmCall(workflow_id="w", step_id="s", provider="openai", model="gpt-4.1",
                       messages=[ChatMessage(role="user", content="hi")])

        async def answer():
            return ProviderResult("ok", "gpt-4.1", Usage(input_tokens=5, output_tokens=6), "stop")

        async def main():
            await observe_llm_call(call, answer, cost=lambda u: None,
                                   secrets=["tok-not-given-to-the-span"])
            # a secret that reached an attribute some other way is still scrubbed
            from opentelemetry import trace
            with trace.get_tracer("t").start_as_current_span("x") as span:
                span.set_attribute("leak", "k=" + __import__("os").environ["LLMMIXER_API_TOKEN"])

        asyncio.run(main())
        flush_telemetry()
        """
    )
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector,
        "OTEL_SERVICE_NAME": "llmmixer-test",
        "LLMMIXER_API_TOKEN": "api-token-marker-123456",
        "OTEL_METRICS_EXPORTER": "none",
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    bodies = [body for path, body in _Collector.received if path == "/v1/traces"]
    assert bodies
    names: dict[str, dict[str, Any]] = {}
    for body in bodies:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert service["service.name"] == "llmmixer-test"
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    names[span.name] = {a.key: a.value for a in span.attributes}
    assert names["chat gpt-4.1"]["gen_ai.usage.output_tokens"].int_value == 6
    assert names["x"]["leak"].string_value == "k=[REDACTED]"
    assert b"api-token-marker-123456" not in b"".join(bodies)


def test_prometheus_binds_loopback_unless_told_otherwise() -> None:
    # The endpoint has no authentication: publishing it is the operator's choice.
    def address(**env: str) -> str | None:
        return TelemetrySettings.from_env(env).prometheus_address

    assert address(LLMMIXER_PROMETHEUS_PORT="9464") == "127.0.0.1:9464"
    assert address(LLMMIXER_PROMETHEUS_PORT="9464", LLMMIXER_PROMETHEUS_HOST=" ") == (
        "127.0.0.1:9464"
    )
    scraped = {"LLMMIXER_PROMETHEUS_PORT": "9464", "LLMMIXER_PROMETHEUS_HOST": "0.0.0.0"}
    assert address(**scraped) == "0.0.0.0:9464"
    assert address(LLMMIXER_PROMETHEUS_PORT="9464", LLMMIXER_PROMETHEUS_HOST="::1") == (
        "[::1]:9464"
    )
    assert address(LLMMIXER_PROMETHEUS_PORT="9464", LLMMIXER_PROMETHEUS_HOST="[::]") == "[::]:9464"


def _listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a socket listening on ``port``, read from /proc/net/tcp."""
    found: set[str] = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        host_hex, port_hex = local.split(":")
        if int(port_hex, 16) == port and state == "0A":  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(host_hex)[::-1]))
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_prometheus_endpoint_serves_temporal_worker_metrics(
    client: Client, task_queue: str, worker_env: dict[str, str]
) -> None:
    port = _free_port()
    # No LLMMIXER_PROMETHEUS_HOST: the default must be loopback, not 0.0.0.0.
    env = {**worker_env, "LLMMIXER_PROMETHEUS_PORT": str(port)}
    env.pop("LLMMIXER_PROMETHEUS_HOST", None)
    settings = WorkerSettings(task_queue=task_queue, shutdown_grace_s=2.0)
    spec = {
        "name": "metrics",
        "dry_run": True,
        "steps": [{"id": "a", "provider": "openai", "model": "gpt-4.1", "prompt": "x"}],
    }
    async with mixer_worker(client, settings, environ=env) as worker, worker:
        result = await (await MixerClient(client, task_queue).start(spec)).result()
        assert result.status == RunStatus.COMPLETED
        async with httpx.AsyncClient() as http:
            text = ""
            for _ in range(50):
                text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                if "temporal_" in text and task_queue in text:
                    break
                await asyncio.sleep(0.1)
        if sys.platform == "linux":
            assert _listening_addresses(port) == {"127.0.0.1"}
    assert "temporal_" in text
    assert task_queue in text
