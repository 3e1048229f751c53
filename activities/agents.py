"""Presets for ``kind: agent`` steps: CLI coding agents run non-interactively.

Each preset gives the documented headless invocation of one tool. The command
then goes through the same policy and runner as any ``kind: pty`` step, so
``LLMMIXER_PTY_ALLOW`` must list the tool's executable in production, the
step's ``cwd`` must lie inside ``LLMMIXER_PTY_ROOT``, and the agent gets the
command environment the worker gives every command.

The agents authenticate with their own stored logins or with the provider
variables the worker would otherwise scrub from commands; pass the needed one
through explicitly, e.g. ``LLMMIXER_PTY_ENV_PASSTHROUGH=ANTHROPIC_API_KEY``.

What an agent may do is the worker operator's choice, never a spec's or a
plan's. Two worker settings widen it (both off unless set to ``1``)::

    LLMMIXER_AGENT_TRUST_FOLDERS     answer the tools' "trust this folder?" dialog
                                     with yes and let them load the checkout's own
                                     agent configuration (.claude/settings.json
                                     hooks, .mcp.json servers, ...), which runs
                                     commands LLMMIXER_PTY_ALLOW never sees. Off:
                                     nobody answers the dialog, and Claude Code
                                     loads only the worker user's settings
                                     (--setting-sources user --strict-mcp-config).
                                     Codex loads a checkout's .codex/ only for
                                     projects trusted in the worker user's
                                     config. Recent Gemini CLI versions refuse
                                     to run headless in an untrusted folder (on:
                                     GEMINI_CLI_TRUST_WORKSPACE=true is set for
                                     them); older ones load .gemini/ settings
                                     unless the worker user's settings enable
                                     security.folderTrust. Also lets a step's
                                     args say --trust (codex) or --skip-trust
                                     (gemini).
    LLMMIXER_AGENT_SKIP_PERMISSIONS  let a step's ``args`` lift the agent's own
                                     limits: skip its permission prompts or
                                     sandbox (--dangerously-skip-permissions,
                                     --yolo, --full-auto, ...), load settings,
                                     config overrides or MCP servers, or work in
                                     directories besides its cwd. Off: such args
                                     are refused (non-retryable) before anything
                                     runs.

A step's ``env`` may not point an agent at other configuration (``HOME``,
``CLAUDE_CONFIG_DIR``, ``CODEX_HOME``, ...); set those on the worker.

Parallel agents must not edit the same checkout: ``prepare_worktree`` gives
each step its own ``git worktree`` on a fresh branch, and ``finish_worktree``
returns what the agent changed as a diff and removes both. The repository is
found from the step's cwd and must lie inside ``LLMMIXER_PTY_ROOT`` too.
llmmixer's own git calls never run repository hooks, fsmonitor, filter or
diff programs, read no system or user git config, get the scrubbed command
environment, and name the git directory recorded before the agent started:
whatever the agent writes into its checkout (a ``.git`` file pointing
elsewhere, ``core.fsmonitor`` in the shared config) runs nothing afterwards.
Filter drivers (e.g. git-lfs) are therefore not applied: such files appear
in the worktree and diff as stored in git. Without the user's git config, a
``safe.directory`` listed there does not apply either: the repository must be
owned by the worker's user.

Errors::

    AgentNotInstalledError (a CommandRefusedError)  the tool is not on PATH
    AgentArgsRefusedError (a CommandRefusedError)   args/env a spec may not set
    CommandRefusedError                             cwd or repository outside
                                                    LLMMIXER_PTY_ROOT
    WorktreeError                                   a git step failed
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from llmmixer.activities.terminal.errors import CommandRefusedError
from llmmixer.activities.terminal.policy import ENV_ROOT, CommandPolicy
from llmmixer.core.contracts import AgentCall, CommandCall, RespondRule
from llmmixer.runtime.settings import AgentEnv, SettingsError

__all__ = [
    "AGENTS",
    "ENV_AGENT_SKIP_PERMISSIONS",
    "ENV_AGENT_TRUST_FOLDERS",
    "AgentArgsRefusedError",
    "AgentLaunch",
    "AgentName",
    "AgentNotInstalledError",
    "AgentPreset",
    "AgentSettings",
    "Worktree",
    "WorktreeError",
    "agent_command",
    "check_agent_args",
    "finish_worktree",
    "prepare_agent",
    "prepare_worktree",
]

AgentName = Literal["claude-code", "codex", "gemini-cli"]

ENV_AGENT_TRUST_FOLDERS = "LLMMIXER_AGENT_TRUST_FOLDERS"
ENV_AGENT_SKIP_PERMISSIONS = "LLMMIXER_AGENT_SKIP_PERMISSIONS"

# Enter, as a terminal sends it. The trust dialogs are select lists whose
# first, highlighted choice is "yes, trust this folder"; a cooked terminal
# turns it into "\n" for programs that read a line instead.
_ENTER = "\r"


class AgentNotInstalledError(CommandRefusedError):
    """The agent's executable is not on the worker's PATH."""


class AgentArgsRefusedError(CommandRefusedError):
    """A step's args or env would widen what the agent may do; only the operator can."""


