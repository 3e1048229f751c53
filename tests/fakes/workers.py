"""``llmmixer worker`` as a real child process, for tests that crash workers on purpose.

A worker started in the test's own event loop cannot be SIGKILLed without
killing the test, and an in-process worker shares SDK clients, caches and
sockets with everything else; so crash tests run the worker exactly as an
operator would: ``python -m llmmixer.client.cli worker`` with its own
environment. :class:`WorkerProcesses` starts them, proves each one is
*polling* (not merely alive: the process prints its banner before the poll
loop begins), kills them with any signal, and stops every one it started
whatever the test did, so no worker outlives its test.

    async with WorkerProcesses(client, tmp_path, base_env) as workers:
        first = await workers.start(task_queue)
        ...
        await first.kill()                     # SIGKILL: no goodbye to Temporal
        second = await workers.start(task_queue)

A worker's Temporal identity is the SDK default ``<pid>@<hostname>``, so the
identity a workflow's history or a pending activity names maps back to one of
these processes (:meth:`WorkerProcesses.by_identity`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.client import Client

from llmmixer.client.pollers import poller_identities

__all__ = [
    "SLOW_CHUNK_DELAY_S",
    "SLOW_TEXT",
    "WorkerProcess",
    "WorkerProcesses",
    "crash_defaults",
    "eventually",
    "llm_step",
    "worker_environment",
]

T = TypeVar("T")

# A worker needs these to start at all; everything else comes from the test.
_INHERITED = ("PATH", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")


# ---- specs and polling shared by the crash tests ------------------------------------

# A slow stream: 60 words at 0.25 s each is 15 s, long enough to kill a worker
# or the server in the middle of it, short enough that a test that waits it
# out still fits in its time budget.
SLOW_TEXT = " ".join(f"w{i}" for i in range(60))
SLOW_CHUNK_DELAY_S = 0.25


def crash_defaults(**extra: Any) -> dict[str, Any]:
    """Spec ``defaults`` under which a lost activity is noticed in seconds."""
    return {
        "provider": "openai",
        # Temporal declares a silent activity lost after this: 3 s, not 20.
        # Not less: the SDK sends heartbeats at most every 0.8 x this, so the
        # margin a busy test machine has for a late one is 0.2 x this.
        "heartbeat_timeout_s": 3,
        # Retries start quickly so recovery time is the heartbeat timeout, not backoff.
        "retry": {"max_attempts": 5, "initial_interval_s": 0.5, "max_interval_s": 2},
        **extra,
    }


def llm_step(step_id: str, prompt: str, needs: list[str] | None = None) -> dict[str, Any]:
    """An OpenAI step whose model is ``m-<id>``: one model per step, so the fake
    provider's per-model call count is a per-step count."""
    return {"id": step_id, "model": f"m-{step_id}", "prompt": prompt, "needs": needs or []}


async def eventually(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    what: str,
    within_s: float = 30.0,
    every_s: float = 0.1,
) -> T:
    """Poll ``probe`` until ``done`` holds; fail naming ``what`` and the last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        value = await probe()
        if done(value):
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"{what} within {within_s:g}s; last: {value!r}")
        await asyncio.sleep(every_s)


# ---- worker processes ----------------------------------------------------------------


def worker_environment(
    address: str, task_queue: str, home: Path, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """A minimal, explicit environment: nothing of the developer's leaks in.

    Built from scratch rather than copied from ``os.environ`` so a real
    provider key or a Temporal Cloud profile on the developer's machine can
    never reach a crash test's worker.
    """
    env = {name: os.environ[name] for name in _INHERITED if name in os.environ}
    env.update(
        {
            "HOME": str(home),
            "TEMPORAL_ADDRESS": address,
            "LLMMIXER_TASK_QUEUE": task_queue,
            # Cleanup SIGTERMs every worker; a short grace keeps teardown quick.
            "LLMMIXER_SHUTDOWN_GRACE_S": "2",
            "PYTHONUNBUFFERED": "1",
            # The test is the operator of its workers: commands may run anything.
            "LLMMIXER_PTY_ALLOW": "*",
        }
    )
    env.update(extra or {})
    return env


class WorkerProcess:
    """One ``llmmixer worker`` child; see :class:`WorkerProcesses` for the lifecycle."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        log_path: Path,
        task_queue: str,
        activity_only: bool = False,
    ):
        self.process = process
        self.log_path = log_path
        self.task_queue = task_queue
        # A PTY-only worker (LLMMIXER_WORKER_ROLES=pty) polls no workflow tasks.
        self.activity_only = activity_only
        self.identity = f"{process.pid}@{socket.gethostname()}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def log(self) -> str:
        """The worker's stdout and stderr so far (for assertion messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def kill(self, sig: int = signal.SIGKILL, timeout_s: float = 15.0) -> int:
        """Send ``sig`` to the worker's process group and wait for it to exit.

        The whole group, because a worker that dies while a command runs must
        not be helped by the test: only the worker's own descendants that stayed
        in its group are hit, exactly as a container runtime's kill would.
        Commands run by the PTY activity sit in sessions of their own and are
        left to the product, which is what the cancellation tests check.
        """
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
        return await asyncio.wait_for(self.process.wait(), timeout_s)

    async def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL if it has not exited after its grace."""
        if self.process.returncode is not None:
            return
        try:
            await self.kill(signal.SIGTERM, timeout_s=10.0)
        except TimeoutError:
            await self.kill(signal.SIGKILL)


