"""Record workflow histories for the replay test (``tests/test_replay.py``).

Run by hand when a release changes behaviour on purpose, and commit the files:

    python tests/histories/record.py [SCENARIO ...]

Each scenario runs on a real dev server; its history is saved as JSON named
``<release>-<scenario>.json`` (a run that continued as new: one file per run,
``<release>-<scenario>-run2.json`` and on). Old files are never rewritten: they
are what runs in flight look like, and the current code must keep replaying
them; to record one again on purpose, delete it first.

Scenarios that need a fake provider or payload storage start their own worker
(``own_worker``) on a task queue of their own. Payloads kept outside history
are written under ``payloads/`` next to the histories (content-addressed, so
recording again only adds files: delete the ones the old history named);
commit them with the history that names them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import tomllib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHistory
from temporalio.testing import WorkflowEnvironment

from llmmixer import __version__
from llmmixer.client.mixer import MixerClient, MixerHandle
from llmmixer.client.setup import register_search_attributes
from llmmixer.runtime.plugin import MixerPlugin
from llmmixer.runtime.storage import build_data_converter
from llmmixer.workers.worker import WorkerSettings, mixer_worker

HERE = Path(__file__).parent
PY = sys.executable
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))  # the fake provider server, as conftest imports it
from fakes.provider_server import FakeProviderServer, Reply  # noqa: E402

# Where the payload-store scenario keeps payloads above PAYLOAD_ENV's threshold
# (the smallest allowed, so a few KB of output leave history); the replay test
# reads them from a copy of this directory.
PAYLOADS = HERE / "payloads"
PAYLOAD_ENV: Mapping[str, str] = {
    "LLMMIXER_PAYLOAD_STORE": "fs",
    "LLMMIXER_PAYLOAD_DIR": str(PAYLOADS),
    "LLMMIXER_PAYLOAD_THRESHOLD_BYTES": "1024",
}


async def until(handle: MixerHandle, step: str, status: str) -> None:
    for _ in range(300):
        progress = await handle.progress()
        if progress.steps[step].status.value == status:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{step} never became {status}")


async def until_continued(handle: MixerHandle) -> None:
    """Until the run's current execution is a continuation (it continued as new)."""
    for _ in range(300):
        history = await handle.temporal.fetch_history()
        if history.events[0].workflow_execution_started_event_attributes.continued_execution_run_id:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{handle.id} never continued as new")


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


@contextlib.asynccontextmanager
async def own_worker(
    mixer: MixerClient, environ: Mapping[str, str], client: Client | None = None
) -> AsyncIterator[MixerClient]:
    """A worker of its own (its environment, and ``client``'s converter) on a new queue."""
    client = client or mixer.temporal
    worker_environ = {**_worker_environ(), **environ}
    settings = dataclasses.replace(
        WorkerSettings.from_env(worker_environ),
        task_queue=f"record-{uuid.uuid4().hex[:8]}",
        shutdown_grace_s=2,
    )
    async with mixer_worker(client, settings, environ=worker_environ) as worker, worker:
        yield MixerClient(client, settings.task_queue)


async def approval_timers(mixer: MixerClient) -> MixerHandle:
    """An approval whose timer expires (its default applies), then one approved by update."""
    spec = {
        "name": "approval-timers",
        "steps": [
            {"id": "expire", "kind": "approval", "timeout_s": 1, "default": "approve"},
            {
                "id": "gate",
                "kind": "approval",
                "needs": ["expire"],
                "prompt": "Ship after {{steps.expire.output}}?",
                "timeout_s": 3600,
            },
            {
                "id": "last",
                "kind": "pty",
                "needs": ["gate"],
                "command": [PY, "-c", "import sys; print(sys.argv[1:])", "{{steps.gate.output}}"],
            },
        ],
    }
    handle = await mixer.start(spec)
    await until(handle, "gate", "waiting")
    await handle.approve("gate", comment="ship it")  # an update: its timer is cancelled
    await handle.result()
    return handle


