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
# each run: all of llmmixer that the workflow imports, i.e. the whole of
# ``llmmixer.core`` and ``llmmixer.workflows`` (a name here covers its
# submodules: the SDK passes through a module when it or any parent package
# is listed), and the third-party libraries they use beyond the SDK's
# defaults.
#
# Why all of it: a module loaded inside the sandbox is loaded again for every
# run and every replay after an eviction. For llmmixer's 30-odd workflow
# modules that was most of its overhead over raw Temporal: about 45 ms of CPU
# and 830 KB per cached run (with bytecode caches; bench/README.md). Passed
# through, they load once per worker and a run's sandbox costs less than raw
# Temporal's (which reloads its one workflow module per run). The pydantic
# models that cross the data converter must pass through in any case: a class
# defined inside the sandbox is a different class from the worker's, so an
# instance made on one side fails validation on the other.
#
# ``llmmixer.workflows.mixer``, the module of ``MixerWorkflow``, passes
# through too. Kept inside, it alone cost about 9 ms and 90 KB per run, twice
# raw Temporal's build (its 13 handlers' ``@workflow.defn`` processing), for a
# guard on its own lines only, not on the logic it calls; and it holds no
# module state a run could leak (tests/test_determinism.py checks that).
#
# The trade-off: the sandbox's module restrictions (a ``datetime.now()``,
# ``os.environ``, ``random`` refused while a run executes) do not apply to
# passed-through code, since it uses the worker's own modules; only the
# restricted builtins (``open``, ``input``) still fail the workflow task, and
# module-level state would be shared between runs. Determinism of this code is
# instead checked statically, on every module the workflow loads, by
# tests/test_determinism.py: no I/O or clock modules, no clock, file,
# environment or print calls, no ``global``, no writes to module-level
# names. A new module under core/ or workflows/ is covered by both at once.
#
# ``MixerWorkflow`` itself now runs outside the sandbox (``sandboxed=False``
# in workflows/mixer.py): with everything passed through, what was left of the
# sandbox was its cost on every workflow task (entering it once per payload
# converted), not a guard. The list stays right for any sandboxed workflow a
# worker or a replayer also runs.
#
# A test that patches workflow logic can monkeypatch the worker's module:
# every run uses it.
SANDBOX_PASSTHROUGH_MODULES: tuple[str, ...] = (
    # Third-party libraries beyond the SDK's defaults (pydantic, temporalio,
    # the standard library): the safe YAML loader's base classes, and the
    # JSON Schema check of a tool's parameters (pure; core/validation.py).
    "yaml",
    "jsonschema",
    # The workflow's models and logic, loaded once per worker.
    "llmmixer.core",
    "llmmixer.workflows",
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