class WorktreeError(RuntimeError):
    """A git command for an agent worktree failed; the message has git's reason."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentSettings:
    """The operator's choices for agents; see the module docstring."""

    trust_folders: bool = False
    skip_permissions: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AgentSettings:
        """Read the ``LLMMIXER_AGENT_*`` settings; a bad value is a CommandRefusedError."""
        try:
            flags = AgentEnv.from_env(environ)
        except SettingsError as error:
            # Read again for each agent step: refuse the step, do not retry it.
            raise CommandRefusedError(str(error)) from None
        return cls(trust_folders=flags.trust_folders, skip_permissions=flags.skip_permissions)


# --- flags a spec may not pass ------------------------------------------------


def _norm(text: str) -> str:
    # Option parsers accept --allowed-tools, --allowedTools and --allowed_tools
    # alike (yargs expands camel case); compare what they all mean.
    return text.lower().replace("-", "").replace("_", "")


def _always(_: Sequence[str]) -> bool:
    return True


def _value_is(*bad: str) -> Callable[[Sequence[str]], bool]:
    wanted = frozenset(_norm(value) for value in bad)

    def check(values: Sequence[str]) -> bool:
        return any(_norm(part) in wanted for value in values for part in value.split(","))

    return check


def _value_mentions(word: str) -> Callable[[Sequence[str]], bool]:
    def check(values: Sequence[str]) -> bool:
        return any(word in value.lower() for value in values)

    return check


def _not_only_user(values: Sequence[str]) -> bool:
    sources = {_norm(part) for value in values for part in value.split(",") if part.strip()}
    return sources != {"user"}


@dataclass(frozen=True, slots=True)
class _UnsafeFlag:
    long: tuple[str, ...]  # without the leading "--"
    short: str  # single-letter forms, case-sensitive
    why: str
    # Whether the flag's values (those glued with "=" or the tokens that follow
    # up to the next option) make it unsafe; most flags are unsafe outright.
    refuses: Callable[[Sequence[str]], bool] = _always
    # A short form that takes a value can only start a group of short options
    # (-sdanger-full-access); later letters of a group may be another
    # option's glued value (-mgpt-5-codex is not -c).
    takes_value: bool = True
    # The worker setting that lets a spec pass it.
    allowed_by: str = ENV_AGENT_SKIP_PERMISSIONS


_LEAVES_CWD = "lets the agent work in directories besides its cwd; set the step's cwd instead"
_TRUSTS_CHECKOUT = "trusts the checkout's own agent configuration (hooks, MCP servers)"