async def pause_timer(mixer: MixerClient) -> MixerHandle:
    """A step fails, pauses for a person (on_failure: pause), and nobody comes in time."""
    spec = {
        "name": "pause-timer",
        "defaults": {"retry": {"max_attempts": 1}},
        "steps": [
            {"id": "first", "kind": "pty", "command": [PY, "-c", "print('ok')"]},
            {
                "id": "broken",
                "kind": "pty",
                "needs": ["first"],
                "command": [PY, "-c", "raise SystemExit(3)"],
                "on_failure": "pause",
                "pause_timeout_s": 1,
            },
        ],
    }
    handle = await mixer.start(spec)
    with contextlib.suppress(Exception):
        await handle.result()  # fails: the pause timed out
    return handle


async def pause_retried(mixer: MixerClient) -> MixerHandle:
    """A step fails and pauses with a timer; a person retries it before the timer fires."""
    marker = Path(tempfile.mkdtemp()) / "go"
    script = f"import os,sys\nif not os.path.exists({str(marker)!r}): sys.exit(1)\nprint('ok')"
    spec = {
        "name": "pause-retried",
        "defaults": {"retry": {"max_attempts": 1}, "pause_timeout_s": 3600},
        "steps": [{"id": "flaky", "kind": "pty", "command": [PY, "-c", script]}],
    }
    handle = await mixer.start(spec)
    await until(handle, "flaky", "waiting")
    marker.write_text("go")
    await handle.retry("flaky")  # an update: the pause's timer is cancelled
    await handle.result()
    return handle


async def continue_as_new(mixer: MixerClient) -> MixerHandle:
    """A run that hands over to a new run with an approval waiting, approved in the next."""
    chain = [
        {
            "id": f"c{i}",
            "needs": [f"c{i - 1}"] if i else [],
            "prompt": f"step {i} " + ("{{steps.c" + str(i - 1) + ".output}}" if i else ""),
        }
        for i in range(3)
    ]
    spec = {
        "name": "continue-as-new",
        "dry_run": True,
        "continue_as_new_after_events": 20,
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini", "retry": {"max_attempts": 1}},
        "steps": [
            *chain,
            # Waiting from the start, so the run hands it over still waiting.
            {"id": "gate", "kind": "approval"},
            {
                "id": "end",
                "needs": ["gate", "c2"],
                "prompt": "{{steps.gate.output}} {{steps.c2.output}}",
            },
        ],
    }
    handle = await mixer.start(spec)
    await until_continued(handle)
    await until(handle, "gate", "waiting")
    await handle.approve("gate", comment="carried over")
    await handle.result()
    return handle


async def fallback_circuit(mixer: MixerClient) -> MixerHandle:
    """A provider fails and the step falls back; its breaker opens, so the next call
    to it gets CircuitOpen on the worker and falls back at once."""
    server = FakeProviderServer().start()
    try:
        server.fail("openai", 503, model="gpt-4.1", message="overloaded")
        breaker = {
            # One failed call opens the breaker, for longer than the run takes.
            "LLMMIXER_BREAKER_MIN_CALLS": "1",
            "LLMMIXER_BREAKER_FAILURE_RATIO": "0.5",
            "LLMMIXER_BREAKER_COOLDOWN_S": "3600",
        }
        async with own_worker(mixer, {**server.env(), **breaker}) as own:
            spec = {
                "name": "fallback-circuit",
                "defaults": {"retry": {"max_attempts": 1}},
                "steps": [
                    {
                        "id": "first",
                        "provider": "openai",
                        "model": "gpt-4.1",
                        "prompt": "Say hello",
                        "fallback": [{"provider": "anthropic", "model": "claude-haiku-4-5"}],
                    },
                    {
                        "id": "second",
                        "needs": ["first"],
                        "provider": "openai",
                        "model": "gpt-4.1",
                        "prompt": "Again: {{steps.first.output}}",
                        "fallback": [{"provider": "gemini", "model": "gemini-2.5-flash"}],
                    },
                ],
            }
            handle = await own.start(spec)
            await handle.result()
            assert server.count("openai") == 1, "the open breaker let a call through"
            return handle
    finally:
        server.stop()


