"""Presets for ``kind: agent`` steps: CLI coding agents run non-interactively.

Each preset gives the documented headless invocation of one tool, plus
respond rules for the first-run prompts that would otherwise block a run
until its timeout (the folder-trust dialogs). The command then goes through
the same policy and runner as any ``kind: pty`` step, so
``LLMMIXER_PTY_ALLOW`` must list the tool's executable in production.

The agents authenticate with their own stored logins or with the provider
variables the worker would otherwise scrub from commands; pass the needed one
through explicitly, e.g. ``LLMMIXER_PTY_ENV_PASSTHROUGH=ANTHROPIC_API_KEY``.

Parallel agents must not edit the same checkout: ``prepare_worktree`` gives
each step its own ``git worktree`` on a fresh branch, and ``finish_worktree``
returns what the agent changed as a diff and removes both.

Errors::

    AgentNotInstalledError (a CommandRefusedError)  the tool is not on PATH
    WorktreeError                                   a git step failed
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from llmmixer.activities.contracts import RespondRule
from llmmixer.activities.terminal import CommandRefusedError

__all__ = [
    "AGENTS",
    "AgentName",
    "AgentNotInstalledError",
    "AgentPreset",
    "WorktreeError",
    "agent_command",
    "finish_worktree",
    "prepare_worktree",
]

AgentName = Literal["claude-code", "codex", "gemini-cli"]

# Enter, as a terminal sends it. The trust dialogs are select lists whose
# first, highlighted choice is "yes, trust this folder"; a cooked terminal
# turns it into "\n" for programs that read a line instead.
_ENTER = "\r"


class AgentNotInstalledError(CommandRefusedError):
    """The agent's executable is not on the worker's PATH."""


class WorktreeError(RuntimeError):
    """A git command for an agent worktree failed; the message has git's reason."""


@dataclass(frozen=True, slots=True)
class AgentPreset:
    executable: str
    install: str
    # (prompt, extra_args) -> argv after the executable
    arguments: Callable[[str, Sequence[str]], list[str]]
    respond: tuple[RespondRule, ...]


def _claude_args(prompt: str, extra: Sequence[str]) -> list[str]:
    # -p: print the answer and exit. acceptEdits: file edits need no approval
    # (each agent works in its own worktree), other tools still ask and are
    # refused headless. A later --permission-mode in extra_args wins. "--"
    # keeps a prompt that starts with "-" from being read as a flag.
    return [
        "-p",
        "--output-format",
        "text",
        "--permission-mode",
        "acceptEdits",
        *extra,
        "--",
        prompt,
    ]


def _codex_args(prompt: str, extra: Sequence[str]) -> list[str]:
    # exec: the non-interactive mode. workspace-write lets it edit the
    # worktree (the default sandbox is read-only); the git check is skipped
    # because the step's cwd may be any directory the policy allows.
    return [
        "exec",
        "--skip-git-repo-check",
        "--sandbox",
        "workspace-write",
        "--color",
        "never",
        *extra,
        "--",
        prompt,
    ]


def _gemini_args(prompt: str, extra: Sequence[str]) -> list[str]:
    # --prompt=...: headless mode; the "=" form keeps a leading "-" in the
    # prompt from being parsed as a flag. auto_edit: edits approved, like the
    # other two presets.
    return [
        "--output-format",
        "text",
        "--approval-mode",
        "auto_edit",
        *extra,
        f"--prompt={prompt}",
    ]


AGENTS: Mapping[str, AgentPreset] = MappingProxyType(
    {
        "claude-code": AgentPreset(
            executable="claude",
            install="npm install -g @anthropic-ai/claude-code",
            arguments=_claude_args,
            respond=(
                RespondRule(
                    expect=r"(?i)do you trust the files in this folder\?",
                    send=_ENTER,
                    times=1,
                ),
            ),
        ),
        "codex": AgentPreset(
            executable="codex",
            install="npm install -g @openai/codex",
            arguments=_codex_args,
            respond=(
                RespondRule(
                    expect=(
                        r"(?i)do you trust the (?:contents|files) (?:of|in) this "
                        r"(?:directory|folder)\?|allow codex to work in this folder"
                    ),
                    send=_ENTER,
                    times=1,
                ),
            ),
        ),
        "gemini-cli": AgentPreset(
            executable="gemini",
            install="npm install -g @google/gemini-cli",
            arguments=_gemini_args,
            respond=(RespondRule(expect=r"(?i)do you trust this folder\?", send=_ENTER, times=1),),
        ),
    }
)


def agent_command(
    agent: AgentName,
    prompt: str,
    extra_args: Sequence[str] = (),
    *,
    path: str | None = None,
) -> tuple[list[str], list[RespondRule]]:
    """argv and respond rules for one headless agent run.

    ``path`` is the PATH to look the executable up on (default: the worker's).
    Raises AgentNotInstalledError, saying how to install the tool, if it is
    missing: a non-retryable refusal, since retrying cannot install it.
    """
    preset = AGENTS.get(agent)
    if preset is None:
        raise ValueError(f"unknown agent {agent!r}; use one of {', '.join(AGENTS)}")
    if shutil.which(preset.executable, path=path) is None:
        raise AgentNotInstalledError(
            f"`{preset.executable}` ({agent}) is not installed on this worker: run "
            f"`{preset.install}` on the worker (or put it on the worker's PATH), then "
            "retry the step"
        )
    argv = [preset.executable, *preset.arguments(prompt, list(extra_args))]
    return argv, list(preset.respond)


