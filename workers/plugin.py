"""The Temporal plugin of llmmixer's workers: the workflow, its sandbox, the activities.

Everything a worker or a replayer needs to run ``MixerWorkflow`` exactly as
recorded is here once: the sandbox (which modules pass through it), the
workflow class, and the activities a worker registers. The converter and
tracing are the client's (``llmmixer.runtime.plugin.MixerPlugin``); a replayer
needs both, which :func:`mixer_replayer` puts together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from temporalio.plugin import SimplePlugin
from temporalio.worker import Interceptor as WorkerInterceptor
from temporalio.worker import Replayer, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from llmmixer.runtime.plugin import MixerPlugin
from llmmixer.workflows.mixer import MixerWorkflow

__all__ = [
    "SANDBOX_PASSTHROUGH_MODULES",
    "WORKER_PLUGIN_NAME",
    "MixerWorkerPlugin",
    "mixer_replayer",
    "sandbox_runner",
]

WORKER_PLUGIN_NAME = "llmmixer.workers"

# What the workflow sandbox takes from the worker instead of loading afresh for
# each run: third-party libraries and the pure model modules, i.e. the pydantic
# types that cross the data converter (run input, signal/update/query types,
# activity inputs and results). These must be passed through: a model class
# defined inside the sandbox is rebuilt for every run (slow), and is a
# different class from the worker's, so an instance made on one side fails
# validation against the other. They read no clock, environment or file.
#
# Everything else of llmmixer, the workflow module and its logic (mixer, dag,
# calls, patches, the step handlers in workflows/steps, and core's rules:
# plans, templates, validation, secrets), loads inside the sandbox, where a
# datetime.now(), open() or os.environ in it fails the workflow task instead
# of silently breaking replay (at import, only a clock read is refused: the
# SDK restricts os only while a run executes).
#
# The price: each run (and each replay after an eviction) loads those modules
# afresh, about 30 ms of CPU with bytecode caches and 0.5 MB per cached run.
# A test that patches workflow logic must add its module here (monkeypatch):
# the sandbox would otherwise load the unpatched source.
SANDBOX_PASSTHROUGH_MODULES: tuple[str, ...] = (
    # Third-party libraries beyond the SDK's defaults (pydantic, temporalio,
    # the standard library): the safe YAML loader's base classes.
    "yaml",
    # Pure model modules.
    "llmmixer.core.contracts",  # activity inputs/results, events
    "llmmixer.core.providers",  # the provider registry (contracts reads it)
    "llmmixer.core.provider_options",  # provider_options schemas
    "llmmixer.core.spec",  # the run's input
    "llmmixer.core.tools",  # tool models of the spec and of tool activities
    "llmmixer.core.documents",  # the safe document loader (yaml subclasses)
    "llmmixer.workflows.records",  # signal, update and query types, the run's snapshot
    "llmmixer.workflows.carry",  # the continue-as-new input
)


def sandbox_runner() -> SandboxedWorkflowRunner:
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(
            *SANDBOX_PASSTHROUGH_MODULES
        )
    )


def _runner(_existing: WorkflowRunner | None) -> WorkflowRunner:
    # Built when a worker or replayer is configured, not when the plugin is:
    # a test that adds a module to SANDBOX_PASSTHROUGH_MODULES sees it applied.
    return sandbox_runner()


class MixerWorkerPlugin(SimplePlugin):
    """``MixerWorkflow`` (unless ``workflows`` says otherwise) in llmmixer's
    sandbox, plus ``activities`` and worker-only ``interceptors``.

    A worker that takes no workflows (a ``pty`` worker) passes ``workflows=()``.
    """

    def __init__(
        self,
        *,
        workflows: Sequence[type] = (MixerWorkflow,),
        activities: Sequence[Callable[..., Any]] = (),
        interceptors: Sequence[WorkerInterceptor] = (),
    ) -> None:
        super().__init__(
            WORKER_PLUGIN_NAME,
            workflows=list(workflows),
            activities=list(activities),
            workflow_runner=_runner,
            interceptors=list(interceptors),
        )


def mixer_replayer(environ: Mapping[str, str] | None = None) -> Replayer:
    """A replayer that reads and runs histories as llmmixer's workers wrote them.

    ``environ`` holds the ``LLMMIXER_PAYLOAD_*`` settings the recording
    workers had (default ``os.environ``).
    """
    return Replayer(workflows=[], plugins=[MixerPlugin(environ), MixerWorkerPlugin()])
