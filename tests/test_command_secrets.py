"""A command plays the attacker against the worker that runs it.

- It looks for the worker's keys in its own environment and in
  ``/proc/<pid>/environ`` of its parent and of the worker (a real
  ``llmmixer worker`` process holding planted keys, in pty and pipe mode).
  The tests run as root in CI, where ``CAP_SYS_PTRACE`` would ignore the
  worker's non-dumpable flag: commands must start without capabilities.
- It prints a worker secret it found elsewhere (a file): the value must be
  redacted in the run's result, its failure and its events.
- On a worker whose operator did not set ``LLMMIXER_PTY_ALLOW``, nothing runs.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fakes.workers import WorkerProcesses, worker_environment
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from llmmixer.client.mixer import MixerClient
from llmmixer.workers.worker import WorkerSettings, mixer_worker
from llmmixer.workflows.records import RunStatus, StepStatus

pytestmark = pytest.mark.timeout(180)

MARK = uuid.uuid4().hex[:16]
# Allowed by path: an operator's list that the old "allow everything" code
# understood as well, so this test shows the attack working there.
PYTHON = os.path.abspath(sys.executable)
PLANTED = {
    "OPENAI_API_KEY": f"sk-planted-{MARK}-openai",
    "ACME_SERVICE_TOKEN": f"acme-{MARK}-token",
    "AWS_SECRET_ACCESS_KEY": f"aws-{MARK}-secret",
    "DATABASE_URL": f"postgres://app:db{MARK}pw@db.internal/app",
}

# Reads every environ it can reach and says what it found; it never prints a
# value (the worker would redact it, hiding whether the read worked).
PROBE = r"""
import os, sys
worker, mark = int(sys.argv[1]), sys.argv[2]

def parent_of(pid):
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])

targets = {"self": os.getpid(), "parent": os.getppid(), "grandparent": parent_of(os.getppid())}
targets["worker"] = worker
for label, pid in targets.items():
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            data = environ.read()
    except OSError as exc:
        print(f"{label} {pid}: DENIED {exc.errno}")
    else:
        print(f"{label} {pid}: READ found={mark.encode() in data}")
print("names:", ",".join(sorted(os.environ)))
"""


@pytest.fixture
def address(env: WorkflowEnvironment) -> str:
    return env.client.service_client.config.target_host


@pytest.mark.parametrize("mode", ["pty", "pipe"])
async def test_a_command_cannot_read_the_workers_keys_through_proc(
    env: WorkflowEnvironment, address: str, task_queue: str, tmp_path: Path, mode: str
) -> None:
    python = PYTHON
    extra = {**PLANTED, "LLMMIXER_PTY_MODE": mode, "LLMMIXER_PTY_ALLOW": python}
    if "PYTHONPATH" in os.environ:  # a source checkout rather than an install
        extra["PYTHONPATH"] = os.environ["PYTHONPATH"]
    base = worker_environment(address, task_queue, tmp_path, extra)
    async with WorkerProcesses(env.client, tmp_path, base) as workers:
        worker = await workers.start()
        # The keys really are in the worker's environ: only the command must fail.
        worker_environ = await asyncio.to_thread(Path(f"/proc/{worker.pid}/environ").read_bytes)
        assert MARK.encode() in worker_environ
        spec = {
            "name": "proc-probe",
            "defaults": {"on_failure": "skip", "retry": {"max_attempts": 1}},
            "steps": [
                {
                    "id": "probe",
                    "kind": "pty",
                    "command": [python, "-c", PROBE, str(worker.pid), MARK],
                }
            ],
        }
        mixer = MixerClient(env.client, task_queue)
        handle = await mixer.start(spec)
        result = await asyncio.wait_for(handle.result(), 60)
        step = result.steps["probe"]
        assert step.status == StepStatus.COMPLETED, f"{step.error}\n{worker.log()}"
        assert result.status == RunStatus.COMPLETED
        assert step.mode == mode
        output = step.output or ""
        lines = dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)
        by_label = {key.split()[0]: value for key, value in lines.items()}
        # The command's own environment is readable and holds no key.
        assert by_label["self"] == "READ found=False", output
        # Its parent (the worker in pty mode, the supervisor in pipe mode),
        # and the worker itself, genuinely cannot be read.
        assert by_label["parent"].startswith("DENIED"), output
        assert by_label["worker"].startswith("DENIED"), output
        assert "found=True" not in output, output
        names = set(by_label["names"].split(","))
        assert not names & set(PLANTED), output
        history = await handle.temporal.fetch_history()
        assert MARK not in history.to_json()
        assert MARK not in worker.log()


SECRET = f"acme-{MARK}-found-elsewhere"


@pytest.fixture
def worker_env() -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "ACME_API_TOKEN": SECRET,
    }


async def test_a_secret_printed_by_a_command_is_redacted_from_result_error_and_events(
    mixer: MixerClient, tmp_path: Path
) -> None:
    found = tmp_path / "config.txt"
    found.write_text(f"token = {SECRET}\n")
    show = f"print(open({str(found)!r}).read(), end='')"
    spec = {
        "name": "redaction",
        "defaults": {"retry": {"max_attempts": 1}},
        "steps": [
            {"id": "show", "kind": "pty", "command": [sys.executable, "-c", show]},
            {
                "id": "fail",
                "kind": "pty",
                "command": [sys.executable, "-c", f"{show}; raise SystemExit(3)"],
                "on_failure": "skip",
            },
        ],
    }
    handle = await mixer.start(spec)
    result = await asyncio.wait_for(handle.result(), 60)
    assert result.steps["show"].output == "token = [REDACTED]\n"
    failed = result.steps["fail"]
    assert failed.status == StepStatus.SKIPPED
    assert failed.exit_code == 3 or "code 3" in (failed.error or "")
    assert "token = [REDACTED]" in (failed.error or "")
    assert SECRET not in result.model_dump_json()
    history = await handle.temporal.fetch_history()
    assert SECRET not in history.to_json()
    events = [event.model_dump_json() async for event in handle.events()]
    assert events and SECRET not in "".join(events)


@pytest.fixture
async def operators_worker(
    client: Client, task_queue: str, tmp_path: Path
) -> AsyncIterator[MixerClient]:
    """A worker as `llmmixer worker` builds it, LLMMIXER_PTY_ALLOW unset."""
    environ = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    settings = WorkerSettings(task_queue=task_queue, shutdown_grace_s=2.0)
    async with mixer_worker(client, settings, environ=environ) as worker, worker:
        yield MixerClient(client, task_queue)


async def test_unset_allowlist_runs_no_command_and_on_failure_decides(
    operators_worker: MixerClient, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    spec = {
        "name": "no-commands",
        "defaults": {"on_failure": "skip"},
        "steps": [
            {
                "id": "cmd",
                "kind": "pty",
                "command": [sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
            },
            {"id": "agent", "kind": "agent", "agent": "claude-code", "prompt": "x"},
        ],
    }
    handle = await operators_worker.start(spec)
    result = await asyncio.wait_for(handle.result(), 60)
    for step_id in ("cmd", "agent"):
        step = result.steps[step_id]
        assert step.status == StepStatus.SKIPPED, step
        assert step.attempts == 1  # not retried: nothing would change
        assert "LLMMIXER_PTY_ALLOW is not set" in (step.error or ""), step
    assert not marker.exists()