# --- worktrees --------------------------------------------------------------

_BASE_FILE = "llmmixer-base"  # in the worktree's git dir: the commit it started from


async def _git(*args: str, cwd: str | Path) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
    proc = await asyncio.create_subprocess_exec(
        "git",
        *args,
        cwd=str(cwd),
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await proc.communicate()
    except BaseException:
        # Cancelled: git is short-lived, but must not outlive the step.
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        raise WorktreeError(
            f"`git {' '.join(args)}` failed in {cwd} (exit {proc.returncode}): "
            f"{err.decode(errors='replace').strip()}"
        )
    return out.decode(errors="replace")


def _branch_slug(step_id: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", step_id).strip(".-") or "step"
    return slug[:40]


async def prepare_worktree(
    repo_dir: str | Path, step_id: str, *, parent: str | Path | None = None
) -> Path:
    """A new worktree of ``repo_dir``'s HEAD on a new branch, in a temp directory.

    ``parent`` is where the temp directory goes (default: the system temp
    dir); put it under ``LLMMIXER_PTY_ROOT`` when the worker sets one, or
    the agent's cwd will be refused.
    """
    if shutil.which("git") is None:
        raise WorktreeError("git is not installed on this worker; install git to use worktrees")
    try:
        top = (await _git("rev-parse", "--show-toplevel", cwd=repo_dir)).strip()
        base = (await _git("rev-parse", "--verify", "HEAD^{commit}", cwd=top)).strip()
    except WorktreeError as exc:
        raise WorktreeError(
            f"{repo_dir} is not a git repository with at least one commit ({exc}); "
            "point the step at a committed repository"
        ) from exc
    slug = _branch_slug(step_id)
    branch = f"llmmixer/{slug}-{uuid.uuid4().hex[:8]}"
    where = Path(tempfile.mkdtemp(prefix=f"llmmixer-{slug}-", dir=parent))
    try:
        await _git("worktree", "add", "--quiet", "-b", branch, str(where), base, cwd=top)
        # Remember the start in the worktree's private git dir: it goes away
        # with the worktree, and unlike the shared config it takes no lock
        # that parallel steps would contend for.
        private = (await _git("rev-parse", "--absolute-git-dir", cwd=where)).strip()
        _write_base(Path(private, _BASE_FILE), base)
    except BaseException:
        common = (
            await _git("rev-parse", "--path-format=absolute", "--git-common-dir", cwd=top)
        ).strip()
        with contextlib.suppress(WorktreeError):
            await _remove_worktree(common, where, branch)
        raise
    return where


def _write_base(marker: Path, base: str) -> None:
    marker.write_text(base + "\n")


def _read_base(marker: Path) -> str:
    try:
        return marker.read_text().strip()
    except OSError as exc:
        raise WorktreeError(
            f"{marker.parent} was not made by prepare_worktree ({exc}); pass the path "
            "prepare_worktree returned"
        ) from exc


async def finish_worktree(path: str | Path) -> str:
    """What changed in the worktree as a ``git diff`` (new files included), then remove it.

    The diff is against the commit the worktree started from, so changes the
    agent committed on its branch count too. The worktree and its branch are
    removed even if computing the diff fails.
    """
    worktree = Path(path)
    common = (
        await _git("rev-parse", "--path-format=absolute", "--git-common-dir", cwd=worktree)
    ).strip()
    branch = (await _git("symbolic-ref", "--short", "HEAD", cwd=worktree)).strip()
    try:
        private = (await _git("rev-parse", "--absolute-git-dir", cwd=worktree)).strip()
        base = _read_base(Path(private, _BASE_FILE))
        # Staging in the worktree's own index is what lets untracked files
        # appear in the diff; the index is thrown away with the worktree.
        await _git("add", "--all", cwd=worktree)
        return await _git("diff", "--cached", "--no-color", base, cwd=worktree)
    finally:
        await _remove_worktree(common, worktree, branch)


async def _remove_worktree(common: str, worktree: Path, branch: str) -> None:
    """Remove the worktree, its directory and its branch; try every step."""
    failures: list[str] = []
    git_dir = f"--git-dir={common}"
    for args in (
        (git_dir, "worktree", "remove", "--force", str(worktree)),
        (git_dir, "worktree", "prune"),
        (git_dir, "branch", "-D", "--quiet", branch),
    ):
        try:
            await _git(*args, cwd="/")
        except WorktreeError as exc:
            failures.append(str(exc))
    shutil.rmtree(worktree, ignore_errors=True)
    if failures:
        raise WorktreeError(
            f"cleaning up worktree {worktree} left something behind: {'; '.join(failures)}; "
            f"remove it with `git worktree remove --force {worktree}` and "
            f"`git branch -D {branch}`"
        )
