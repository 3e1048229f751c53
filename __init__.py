"""llmmixer: a durable multi-LLM workflow orchestrator on Temporal.

The repository root is this package; its parts are the top-level folders:
``workflows`` (deterministic code: the spec, the DAG, ``MixerWorkflow``),
``activities`` (every effect: provider adapters, PTY runner, pricing),
``workers`` (building and running workers, the embedded dev server) and
``client`` (``MixerClient``, the ``llmmixer`` CLI, the HTTP API).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmmixer")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