_UNSAFE_FLAGS: Mapping[str, tuple[_UnsafeFlag, ...]] = MappingProxyType(
    {
        "claude-code": (
            _UnsafeFlag(
                ("dangerously-skip-permissions", "allow-dangerously-skip-permissions"),
                "",
                "turns off Claude Code's permission checks",
            ),
            _UnsafeFlag(
                ("permission-mode",),
                "",
                "bypassPermissions turns off Claude Code's permission checks",
                _value_is("bypassPermissions"),
            ),
            _UnsafeFlag(
                ("allowed-tools",),
                "",
                "lets the agent run shell commands without asking",
                _value_mentions("bash"),
            ),
            _UnsafeFlag(
                ("settings", "plugin-dir"),
                "",
                "loads settings or plugins (hooks, permission rules) the operator did not choose",
            ),
            _UnsafeFlag(
                ("setting-sources",),
                "",
                "loads the checkout's own settings (hooks, permission rules)",
                _not_only_user,
            ),
            _UnsafeFlag(("mcp-config",), "", "starts the MCP server commands it names"),
            _UnsafeFlag(("add-dir",), "", _LEAVES_CWD),
        ),
        "codex": (
            _UnsafeFlag(
                ("dangerously-bypass-approvals-and-sandbox", "yolo"),
                "",
                "runs every command without sandbox or approval",
            ),
            _UnsafeFlag(("full-auto",), "", "runs commands without asking"),
            _UnsafeFlag(
                ("sandbox",),
                "s",
                "danger-full-access turns off Codex's sandbox",
                _value_is("danger-full-access"),
            ),
            _UnsafeFlag(
                ("config",),
                "c",
                "overrides Codex's configuration (sandbox, approvals, MCP servers, notify "
                "commands)",
            ),
            _UnsafeFlag(("cd", "add-dir"), "C", _LEAVES_CWD),
            _UnsafeFlag(
                ("trust",),
                "",
                _TRUSTS_CHECKOUT,
                takes_value=False,
                allowed_by=ENV_AGENT_TRUST_FOLDERS,
            ),
        ),
        "gemini-cli": (
            _UnsafeFlag(
                ("yolo",),
                "y",
                "approves every tool call, shell commands included",
                takes_value=False,
            ),
            _UnsafeFlag(
                ("approval-mode",),
                "",
                "yolo approves every tool call, shell commands included",
                _value_is("yolo"),
            ),
            _UnsafeFlag(
                ("allowed-tools",),
                "",
                "lets the agent run shell commands without asking",
                _value_mentions("shell"),
            ),
            _UnsafeFlag(("include-directories",), "", _LEAVES_CWD),
            _UnsafeFlag(
                ("skip-trust",),
                "",
                _TRUSTS_CHECKOUT,
                takes_value=False,
                allowed_by=ENV_AGENT_TRUST_FOLDERS,
            ),
        ),
    }
)

# Variables that point an agent at configuration (permission rules, hooks, MCP
# servers, folder trust) other than the worker user's; a spec must not choose.
_CONFIG_VARIABLES = frozenset(
    {
        "HOME",
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
        "CLAUDE_CONFIG_DIR",
        "CODEX_HOME",
        "GEMINI_CLI_HOME",
        "GEMINI_CLI_SYSTEM_SETTINGS_PATH",
        "GEMINI_CLI_SYSTEM_DEFAULTS_PATH",
        "GEMINI_CLI_TRUSTED_FOLDERS_PATH",
    }
)
# Variables that make an agent trust the checkout: the trust setting's business.
_TRUST_VARIABLES = frozenset({"GEMINI_CLI_TRUST_WORKSPACE", "GEMINI_TRUST_WORKSPACE"})


def _values_after(args: Sequence[str], index: int, glued: str | None) -> list[str]:
    if glued is not None:
        return [glued]
    values: list[str] = []
    for token in args[index + 1 :]:
        if token.startswith("-"):
            break
        values.append(token)
    return values


def _unsafe_arg(
    agent: str, args: Sequence[str], settings: AgentSettings
) -> tuple[str, _UnsafeFlag] | None:
    """The first token in ``args`` that lifts the agent's limits, and why."""
    allowed = {
        ENV_AGENT_SKIP_PERMISSIONS: settings.skip_permissions,
        ENV_AGENT_TRUST_FOLDERS: settings.trust_folders,
    }
    flags = [flag for flag in _UNSAFE_FLAGS.get(agent, ()) if not allowed[flag.allowed_by]]
    by_long = {_norm(name): flag for flag in flags for name in flag.long}
    by_short = {letter: flag for flag in flags for letter in flag.short}
    for index, token in enumerate(args):
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            flag = by_long.get(_norm(name))
            if flag is not None and flag.refuses(_values_after(args, index, value if eq else None)):
                return token, flag
        elif token.startswith("-") and len(token) > 1:
            # Grouped short options (-dy, -sdanger-full-access). A letter that
            # only looks like -y inside another option's glued value is
            # refused too; the message names the token, so the author can
            # spell the option out.
            for pos, letter in enumerate(token[1:], start=2):
                flag = by_short.get(letter)
                if flag is None or (flag.takes_value and pos > 2):
                    continue
                glued = token[pos:] or None
                if flag.refuses(_values_after(args, index, glued)):
                    return token, flag
    return None


