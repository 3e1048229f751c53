"""The Temporal plugin every llmmixer client carries: one converter, one tracing setup.

A client, a worker and a replayer must agree on how payloads are encoded
(pydantic models as plain JSON, large payloads kept outside history, codecs
as ``LLMMIXER_PAYLOAD_*`` configure them) or they cannot read each other's
history. :class:`MixerPlugin` is that agreement, built once:

    client = await Client.connect(address, plugins=[MixerPlugin()])

A worker built on such a client inherits it (the SDK applies a client's
plugins to its workers); what only a worker adds (the workflow, the
activities, the sandbox) is ``llmmixer.workers.plugin.MixerWorkerPlugin``.
"""

from __future__ import annotations

from collections.abc import Mapping

from temporalio.plugin import SimplePlugin

from llmmixer.runtime.storage import build_data_converter
from llmmixer.runtime.telemetry import client_interceptors

__all__ = ["PLUGIN_NAME", "MixerPlugin"]

PLUGIN_NAME = "llmmixer"


class MixerPlugin(SimplePlugin):
    """The data converter and the tracing interceptor of llmmixer's clients.

    ``environ`` (default ``os.environ``) holds the ``LLMMIXER_PAYLOAD_*``
    settings; a wrong one raises here, naming the variable. Tracing is on when
    a tracer provider is installed at construction (``setup_telemetry``, or an
    application's own OpenTelemetry setup).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__(
            PLUGIN_NAME,
            data_converter=build_data_converter(environ),
            interceptors=client_interceptors(),
        )
