"""`kind: agent` steps: CLI coding agents as presets over the PTY runner, in a workflow."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from fakes.progress import until, waiting

from llmmixer.client.mixer import MixerClient
from llmmixer.workflows.records import StepStatus

FAKE_CLAUDE = f"""#!{sys.executable}
import pathlib, sys
answer = input("Do you trust the files in this folder? (y/n) ")
pathlib.Path("agent-was-here.txt").write_text("prompt: " + sys.argv[-1] + "\\n")
print("trusted" if answer is not None else "?")
print("DONE:", sys.argv[-1])
"""


@pytest.fixture
def agent_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("claude",):
        script = bin_dir / name
        script.write_text(FAKE_CLAUDE)
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


@pytest.fixture
def worker_env(agent_bin: Path, tmp_path: Path) -> dict[str, str]:
    return {
        "PATH": f"{agent_bin}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "LLMMIXER_PTY_ALLOW": "claude,codex,gemini",
        # The fake agent asks whether to trust the folder; the operator says yes.
        "LLMMIXER_AGENT_TRUST_FOLDERS": "1",
    }


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    for args in (
        ["init", "-q"],
        [
            "-c",
            "user.email=t@t",
            "-c",
            "user.name=t",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "start",
        ],
    ):
        subprocess.run(["git", *args], cwd=path, check=True)
    return path


def _worktrees(repo: Path) -> list[str]:
    listing = subprocess.run(
        ["git", "worktree", "list"], cwd=repo, capture_output=True, text=True, check=True
    )
    return listing.stdout.strip().splitlines()


async def test_agent_step_answers_the_trust_prompt_and_returns_its_diff(
    mixer: MixerClient, repo: Path
) -> None:
    spec = {
        "name": "agent",
        "inputs": {"task": "add a file"},
        "steps": [
            {
                "id": "code",
                "kind": "agent",
                "agent": "claude-code",
                "prompt": "{{inputs.task}}",
                "cwd": str(repo),
                "worktree": True,
            }
        ],
    }
    result = await (await mixer.start(spec)).result()
    record = result.steps["code"]
    assert record.status == StepStatus.COMPLETED
    output = record.output or ""
    assert "DONE: add a file" in output
    assert "--- changes ---" in output and "agent-was-here.txt" in output
    assert "+prompt: add a file" in output
    # the agent worked in its own worktree: the checkout itself is untouched
    assert not (repo / "agent-was-here.txt").exists()
    assert len(_worktrees(repo)) == 1, "the worktree was not cleaned up"


async def test_a_missing_agent_says_how_to_install_it(mixer: MixerClient, repo: Path) -> None:
    spec = {
        "name": "agent",
        "defaults": {"on_failure": "fail"},
        "steps": [
            {"id": "code", "kind": "agent", "agent": "codex", "prompt": "x", "cwd": str(repo)}
        ],
    }
    handle = await mixer.start(spec)
    from llmmixer.client.mixer import RunFailed

    with pytest.raises(RunFailed, match="npm install -g @openai/codex"):
        await handle.result()
    progress = await handle.progress()
    assert progress.steps["code"].attempts == 1  # not retried: retrying cannot install it


async def test_a_spent_budget_holds_an_agent_step_until_it_is_raised(
    mixer: MixerClient, repo: Path
) -> None:
    spec = {
        "name": "agent-budget",
        "budget": {"max_tokens": 1},
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
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
    handle = await mixer.start(spec, dry_run=True)  # the LLM step offline, the agent for real
    held = await until(handle, waiting("code"), "the agent step held by the budget")
    assert (held.steps["code"].waiting_reason or "").startswith("budget: ")
    assert not (repo / "agent-was-here.txt").exists(), "the agent ran despite the spent budget"

    await handle.raise_budget(max_tokens=100_000)
    result = await handle.result()
    assert result.steps["code"].status == StepStatus.COMPLETED
    assert "DONE: do it" in (result.steps["code"].output or "")
    assert (repo / "agent-was-here.txt").exists()