async def payload_store(mixer: MixerClient) -> MixerHandle:
    """An output above the payload threshold kept in the store, read back by the next step."""
    PAYLOADS.mkdir(exist_ok=True)
    client = Client(
        mixer.temporal.service_client,
        namespace=mixer.temporal.namespace,
        data_converter=build_data_converter(PAYLOAD_ENV),
    )
    async with own_worker(mixer, PAYLOAD_ENV, client) as own:
        # About 3 KB of varied lines: above the 1 KB threshold, far below 2 MB.
        script = "for n in range(60): print(f'line {n:03d}: the quick brown fox jumps')"
        spec = {
            "name": "payload-store",
            "dry_run": True,
            "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
            "steps": [
                {"id": "big", "kind": "pty", "command": [PY, "-c", script]},
                {"id": "sum", "needs": ["big"], "prompt": "Summarise:\\n{{steps.big.output}}"},
            ],
            "output": "{{steps.big.output}}",
        }
        handle = await own.start(spec)
        await handle.result()
        return MixerHandle(mixer, handle.id)


PLAN_REFUSED = '{"steps": [{"id": "split-1", "prompt": "x", "base_url": "http://elsewhere"}]}'
PLAN_ACCEPTED = (
    '{"steps": [{"id": "split-1", "prompt": "part one"}, {"id": "split-2", "prompt": "part two"}]}'
)


async def plan_reasked(mixer: MixerClient) -> MixerHandle:
    """The planner's first plan is refused by the plan check; asked again, its second runs."""
    server = FakeProviderServer().start()
    try:
        server.script(
            "openai",
            Reply(text=PLAN_REFUSED, usage=(10, 10)),
            Reply(text=PLAN_ACCEPTED, usage=(10, 10)),
            model="gpt-4.1",
        )
        async with own_worker(mixer, server.env()) as own:
            spec = {
                "name": "plan-reasked",
                "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
                "steps": [
                    {
                        "id": "split",
                        "kind": "decompose",
                        "provider": "openai",
                        "model": "gpt-4.1",
                        "prompt": "Split the work",
                        "retry": {"max_attempts": 2},
                    },
                    {"id": "end", "needs": ["split"], "prompt": "{{steps.split.children}}"},
                ],
            }
            handle = await own.start(spec)
            await handle.result()
            assert server.count("openai", "gpt-4.1") == 2, "the planner was not asked again"
            return handle
    finally:
        server.stop()


async def tool_loop(mixer: MixerClient) -> MixerHandle:
    """An llm step's tool loop: two calls side by side (one approved), then one rejected."""
    from fakes.provider_server import ToolUse

    server = FakeProviderServer().start()
    marker = Path(tempfile.mkdtemp()) / "written"
    try:
        server.script(
            "anthropic",
            Reply(
                tool_calls=[
                    ToolUse("shout", {"text": "hello"}, id="c1"),
                    ToolUse("write", {"path": str(marker)}, id="w1"),
                ]
            ),
            Reply(tool_calls=[ToolUse("write", {"path": str(marker)}, id="w2")]),
            Reply(text="said hello, wrote once"),
        )
        arg = {"type": "object", "properties": {"text": {"type": "string"}}}
        path = {"type": "object", "properties": {"path": {"type": "string"}}}
        async with own_worker(mixer, server.env()) as own:
            spec = {
                "name": "tool-loop",
                "steps": [
                    {
                        "id": "ask",
                        "provider": "anthropic",
                        "model": "claude-haiku-4-5",
                        "prompt": "Use the tools",
                        "max_turns": 4,
                        "tools": [
                            {
                                "kind": "command",
                                "name": "shout",
                                "parameters": arg,
                                "argv": [
                                    PY,
                                    "-c",
                                    "import sys; print(sys.argv[1].upper())",
                                    "{{args.text}}",
                                ],
                            },
                            {
                                "kind": "command",
                                "name": "write",
                                "approve": True,
                                "parameters": path,
                                "argv": [
                                    PY,
                                    "-c",
                                    "import sys; open(sys.argv[1], 'a').write('x')",
                                    "{{args.path}}",
                                ],
                            },
                        ],
                    }
                ],
            }
            handle = await own.start(spec)
            await until(handle, "ask", "waiting")
            await handle.approve("ask", comment="once")
            for _ in range(300):
                record = (await handle.progress()).steps["ask"]
                if record.tool_approval is not None and record.tool_approval.call_id == "w2":
                    break
                await asyncio.sleep(0.1)
            await handle.reject("ask", reason="only once")
            await handle.result()
            assert marker.read_text() == "x", "the approved call did not run exactly once"
            return handle
    finally:
        server.stop()