def check_agent_args(
    agent: AgentName, args: Sequence[str], env: Mapping[str, str], settings: AgentSettings
) -> None:
    """Refuse ``args``/``env`` that widen what the agent may do, unless the operator allows."""
    unsafe = _unsafe_arg(agent, args, settings)
    if unsafe is not None:
        token, flag = unsafe
        raise AgentArgsRefusedError(
            f"args: `{token}` {flag.why}; a spec cannot grant that. Remove it from the "
            f"step's args, or have the worker's operator set {flag.allowed_by}=1 on the worker"
        )
    for name in sorted(env):
        if name.upper() in _TRUST_VARIABLES and not settings.trust_folders:
            raise AgentArgsRefusedError(
                f"env: {name} would make {agent} trust the checkout's own configuration "
                "(hooks, MCP servers); remove it from the step's env, or have the worker's "
                f"operator set {ENV_AGENT_TRUST_FOLDERS}=1 on the worker"
            )
        if name.upper() in _CONFIG_VARIABLES:
            raise AgentArgsRefusedError(
                f"env: {name} would point {agent} at configuration (permission rules, hooks, "
                "MCP servers) the worker's operator did not choose; remove it from the "
                "step's env and set it in the worker's environment if it is needed"
            )


# --- presets ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentPreset:
    executable: str
    install: str
    # (prompt, extra_args, settings) -> argv after the executable
    arguments: Callable[[str, Sequence[str], AgentSettings], list[str]]
    # Answers its "trust this folder?" dialog; used only when the operator trusts.
    trust: tuple[RespondRule, ...]
    # Variables that tell it to trust the folder headless; likewise.
    trust_env: Mapping[str, str] = field(default_factory=dict)


def _claude_args(prompt: str, extra: Sequence[str], settings: AgentSettings) -> list[str]:
    # -p: print the answer and exit. acceptEdits: file edits need no approval
    # (each agent works in its own worktree), other tools still ask and are
    # refused headless. A later --permission-mode in extra_args wins. "--"
    # keeps a prompt that starts with "-" from being read as a flag. -p skips
    # the trust dialog and would load the checkout's .claude/ settings (hooks
    # run commands) and .mcp.json servers: only the worker user's settings
    # count unless the operator trusts folders.
    untrusted = (
        [] if settings.trust_folders else ["--setting-sources", "user", "--strict-mcp-config"]
    )
    return [
        "-p",
        "--output-format",
        "text",
        "--permission-mode",
        "acceptEdits",
        *untrusted,
        *extra,
        "--",
        prompt,
    ]


def _codex_args(prompt: str, extra: Sequence[str], settings: AgentSettings) -> list[str]:
    # exec: the non-interactive mode. workspace-write lets it edit the
    # worktree (the default sandbox is read-only); the git check is skipped
    # because the step's cwd may be any directory the policy allows. Codex
    # itself loads a checkout's .codex/ only for projects the worker user
    # trusted.
    del settings
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


def _gemini_args(prompt: str, extra: Sequence[str], settings: AgentSettings) -> list[str]:
    # --prompt=...: headless mode; the "=" form keeps a leading "-" in the
    # prompt from being parsed as a flag. auto_edit: edits approved, like the
    # other two presets.
    del settings
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
            trust=(
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
            trust=(
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
            trust=(RespondRule(expect=r"(?i)do you trust this folder\?", send=_ENTER, times=1),),
            # Recent versions refuse to run headless in a folder nobody trusted.
            trust_env=MappingProxyType({"GEMINI_CLI_TRUST_WORKSPACE": "true"}),
        ),
    }
)

_UNTRUSTED = AgentSettings()


