"""CLI agent presets against fake ``claude``/``codex``/``gemini`` programs, and worktrees."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmmixer.activities.agents import (
    AGENTS,
    AgentName,
    AgentNotInstalledError,
    AgentSettings,
    agent_command,
    finish_worktree,
    prepare_worktree,
)
from llmmixer.activities.terminal.child import TerminalMode
from llmmixer.activities.terminal.mode import probe_pty
from llmmixer.activities.terminal.policy import CommandPolicy
from llmmixer.activities.terminal.runner import run_command
from llmmixer.core.contracts import CommandCall

pytestmark = pytest.mark.timeout(60)

TRUST_PROMPTS: dict[str, str] = {
    "claude-code": "Do you trust the files in this folder?\\n\\n 1. Yes, proceed\\n 2. No, exit",
    "codex": "Do you trust the contents of this directory?\\n > 1. Yes, continue",
    "gemini-cli": "Do you trust this folder?\\n  1. Trust folder\\n  2. Don't trust",
}

# Prints its trust dialog, waits for a key, then answers with its argv so the
# test can check the flags. Reads raw bytes: Enter is "\r" on a pipe and "\n"
# through a cooked pty, and either must count.
FAKE_AGENT = """#!{python}
import json, os, sys
sys.stdout.write("\\x1b[1m{prompt}\\x1b[0m\\n> ")
sys.stdout.flush()
key = os.read(0, 64)
print("TRUSTED" if key.strip() == b"" and key else "WRONG KEY %r" % key)
print("ARGV " + json.dumps(sys.argv[1:]))
"""


@pytest.fixture
def fake_agents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for agent, preset in AGENTS.items():
        program = bin_dir / preset.executable
        program.write_text(
            FAKE_AGENT.replace("{python}", sys.executable).replace("{prompt}", TRUST_PROMPTS[agent])
        )
        program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


MODES: list[TerminalMode] = ["pty", "pipe"] if probe_pty() is None else ["pipe"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("agent", list(AGENTS))
async def test_preset_answers_the_trust_prompt_when_the_operator_trusts_folders(
    fake_agents: Path, agent: AgentName, mode: TerminalMode
) -> None:
    prompt = "-fix the failing test"  # a leading dash must stay a prompt, not a flag
    argv, respond = agent_command(
        agent, prompt, ["--model", "m1"], settings=AgentSettings(trust_folders=True)
    )
    call = CommandCall(workflow_id="wf", step_id="agent", argv=argv, respond=respond, timeout_s=15)
    policy = CommandPolicy.from_env({**os.environ, "LLMMIXER_PTY_ALLOW": "claude,codex,gemini"})
    prepared = policy.prepare(call)
    outcome = await run_command(
        call, mode=mode, env=prepared.env, cwd=prepared.cwd, executable=prepared.executable
    )
    assert not outcome.timed_out, outcome.output
    assert outcome.exit_code == 0, outcome.output
    assert "TRUSTED" in outcome.output
    args = json.loads(outcome.output.split("ARGV ", 1)[1].splitlines()[0])
    assert "--model" in args and "m1" in args
    if agent == "claude-code":
        assert args[0] == "-p" and args[-2:] == ["--", prompt]
        assert args[args.index("--output-format") + 1] == "text"
        assert "--setting-sources" not in args  # trusted: the tool's own defaults
    elif agent == "codex":
        assert args[0] == "exec" and args[-2:] == ["--", prompt]
    else:
        assert args[-1] == f"--prompt={prompt}"


@pytest.mark.parametrize("agent", list(AGENTS))
async def test_nobody_answers_the_trust_prompt_unless_the_operator_trusts_folders(
    fake_agents: Path, agent: AgentName
) -> None:
    # Trusting a folder lets its own agent config (hooks, MCP servers) run
    # commands LLMMIXER_PTY_ALLOW never sees: a worker setting, not a default.
    argv, respond = agent_command(agent, "fix it")
    assert respond == []
    if agent == "claude-code":  # -p never asks: it must be told to ignore the checkout's config
        assert argv[argv.index("--setting-sources") + 1] == "user"
        assert "--strict-mcp-config" in argv
    call = CommandCall(workflow_id="wf", step_id="agent", argv=argv, respond=respond, timeout_s=10)
    policy = CommandPolicy.from_env({**os.environ, "LLMMIXER_PTY_ALLOW": "claude,codex,gemini"})
    prepared = policy.prepare(call)
    outcome = await run_command(
        call, mode="pipe", env=prepared.env, cwd=prepared.cwd, executable=prepared.executable
    )
    assert "TRUSTED" not in outcome.output
    assert "WRONG KEY b''" in outcome.output  # no input: nobody said yes


@pytest.mark.parametrize(
    ("agent", "install"),
    [
        ("claude-code", "npm install -g @anthropic-ai/claude-code"),
        ("codex", "npm install -g @openai/codex"),
        ("gemini-cli", "npm install -g @google/gemini-cli"),
    ],
)
def test_missing_agent_says_how_to_install_it(
    agent: AgentName, install: str, tmp_path: Path
) -> None:
    with pytest.raises(AgentNotInstalledError) as missing:
        agent_command(agent, "hello", [], path=str(tmp_path))
    assert install in str(missing.value)
    assert "is not installed on this worker" in str(missing.value)


def test_unknown_agent_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="claude-code, codex, gemini-cli"):
        agent_command("aider", "hi", [])  # type: ignore[arg-type]


# --- worktrees --------------------------------------------------------------

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var, value in {
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }.items():
        monkeypatch.setenv(var, value)
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "--quiet")
    (path / "app.py").write_text("print('v1')\n")
    git(path, "add", "app.py")
    git(path, "commit", "--quiet", "-m", "initial")
    return path


@needs_git
async def test_worktree_isolates_agents_and_returns_their_diff(repo: Path, tmp_path: Path) -> None:
    parent = tmp_path / "worktrees"
    parent.mkdir()
    policy = CommandPolicy.from_env({**os.environ, "LLMMIXER_PTY_ROOT": str(tmp_path)})
    first, second = await asyncio.gather(
        prepare_worktree(str(repo), "fix tests", policy, parent=parent),
        prepare_worktree(str(repo), "write docs", policy, parent=parent),
    )
    assert first.path != second.path and first.path.parent == parent
    assert (first.path / "app.py").read_text() == "print('v1')\n"
    branches = git(
        repo, "for-each-ref", "--format=%(refname:short)", "refs/heads/llmmixer/"
    ).split()
    assert len(branches) == 2 and any("fix-tests" in name for name in branches)

    (first.path / "app.py").write_text("print('v2')\n")
    (first.path / "new_module.py").write_text("ANSWER = 42\n")
    (second.path / "README.md").write_text("docs\n")
    git(second.path, "add", "README.md")
    git(second.path, "commit", "--quiet", "-m", "agent commit")

    diff = await finish_worktree(first)
    assert "-print('v1')" in diff and "+print('v2')" in diff
    assert "new_module.py" in diff and "+ANSWER = 42" in diff
    assert "README.md" not in diff

    committed = await finish_worktree(second)
    assert "README.md" in committed and "+docs" in committed  # committed changes count

    assert not first.path.exists() and not second.path.exists()
    assert git(repo, "branch", "--list", "llmmixer/*").strip() == ""
    assert len(git(repo, "worktree", "list").splitlines()) == 1
    assert git(repo, "status", "--porcelain") == ""  # the main checkout was never touched
    assert (repo / "app.py").read_text() == "print('v1')\n"


@needs_git
async def test_worktree_needs_a_committed_repository(tmp_path: Path) -> None:
    from llmmixer.activities.agents import WorktreeError

    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "--quiet")
    with pytest.raises(WorktreeError, match="at least one commit"):
        await prepare_worktree(str(empty), "s", CommandPolicy())