class WorkerProcesses:
    """Starts ``llmmixer worker`` processes for one test and always stops them."""

    def __init__(self, client: Client, log_dir: Path, base_env: Mapping[str, str]) -> None:
        """``base_env`` from :func:`worker_environment`; ``client`` only to see pollers."""
        self.client = client
        self.log_dir = log_dir
        self.base_env = dict(base_env)
        self.started: list[WorkerProcess] = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop_all()

    async def stop_all(self) -> None:
        # Shielded: a test timeout cancelling us here must still not orphan a worker.
        await asyncio.shield(
            asyncio.gather(*(w.stop() for w in self.started), return_exceptions=True)
        )

    async def start(
        self,
        task_queue: str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 30.0,
        activity_only: bool = False,
    ) -> WorkerProcess:
        """Start a worker and return once Temporal has seen it poll both task types.

        ``activity_only``: wait for the activity poller alone, on ``task_queue``
        (a PTY-only worker polling its own queue).
        """
        environ = {**self.base_env, **(env or {})}
        if task_queue is not None:
            environ["LLMMIXER_TASK_QUEUE"] = task_queue
        queue = environ["LLMMIXER_TASK_QUEUE"]
        log_path = self.log_dir / f"worker-{len(self.started) + 1}.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "llmmixer.client.cli",
                "worker",
                env=environ,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                # Its own group, so kill() reaches the worker and any helper
                # process it started, and never the test runner.
                start_new_session=True,
            )
        worker = WorkerProcess(process, log_path, queue, activity_only)
        self.started.append(worker)
        await self.wait_polling(worker, ready_timeout_s)
        return worker

    async def wait_polling(self, worker: WorkerProcess, timeout_s: float = 30.0) -> None:
        """Wait until the server lists ``worker`` among the workflow and activity pollers.

        The server is the only witness that counts: a worker that logged its
        banner may still be connecting, and a test that starts a run before
        the activity poller exists measures start-up, not recovery.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if not worker.running:
                raise AssertionError(
                    f"worker {worker.identity} exited with {worker.process.returncode} "
                    f"before it polled:\n{worker.log()}"
                )
            if await self._is_polling(worker):
                return
            if loop.time() >= deadline:
                raise AssertionError(
                    f"worker {worker.identity} did not poll {worker.task_queue!r} "
                    f"within {timeout_s:g}s:\n{worker.log()}"
                )
            await asyncio.sleep(0.2)

    async def _is_polling(self, worker: WorkerProcess) -> bool:
        kinds = [TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY]
        if not worker.activity_only:
            kinds.insert(0, TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW)
        for kind in kinds:
            try:
                identities = await poller_identities(self.client, worker.task_queue, kind)
            except Exception:  # the server may itself be restarting in some tests
                return False
            if worker.identity not in identities:
                return False
        return True

    def by_identity(self, identity: str) -> WorkerProcess:
        """The started worker that Temporal knows as ``identity``."""
        for worker in self.started:
            if worker.identity == identity:
                return worker
        known = ", ".join(w.identity for w in self.started) or "none"
        raise AssertionError(f"no worker started here has identity {identity!r} (have {known})")