def agent_command(
    agent: AgentName,
    prompt: str,
    extra_args: Sequence[str] = (),
    *,
    path: str | None = None,
    settings: AgentSettings = _UNTRUSTED,
) -> tuple[list[str], list[RespondRule]]:
    """argv and respond rules for one headless agent run.

    ``path`` is the PATH to look the executable up on (default: the worker's).
    ``settings`` are the operator's (default: nothing trusted, nothing
    skipped). Raises AgentArgsRefusedError for ``extra_args`` only the operator
    may allow, and AgentNotInstalledError, saying how to install the tool, if
    it is missing: both non-retryable refusals.
    """
    preset = AGENTS.get(agent)
    if preset is None:
        raise ValueError(f"unknown agent {agent!r}; use one of {', '.join(AGENTS)}")
    check_agent_args(agent, extra_args, {}, settings)
    if shutil.which(preset.executable, path=path) is None:
        raise AgentNotInstalledError(
            f"`{preset.executable}` ({agent}) is not installed on this worker: run "
            f"`{preset.install}` on the worker (or put it on the worker's PATH), then "
            "retry the step"
        )
    argv = [preset.executable, *preset.arguments(prompt, list(extra_args), settings)]
    return argv, list(preset.trust) if settings.trust_folders else []


@dataclass(frozen=True, slots=True)
class AgentLaunch:
    """A checked agent step: the command to run, and its worktree to finish after."""

    command: CommandCall
    worktree: Worktree | None


async def prepare_agent(call: AgentCall, policy: CommandPolicy) -> AgentLaunch:
    """Check ``call`` against the operator's settings and prepare its worktree.

    Raises CommandRefusedError (args, env, cwd or repository refused, agent
    missing) before anything runs, or WorktreeError if git fails. Call
    ``finish_worktree`` on the launch's worktree whatever the command did.
    """
    environ = os.environ if policy.base_environ is None else policy.base_environ
    settings = AgentSettings.from_env(environ)
    check_agent_args(call.agent, call.args, call.env, settings)
    # Looked up on the PATH the worker gives commands, not one the step sets.
    argv, rules = agent_command(
        call.agent, call.prompt, call.args, path=environ.get("PATH"), settings=settings
    )
    env = dict(call.env)
    if settings.trust_folders:
        env.update(AGENTS[call.agent].trust_env)
    worktree = None
    cwd = call.cwd
    if call.worktree:
        worktree = await prepare_worktree(call.cwd, call.step_id, policy)
        cwd = str(worktree.path)
    command = CommandCall(
        workflow_id=call.workflow_id,
        step_id=call.step_id,
        argv=argv,
        cwd=cwd,
        env=env,
        timeout_s=call.timeout_s,
        respond=rules,
        max_output_bytes=call.max_output_bytes,
    )
    return AgentLaunch(command=command, worktree=worktree)


# --- git ------------------------------------------------------------------------

# Config that would make git run a program, overridden on every git call
# llmmixer makes: the command-line scope these travel in beats every config
# file, included ones too, and reaches the git processes git itself starts.
# Nothing llmmixer does needs a transport, so every protocol is off.
_SAFE_GIT_CONFIG: tuple[tuple[str, str], ...] = (
    ("core.hooksPath", os.devnull),
    ("core.fsmonitor", "false"),
    ("core.sshCommand", "false"),
    ("core.askPass", ""),
    ("core.pager", "cat"),
    ("credential.helper", ""),
    ("protocol.allow", "never"),
    ("submodule.recurse", "false"),
    ("diff.submodule", "short"),
    ("gc.auto", "0"),
    ("maintenance.auto", "false"),
)


