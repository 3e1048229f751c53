"""How every part of llmmixer reaches Temporal (see docs/settings.md).

Temporal's own conventions through ``temporalio.envconfig``: ``TEMPORAL_ADDRESS``,
``TEMPORAL_NAMESPACE``, ``TEMPORAL_API_KEY``, TLS settings and profiles. One
data converter for client and worker (``runtime/plugin.py``), so both read
each other's payloads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from temporalio.client import Client
from temporalio.converter import DataConverter
from temporalio.envconfig import ClientConfig

from llmmixer.runtime.plugin import MixerPlugin
from llmmixer.runtime.settings import ConnectionEnv
from llmmixer.runtime.storage import build_data_converter
from llmmixer.runtime.telemetry import setup_telemetry

DEFAULT_ADDRESS = "localhost:7233"
DEFAULT_NAMESPACE = "default"
DEFAULT_TASK_QUEUE = "llmmixer"
# Read by workers (the queue a `pty` worker polls) and by MixerClient (which
# writes it into a run's spec), so both sides agree on where commands run.
PTY_TASK_QUEUE_ENV = "LLMMIXER_PTY_TASK_QUEUE"


@dataclass(frozen=True)
class Connection:
    """Resolved connection settings; ``api_key`` is never printed."""

    address: str
    namespace: str
    task_queue: str
    # May hold TEMPORAL_API_KEY: kept out of repr so it is never logged.
    connect_kwargs: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Connection:
        env = dict(os.environ if environ is None else environ)
        kwargs: dict[str, Any] = dict(
            ClientConfig.load_client_connect_config(override_env_vars=env)
        )
        kwargs.setdefault("target_host", DEFAULT_ADDRESS)
        kwargs.setdefault("namespace", DEFAULT_NAMESPACE)
        return cls(
            address=str(kwargs["target_host"]),
            namespace=str(kwargs["namespace"]),
            task_queue=ConnectionEnv.from_env(env).task_queue,
            connect_kwargs=kwargs,
        )

    async def connect(self) -> Client:
        # Tracing (when OTEL_* configure it) starts at the client, so a run's
        # trace begins with the call that started it.
        setup_telemetry()
        return await Client.connect(**{**self.connect_kwargs, "plugins": [MixerPlugin()]})


def data_converter(environ: Mapping[str, str] | None = None) -> DataConverter:
    """The converter shared by clients and workers: pydantic models as plain JSON,
    with large payloads kept outside history and codecs as ``LLMMIXER_PAYLOAD_*``
    configure them (``runtime/storage.py``)."""
    return build_data_converter(environ)
