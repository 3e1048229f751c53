"""Telemetry only a worker has: Temporal's Prometheus metrics and worker tracing.

Temporal's own worker metrics (task latencies, slots, polls), read by
``runtime.telemetry.prometheus_address``::

    LLMMIXER_PROMETHEUS_PORT        serve them at http://127.0.0.1:PORT/metrics
    LLMMIXER_PROMETHEUS_HOST        the address to bind; 127.0.0.1 by default, so
                                    the metrics (task queue names, workflow types,
                                    activity counts) stay on this machine until an
                                    operator sets 0.0.0.0 for a scraper, as a
                                    container that is scraped must

OpenTelemetry itself (installed once per process, clients included) is in
``runtime/telemetry.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import ServiceClient
from temporalio.worker import Interceptor as WorkerInterceptor

from llmmixer.runtime.telemetry import tracing_active

log = logging.getLogger("llmmixer.telemetry")


def worker_interceptors(client: Client) -> list[WorkerInterceptor]:
    """Tracing for a worker whose client does not already carry it (a worker
    inherits every worker interceptor of its client)."""
    if not tracing_active():
        return []
    if any(isinstance(i, TracingInterceptor) for i in client.config()["interceptors"]):
        return []
    return [TracingInterceptor()]


# ---- Prometheus for Temporal's worker metrics ---------------------------------------

_runtimes_lock = threading.Lock()
_runtimes: dict[str, Runtime] = {}


def prometheus_runtime(address: str) -> Runtime:
    """One Temporal ``Runtime`` serving Prometheus on ``address`` per process.

    A runtime binds its port when created, so a second worker in the same
    process must share it rather than make another.
    """
    with _runtimes_lock:
        runtime = _runtimes.get(address)
        if runtime is None:
            runtime = Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(address)))
            _runtimes[address] = runtime
            log.info("Temporal worker metrics on http://%s/metrics", address)
        return runtime


async def with_prometheus(client: Client, address: str) -> Client:
    """A client like ``client`` whose connection reports Temporal metrics to Prometheus.

    A client's runtime is fixed when it connects, so the worker gets a second
    connection on the Prometheus runtime; ``llmmixer`` commands that are not
    workers keep theirs and never bind the port.
    """
    config = dataclasses.replace(client.service_client.config, runtime=prometheus_runtime(address))
    service_client = await ServiceClient.connect(config)
    options = client.config()
    # Plugins already shaped these options; they are not passed to run twice.
    return Client(
        service_client,
        namespace=options["namespace"],
        data_converter=options["data_converter"],
        interceptors=options["interceptors"],
        default_workflow_query_reject_condition=options["default_workflow_query_reject_condition"],
        header_codec_behavior=options["header_codec_behavior"],
    )
