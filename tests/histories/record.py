"""Record workflow histories for the replay test (``tests/test_replay.py``).

Run by hand when a release changes behaviour on purpose, and commit the files:

    python tests/histories/record.py [SCENARIO ...]

Each scenario runs on a real dev server; its history is saved as JSON named
``<release>-<scenario>.json``. Old files are never rewritten: they are what
runs in flight look like, and the current code must keep replaying them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import tomllib
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from temporalio.testing import WorkflowEnvironment

from llmmixer import __version__
from llmmixer.client.mixer import MixerClient, MixerHandle
from llmmixer.runtime.plugin import MixerPlugin
from llmmixer.workers.worker import WorkerSettings, mixer_worker

HERE = Path(__file__).parent
PY = sys.executable


async def until(handle: MixerHandle, step: str, status: str) -> None:
    for _ in range(300):
        progress = await handle.progress()
        if progress.steps[step].status.value == status:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{step} never became {status}")


async def fan(mixer: MixerClient) -> MixerHandle:
    handle = await mixer.start(Path(HERE.parent.parent / "examples" / "hello.yaml"), dry_run=True)
    await handle.result()
    return handle


async def interventions(mixer: MixerClient) -> MixerHandle:
    marker = Path(tempfile.mkdtemp()) / "go"
    script = f"import os,sys\nif not os.path.exists({str(marker)!r}): sys.exit(1)\nprint('ok')"
    spec = {
        "name": "interventions",
        "defaults": {"retry": {"max_attempts": 1}},
        "steps": [
            {"id": "flaky", "kind": "pty", "command": [PY, "-c", script]},
            {"id": "gate", "kind": "approval", "needs": ["flaky"]},
            {"id": "skipme", "kind": "pty", "command": [PY, "-c", "raise SystemExit(2)"]},
            {
                "id": "last",
                "kind": "pty",
                "needs": ["gate", "skipme"],
                "command": [PY, "-c", "import sys; print(sys.argv[1:])", "{{steps.gate.output}}"],
            },
        ],
    }
    handle = await mixer.start(spec)
    await until(handle, "flaky", "waiting")
    await until(handle, "skipme", "waiting")
    await handle.temporal.signal("retry", {"step": "nope"})
    marker.write_text("go")
    await handle.retry("flaky")
    await until(handle, "gate", "waiting")
    await handle.reject("gate", reason="not yet")
    await handle.approve("gate", comment="now")
    await handle.skip("skipme", reason="flaky test")
    await handle.result()
    return handle


async def cancelled(mixer: MixerClient) -> MixerHandle:
    spec = {
        "name": "cancel",
        "steps": [
            {"id": "slow", "kind": "pty", "command": [PY, "-c", "import time; time.sleep(60)"]}
        ],
    }
    handle = await mixer.start(spec)
    await until(handle, "slow", "running")
    await asyncio.sleep(1)
    await handle.cancel()
    try:
        await handle.result()
    except Exception:
        pass
    return handle


async def pattern(mixer: MixerClient) -> MixerHandle:
    """Decompose, route, aggregate: a plan held by a budget, raised, then best_of."""
    spec = {
        "name": "pattern",
        "dry_run": True,
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
        "routes": {
            "a": [{"provider": "anthropic", "model": "claude-haiku-4-5"}],
            "b": [{"provider": "gemini", "model": "gemini-2.5-flash"}],
        },
        "budget": {"max_tokens": 100},  # the planner's call spends more
        "steps": [
            {"id": "split", "kind": "decompose", "prompt": "Split the work"},
            {
                "id": "pick",
                "needs": ["split"],
                "prompt": "{{steps.split.children}}",
                "best_of": {
                    "n": 2,
                    "targets": [
                        {"provider": "anthropic", "model": "claude-haiku-4-5"},
                        {"provider": "openai", "model": "gpt-4.1"},
                    ],
                    "judge": {"provider": "gemini", "model": "gemini-2.5-pro"},
                },
            },
        ],
        "output": '{{join(steps.split-*, "\\n")}}\n{{steps.pick.output}}',
    }
    handle = await mixer.start(spec)
    for _ in range(300):
        steps = (await handle.progress()).steps
        if "split-1" in steps and steps["split-1"].status.value == "waiting":
            break
        await asyncio.sleep(0.1)
    await handle.raise_budget(max_tokens=1_000_000)
    await handle.result()
    return handle


async def agent_over_budget(mixer: MixerClient) -> MixerHandle:
    """An agent step after the budget is spent (released before agent steps were gated)."""
    repo = Path(tempfile.mkdtemp())
    spec = {
        "name": "agent-over-budget",
        "dry_run": True,
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
        "budget": {"max_tokens": 1},
        "steps": [
            {"id": "plan", "prompt": "plan the change"},
            {
                "id": "code",
                "kind": "agent",
                "agent": "claude-code",
                "needs": ["plan"],
                "prompt": "do it",
                "cwd": str(repo),
            },
        ],
    }
    handle = await mixer.start(spec)
    await handle.result()
    return handle


async def checked(mixer: MixerClient) -> MixerHandle:
    """The spec checked at the start and a plan checked, each verdict recorded."""
    spec = {
        "name": "checked",
        "dry_run": True,
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
        "routes": {
            "a": [{"provider": "anthropic", "model": "claude-haiku-4-5"}],
            "b": [{"provider": "gemini", "model": "gemini-2.5-flash"}],
        },
        "steps": [
            {"id": "split", "kind": "decompose", "prompt": "Split the work"},
            {"id": "end", "needs": ["split"], "prompt": "{{steps.split.children}}"},
        ],
    }
    handle = await mixer.start(spec)
    await handle.result()
    return handle


async def invalid_spec(mixer: MixerClient) -> MixerHandle:
    """A spec refused by its check, started as the plain Temporal CLI would."""
    spec = {"name": "invalid", "steps": [{"id": "a", "prompt": "no provider anywhere"}]}
    started = await mixer.temporal.start_workflow(
        "MixerWorkflow", spec, id=f"invalid-{uuid.uuid4().hex[:8]}", task_queue=mixer.task_queue
    )
    handle = MixerHandle(mixer, started.id)
    try:
        await handle.result()
    except Exception:
        pass
    return handle


SCENARIOS: dict[str, Callable[[MixerClient], Awaitable[MixerHandle]]] = {
    "fan": fan,
    "interventions": interventions,
    "cancelled": cancelled,
    "pattern": pattern,
    "agent-over-budget": agent_over_budget,
    "checked": checked,
    "invalid-spec": invalid_spec,
}

# Stands in for Claude Code on the recording worker's PATH: the agent scenario
# needs a `claude` that answers, not a real one.
FAKE_CLAUDE = f"#!{PY}\nimport sys\nprint('DONE:', sys.argv[-1])\n"


def _worker_environ() -> dict[str, str]:
    bin_dir = Path(tempfile.mkdtemp())
    claude = bin_dir / "claude"
    claude.write_text(FAKE_CLAUDE)
    claude.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "LLMMIXER_PTY_ALLOW": "*",
    }


def _release() -> str:
    """The release being recorded, also from a source tree that was never installed."""
    if __version__ != "0.0.0":
        return __version__
    pyproject = tomllib.loads((HERE.parent.parent / "pyproject.toml").read_text())
    return str(pyproject["project"]["version"])


async def main(only: list[str]) -> None:
    binary = Path(sys.executable).parent / "temporal"
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(binary if binary.exists() else shutil.which("temporal")),
        plugins=[MixerPlugin()],
    )
    try:
        async with (
            mixer_worker(
                env.client,
                WorkerSettings(task_queue="record", shutdown_grace_s=2),
                environ=_worker_environ(),
            ) as worker,
            worker,
        ):
            mixer = MixerClient(env.client, "record")
            for name, scenario in SCENARIOS.items():
                if only and name not in only:
                    continue
                target = HERE / f"{_release()}-{name}.json"
                if target.exists():
                    print(f"keep {target.name}")
                    continue
                handle = await scenario(mixer)
                history = await handle.temporal.fetch_history()
                target.write_text(history.to_json())
                print(f"wrote {target.name} ({len(history.events)} events)")
    finally:
        await env.shutdown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