async def wait_handover(mixer: MixerClient) -> MixerHandle:
    """Twenty chained steps, then an approval: the run continues as new before it
    waits (its history is long), and the approval is given in the continuation."""
    chain = [
        {"id": f"c{i}", "needs": [f"c{i - 1}"] if i else [], "prompt": f"step {i}"}
        for i in range(20)
    ]
    spec = {
        "name": "wait-handover",
        "dry_run": True,
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini", "retry": {"max_attempts": 1}},
        "steps": [
            *chain,
            {"id": "gate", "kind": "approval", "needs": ["c19"]},
            {"id": "end", "needs": ["gate"], "prompt": "{{steps.gate.output}}"},
        ],
    }
    handle = await mixer.start(spec)
    await until_continued(handle)
    await until(handle, "gate", "waiting")
    await handle.approve("gate", comment="woken from a short history")
    await handle.result()
    return handle


# Longer than workflows.search.SEARCH_REFRESH, so the run's cost and tokens
# are refreshed while it runs.
NAP_S = 61


async def search_upserts(mixer: MixerClient) -> MixerHandle:
    """Search attributes on a namespace that has them (the others were recorded without).

    Written at the start, refreshed once a step ends a minute later, written
    when the approval waits, brought up to date before continuing as new, and
    at the end.
    """
    await register_search_attributes(mixer.temporal, mixer.temporal.namespace)
    spec = {
        "name": "search-upserts",
        "dry_run": True,
        # Reached when c1 ends: the run hands over before it starts the gate.
        "continue_as_new_after_events": 32,
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini", "retry": {"max_attempts": 1}},
        "steps": [
            {"id": "c0", "prompt": "first"},
            {
                "id": "nap",
                "kind": "pty",
                "needs": ["c0"],
                "command": [PY, "-c", f"import time; time.sleep({NAP_S})"],
            },
            {"id": "c1", "needs": ["nap"], "prompt": "a minute later"},
            {"id": "gate", "kind": "approval", "needs": ["c1"]},
            {"id": "c2", "needs": ["gate"], "prompt": "{{steps.gate.output}}"},
        ],
    }
    handle = await mixer.start(spec)
    await asyncio.sleep(NAP_S)
    await until(handle, "gate", "waiting")
    await until_continued(handle)
    await until(handle, "gate", "waiting")
    await handle.approve("gate", comment="carried over")
    await handle.result()
    return handle


SCENARIOS: dict[str, Callable[[MixerClient], Awaitable[MixerHandle]]] = {
    "fan": fan,
    "interventions": interventions,
    "cancelled": cancelled,
    "pattern": pattern,
    "agent-over-budget": agent_over_budget,
    "checked": checked,
    "invalid-spec": invalid_spec,
    "approval-timers": approval_timers,
    "pause-timer": pause_timer,
    "pause-retried": pause_retried,
    "continue-as-new": continue_as_new,
    "fallback-circuit": fallback_circuit,
    "payload-store": payload_store,
    "tool-loop": tool_loop,
    "plan-reasked": plan_reasked,
    "wait-handover": wait_handover,
    "search-upserts": search_upserts,
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


async def runs(handle: MixerHandle) -> list[WorkflowHistory]:
    """The history of every run of ``handle``'s workflow, first to last."""
    histories = [await handle.temporal.fetch_history()]
    while True:
        started = histories[0].events[0]
        assert started.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED
        before = started.workflow_execution_started_event_attributes.continued_execution_run_id
        if not before:
            return histories
        earlier = handle.mixer.temporal.get_workflow_handle(handle.id, run_id=before)
        histories.insert(0, await earlier.fetch_history())


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
                for number, history in enumerate(await runs(handle), start=1):
                    path = target.with_stem(f"{target.stem}-run{number}") if number > 1 else target
                    path.write_text(history.to_json())
                    print(f"wrote {path.name} ({len(history.events)} events)")
    finally:
        await env.shutdown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
