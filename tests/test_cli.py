"""The `llmmixer` command line as a user runs it: exit codes, messages, the embedded start."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from llmmixer.runtime.address import free_port

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "hello.yaml"


def llmmixer(
    *args: str, env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmmixer.client.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def base_env(tmp_path: Path, address: str) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "LLMMIXER_HOME": str(tmp_path / "home"),
        "TEMPORAL_ADDRESS": address,
    }


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_validate_prints_one_error_per_line_and_exits_2(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "name: bad\nsteps:\n  - id: a\n    kind: nope\n  - id: b\n    needs: [zz]\n"
        "    provider: openai\n    model: m\n    prompt: hi\n"
    )
    done = llmmixer("validate", str(spec), env=base_env(tmp_path, "127.0.0.1:1"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "step a: kind: unknown kind 'nope': use one of llm, pty, approval, decompose, agent",
        "step b: needs.0: unknown step 'zz': use one of a, b",
    ]
    good = llmmixer("validate", str(EXAMPLE), env=base_env(tmp_path, "127.0.0.1:1"))
    assert good.returncode == 0 and "valid (4 steps)" in good.stdout


def test_validate_warns_when_a_cost_budget_cannot_count_a_model(tmp_path: Path) -> None:
    spec = tmp_path / "budgeted.yaml"
    spec.write_text(
        "name: budgeted\n"
        "budget: {max_cost_usd: 1.0}\n"
        "defaults: {provider: openai, model: gpt-4.1-mini}\n"
        "steps:\n"
        "  - {id: a, prompt: hi}\n"
        "  - {id: b, prompt: hi, fallback: [{provider: anthropic, model: claude-unreleased-9}]}\n"
    )
    done = llmmixer("validate", str(spec), env=base_env(tmp_path, "127.0.0.1:1"))
    # Still valid: the run can go ahead, and the owner knows what is not counted.
    assert done.returncode == 0 and "valid (2 steps)" in done.stdout
    assert done.stderr.strip().splitlines() == [
        "warning: anthropic/claude-unreleased-9 has no price in llmmixer's price table "
        "(llmmixer/activities/prices.toml), so max_cost_usd does not limit what it spends: "
        "add its price there, or set a max_tokens budget as well"
    ]
    spec.write_text(
        spec.read_text().replace("budget: {max_cost_usd: 1.0}", "budget: {max_tokens: 9}")
    )
    quiet = llmmixer("validate", str(spec), env=base_env(tmp_path, "127.0.0.1:1"))
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_run_starts_the_embedded_server_and_leaves_nothing_behind(tmp_path: Path) -> None:
    port = free_port()
    env = base_env(tmp_path, f"127.0.0.1:{port}")
    done = llmmixer("run", str(EXAMPLE), "--dry-run", "--id", "hello-embedded", env=env)
    assert done.returncode == 0, done.stderr
    assert "starting the embedded Temporal server" in done.stderr
    # stdout carries only the run's output; progress went to stderr as plain lines
    assert done.stdout.startswith("[dry-run] openai/gpt-4.1 answered step merge")
    assert "[completed] merge" in done.stderr
    assert (tmp_path / "home" / "temporal.db").exists()
    assert not listening(port), "the embedded server outlived the command"
    leftovers = subprocess.run(
        ["pgrep", "-f", str(tmp_path / "home")], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout.strip() == ""


def test_run_exits_3_with_the_commands_to_unblock_a_waiting_run(tmp_path: Path) -> None:
    spec = tmp_path / "gate.yaml"
    spec.write_text("name: gate\nsteps:\n  - id: ok\n    kind: approval\n    prompt: Ship?\n")
    port = free_port()
    done = llmmixer("run", str(spec), "--id", "gate-1", env=base_env(tmp_path, f"127.0.0.1:{port}"))
    assert done.returncode == 3, done.stderr
    assert "llmmixer approve gate-1 ok" in done.stderr
    assert "llmmixer reject gate-1 ok" in done.stderr
    assert not listening(port)


def test_a_non_loopback_address_that_does_not_answer_is_an_error(tmp_path: Path) -> None:
    env = base_env(tmp_path, "temporal.invalid:7233")
    done = llmmixer("run", str(EXAMPLE), "--dry-run", env=env)
    assert done.returncode == 1
    assert "nothing answers at TEMPORAL_ADDRESS=temporal.invalid:7233" in done.stderr
    assert not (tmp_path / "home" / "temporal.db").exists()


def test_detach_needs_a_running_server(tmp_path: Path) -> None:
    env = base_env(tmp_path, f"127.0.0.1:{free_port()}")
    done = llmmixer("run", str(EXAMPLE), "--dry-run", "--detach", env=env)
    assert done.returncode == 1
    assert "llmmixer dev" in done.stderr


def test_invalid_spec_in_run_exits_2_before_anything_starts(tmp_path: Path) -> None:
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps({"name": "x", "steps": [{"id": "a", "kind": "llm"}]}))
    port = free_port()
    done = llmmixer("run", str(spec), env=base_env(tmp_path, f"127.0.0.1:{port}"))
    assert done.returncode == 2
    assert "step a: provider: no provider" in done.stderr
    assert not (tmp_path / "home").exists() or not (tmp_path / "home" / "temporal.db").exists()


@pytest.fixture
def server_env(env: WorkflowEnvironment, tmp_path: Path, task_queue: str) -> dict[str, Any]:
    environ = base_env(tmp_path, env.client.service_client.config.target_host)
    environ["LLMMIXER_TASK_QUEUE"] = task_queue
    return environ


def test_detach_status_list_and_cancel_against_a_server(server_env: dict[str, str]) -> None:
    spec = Path(server_env["HOME"]) / "slow.yaml"
    spec.write_text(
        "name: slow\nsteps:\n  - id: gate\n    kind: approval\n"
        "  - id: after\n    kind: pty\n    needs: [gate]\n    command: [echo, hi]\n"
    )
    started = llmmixer("run", str(spec), "--detach", "--id", "slow-1", env=server_env)
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == "slow-1"
    listing = llmmixer("list", env=server_env)
    assert listing.returncode == 0 and "slow-1\trunning" in listing.stdout
    cancelled = llmmixer("cancel", "slow-1", env=server_env)
    assert cancelled.returncode == 0, cancelled.stderr


async def test_raise_budget_from_the_command_line(server_env: dict[str, str], mixer: Any) -> None:
    spec = {
        "name": "budgeted",
        "dry_run": True,
        "budget": {"max_tokens": 1},
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
        "steps": [
            {"id": "first", "prompt": "spend some tokens"},
            {"id": "second", "needs": ["first"], "prompt": "then more"},
        ],
    }
    handle = await mixer.start(spec, workflow_id="budgeted-1")
    for _ in range(100):
        progress = await handle.progress()
        if progress.steps["second"].status.value == "waiting":
            break
        await asyncio.sleep(0.1)
    status = await asyncio.to_thread(llmmixer, "status", "budgeted-1", env=server_env)
    assert "llmmixer raise-budget budgeted-1 --max-tokens NEW_LIMIT" in status.stdout
    usage = await asyncio.to_thread(llmmixer, "raise-budget", "budgeted-1", env=server_env)
    assert usage.returncode == 2 and "--max-tokens" in usage.stderr
    raised = await asyncio.to_thread(
        llmmixer, "raise-budget", "budgeted-1", "--max-tokens", "100000", env=server_env
    )
    assert raised.returncode == 0, raised.stderr
    assert "raised the spec's budget: max_tokens 100000" in raised.stdout
    result = await handle.result()
    assert result.steps["second"].status.value == "completed"


def test_doctor_reports_configuration_without_printing_secrets(tmp_path: Path) -> None:
    env = base_env(tmp_path, f"127.0.0.1:{free_port()}")
    env.update(
        OPENAI_API_KEY="sk-doctor-marker-0123456789",
        TEMPORAL_API_KEY="temporal-doctor-marker-0123",
        LLMMIXER_PAYLOAD_KEY="",
    )
    done = llmmixer("doctor", "--json", env=env)
    assert done.returncode == 0, done.stderr
    checks = {item["check"]: item for item in json.loads(done.stdout)}
    assert checks["temporal CLI"]["ok"] is True
    assert checks["provider openai"]["ok"] is True
    assert "OPENAI_API_KEY set" in checks["provider openai"]["detail"]
    assert checks["provider anthropic"]["ok"] is False
    assert "ANTHROPIC_API_KEY NOT set" in checks["provider anthropic"]["detail"]
    assert "embedded server" in checks["temporal server"]["detail"]
    assert "off" in checks["telemetry"]["detail"]
    assert "marker" not in done.stdout + done.stderr


def test_doctor_reports_the_effective_security_settings(tmp_path: Path) -> None:
    env = base_env(tmp_path, f"127.0.0.1:{free_port()}")
    env.update(
        LLMMIXER_PTY_ALLOW="git,pytest",
        LLMMIXER_ALLOWED_BASE_URLS="http://localhost:11434",
        LLMMIXER_API_TOKEN="short-marker",
    )
    done = llmmixer("doctor", "--json", env=env)
    checks = {item["check"]: item for item in json.loads(done.stdout)}
    assert checks["commands"]["detail"].startswith("only git, pytest (LLMMIXER_PTY_ALLOW)")
    assert "http://localhost:11434" in checks["step base URLs"]["detail"]
    # A token serve would refuse is reported, and never printed.
    assert checks["serve"]["ok"] is False
    assert "at least 16" in checks["serve"]["detail"]
    assert "short-marker" not in done.stdout + done.stderr

    env.pop("LLMMIXER_PTY_ALLOW")
    env.pop("LLMMIXER_API_TOKEN")
    done = llmmixer("doctor", "--json", env=env)
    checks = {item["check"]: item for item in json.loads(done.stdout)}
    assert "`llmmixer worker` runs none" in checks["commands"]["detail"]
    assert "loopback only" in checks["serve"]["detail"]