def _with_config(env: Mapping[str, str], pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    # GIT_CONFIG_COUNT/KEY/VALUE is `git -c` without its parsing of "=" and
    # dots, so a filter named "a=b" cannot smuggle another setting in.
    out = dict(env)
    count = int(out.get("GIT_CONFIG_COUNT", "0"))
    for key, value in pairs:
        out[f"GIT_CONFIG_KEY_{count}"] = key
        out[f"GIT_CONFIG_VALUE_{count}"] = value
        count += 1
    out["GIT_CONFIG_COUNT"] = str(count)
    return out


@dataclass(frozen=True, slots=True)
class _Git:
    """git as llmmixer runs it: scrubbed environment, no config that runs programs."""

    executable: str
    env: Mapping[str, str] = field(repr=False)
    launcher: tuple[str, ...] = ()

    @classmethod
    def for_policy(cls, policy: CommandPolicy) -> _Git:
        # The command environment, like any command: no worker keys. Every GIT_*
        # variable goes (GIT_DIR, GIT_CONFIG_PARAMETERS, GIT_EXTERNAL_DIFF, ...):
        # llmmixer says itself which repository and config git uses. No system
        # or user config either: a ~/.gitconfig can run programs too.
        env = {
            name: value
            for name, value in policy.command_environment({}).items()
            if not name.upper().startswith("GIT_")
        }
        env.update(
            GIT_CONFIG_NOSYSTEM="1",
            GIT_CONFIG_GLOBAL=os.devnull,
            GIT_ATTR_NOSYSTEM="1",
            GIT_NO_REPLACE_OBJECTS="1",
            GIT_TERMINAL_PROMPT="0",
            GIT_PAGER="cat",
            LC_ALL="C",
        )
        executable = shutil.which("git", path=env.get("PATH"))
        if executable is None:
            raise WorktreeError("git is not installed on this worker; install git to use worktrees")
        # Started like any command: as root, without capabilities, so a program
        # git runs cannot read the (undumpable) worker through /proc.
        return cls(
            executable=executable,
            env=_with_config(env, _SAFE_GIT_CONFIG),
            launcher=policy.command_launcher(),
        )

    async def run(self, *args: str, cwd: str | Path, ok: tuple[int, ...] = (0,)) -> str:
        proc = await asyncio.create_subprocess_exec(
            *self.launcher,
            self.executable,
            *args,
            cwd=str(cwd),
            env=dict(self.env),
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
        if proc.returncode not in ok:
            raise WorktreeError(
                f"`git {' '.join(args)}` failed in {cwd} (exit {proc.returncode}): "
                f"{err.decode(errors='replace').strip()}"
            )
        return out.decode(errors="replace")

    async def without_filters(self, git_dir: Path) -> _Git:
        """This git, with every filter driver the repository's config names turned off.

        A driver's clean/smudge program runs on add, diff and checkout for any
        path a .gitattributes (which the checkout controls) assigns to it; an
        empty command is no filter. Read right before use: the agent may have
        added drivers to the shared config.
        """
        listing = await self.run(
            f"--git-dir={git_dir}",
            "config",
            "--null",
            "--name-only",
            "--get-regexp",
            r"^filter\.",
            cwd=git_dir,
            ok=(0, 1),  # 1: no filter configured
        )
        drivers = {
            key[len("filter.") : key.rindex(".")]
            for key in listing.split("\0")
            if key.count(".") >= 2
        }
        pairs = [
            (f"filter.{driver}.{var}", value)
            for driver in sorted(drivers)
            for var, value in (
                ("clean", ""),
                ("smudge", ""),
                ("process", ""),
                ("required", "false"),
            )
        ]
        return _Git(executable=self.executable, env=_with_config(self.env, pairs))


# --- worktrees ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Worktree:
    """An agent's checkout, and the git directories recorded before the agent ran."""

    path: Path
    git_dir: Path  # the worktree's own git dir, under <common_dir>/worktrees
    common_dir: Path
    branch: str
    base: str  # the commit it started from
    git: _Git = field(repr=False)

    def git_args(self) -> tuple[str, str]:
        # Never discovered from the checkout: a `.git` the agent planted there
        # would otherwise choose the repository, and with it the config.
        return (f"--git-dir={self.git_dir}", f"--work-tree={self.path}")


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(path))


def _remove_dirs(worktree: Path, private: Path | None) -> bool:
    """Delete both directories (symlinks in them are not followed); whether one is left."""
    shutil.rmtree(worktree, ignore_errors=True)
    if private is not None:
        shutil.rmtree(private, ignore_errors=True)
    return os.path.lexists(worktree)


def _branch_slug(step_id: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", step_id).strip(".-") or "step"
    return slug[:40]


def _inside_root(policy: CommandPolicy, path: Path, cwd: str | None, what: str) -> None:
    root = policy.root_dir
    if root is not None and not path.is_relative_to(root):
        raise CommandRefusedError(
            f"cwd {cwd!r}: its git {what} is {path}, outside {ENV_ROOT} ({root}); point the "
            f"step at a repository inside {ENV_ROOT}, or set `worktree: false`"
        )


async def prepare_worktree(
    cwd: str | None,
    step_id: str,
    policy: CommandPolicy,
    *,
    parent: str | Path | None = None,
) -> Worktree:
    """A new worktree of the HEAD of the repository at ``cwd``, on a new branch.

    ``cwd`` is resolved like a command's (``CommandPolicy.resolve_cwd``); the
    repository it is in, and that repository's git directory, must lie inside
    ``LLMMIXER_PTY_ROOT`` too (CommandRefusedError otherwise). The worktree is
    a temp directory in ``parent`` (default: ``LLMMIXER_PTY_ROOT``, else the
    system temp dir).
    """
    repo_dir = policy.resolve_cwd(cwd)
    git = _Git.for_policy(policy)
    try:
        top = Path((await git.run("rev-parse", "--show-toplevel", cwd=repo_dir)).strip())
        common = Path(
            (
                await git.run(
                    "rev-parse", "--path-format=absolute", "--git-common-dir", cwd=repo_dir
                )
            ).strip()
        )
        base = (await git.run("rev-parse", "--verify", "HEAD^{commit}", cwd=repo_dir)).strip()
    except WorktreeError as exc:
        raise WorktreeError(
            f"{repo_dir} is not a git repository with at least one commit ({exc}); "
            "point the step at a committed repository"
        ) from exc
    top, common = _real(top), _real(common)
    _inside_root(policy, top, cwd, "repository")
    _inside_root(policy, common, cwd, "directory")
    slug = _branch_slug(step_id)
    branch = f"llmmixer/{slug}-{uuid.uuid4().hex[:8]}"
    where = _real(
        tempfile.mkdtemp(
            prefix=f"llmmixer-{slug}-", dir=policy.root_dir if parent is None else parent
        )
    )
    private: Path | None = None
    try:
        # No checkout yet: the filters to turn off are those the new worktree's
        # config names (an includeIf "onbranch:" may add some for its branch).
        await git.run(
            f"--git-dir={common}",
            "worktree",
            "add",
            "--quiet",
            "--no-checkout",
            "-b",
            branch,
            str(where),
            base,
            cwd=top,
        )
        private = _real((await git.run("rev-parse", "--absolute-git-dir", cwd=where)).strip())
        if private.parent != common / "worktrees":
            raise WorktreeError(
                f"git put the worktree's git directory at {private}, not under "
                f"{common / 'worktrees'}; check the repository's git setup"
            )
        plain = await git.without_filters(private)
        await plain.run(
            f"--git-dir={private}", f"--work-tree={where}", "reset", "--hard", "--quiet", cwd=where
        )
    except BaseException:
        try:
            await _remove_worktree(git, common, where, private, branch)
        except WorktreeError:
            pass
        raise
    return Worktree(
        path=where, git_dir=private, common_dir=common, branch=branch, base=base, git=git
    )


async def finish_worktree(worktree: Worktree) -> str:
    """What changed in the worktree as a ``git diff`` (new files included), then remove it.

    The diff is against the commit the worktree started from, so changes the
    agent committed on its branch count too. The worktree and its branch are
    removed even if computing the diff fails.
    """
    try:
        git = await worktree.git.without_filters(worktree.git_dir)
        # Staging in the worktree's own index is what lets untracked files
        # appear in the diff; the index is thrown away with the worktree.
        await git.run(*worktree.git_args(), "add", "--all", cwd=worktree.path)
        return await git.run(
            *worktree.git_args(),
            "diff",
            "--cached",
            "--no-color",
            "--no-ext-diff",
            "--no-textconv",
            worktree.base,
            "--",
            cwd=worktree.path,
        )
    finally:
        await _remove_worktree(
            worktree.git, worktree.common_dir, worktree.path, worktree.git_dir, worktree.branch
        )


async def _remove_worktree(
    git: _Git, common: Path, worktree: Path, private: Path | None, branch: str
) -> None:
    """Remove the worktree, its git directory and its branch; try every step.

    Deleting the directories llmmixer recorded, rather than asking
    `git worktree remove` (which trusts the checkout's `.git` file), keeps a
    rewritten checkout from choosing what gets removed.
    """
    left_behind = _remove_dirs(worktree, private)
    failures: list[str] = []
    git_dir = f"--git-dir={common}"
    for args in ((git_dir, "worktree", "prune"), (git_dir, "branch", "-D", "--quiet", branch)):
        try:
            await git.run(*args, cwd=common)
        except WorktreeError as exc:
            failures.append(str(exc))
    if failures or left_behind:
        left = "; ".join(failures) or f"{worktree} still exists"
        raise WorktreeError(
            f"cleaning up worktree {worktree} left something behind: {left}; remove the "
            f"directory, run `git worktree prune` and `git branch -D {branch}` in {common}"
        )
