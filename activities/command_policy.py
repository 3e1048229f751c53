"""What a worker lets ``kind: pty`` steps run, where, and with which environment.

The policy is the worker operator's, not the spec author's: it is read from
the worker's environment once at start-up and every command is checked
against it before anything is spawned. It is a guard against mistakes and
against a spec (or a model that wrote a ``decompose`` plan) reaching for
programs nobody meant to allow; it is not a sandbox (an allowed ``python``
can still do anything the worker's user can). Run workers that execute
untrusted specs in a container.

Settings (all optional)::

    LLMMIXER_PTY_ALLOW            comma list of executable names or absolute paths;
                                  unset = allow everything (the `llmmixer dev`
                                  default). PRODUCTION_ALLOWLIST is the suggested
                                  production value.
    LLMMIXER_PTY_ROOT             a step's cwd must resolve inside this directory;
                                  relative cwds are taken from it.
    LLMMIXER_PTY_ENV_PASSTHROUGH  comma list of otherwise-scrubbed variable names
                                  that commands may see (e.g. ANTHROPIC_API_KEY
                                  for a Claude Code agent step).
    LLMMIXER_PTY_MODE             auto | pty | pipe (see terminal_mode.py).
    LLMMIXER_PTY_KILL_GRACE_S     seconds between SIGTERM and SIGKILL (default 3).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llmmixer.activities.contracts import CommandCall
from llmmixer.activities.terminal import (
    DEFAULT_KILL_GRACE_S,
    CommandRefusedError,
    resolve_executable,
)
from llmmixer.activities.terminal_mode import MODE_SETTINGS, ModeSetting, TerminalCapability

__all__ = [
    "ENV_ALLOW",
    "ENV_KILL_GRACE",
    "ENV_MODE",
    "ENV_PASSTHROUGH",
    "ENV_ROOT",
    "PRODUCTION_ALLOWLIST",
    "CommandPolicy",
    "PreparedCommand",
    "is_secret_name",
    "scrub_environment",
]

ENV_ALLOW = "LLMMIXER_PTY_ALLOW"
ENV_ROOT = "LLMMIXER_PTY_ROOT"
ENV_PASSTHROUGH = "LLMMIXER_PTY_ENV_PASSTHROUGH"
ENV_MODE = "LLMMIXER_PTY_MODE"
ENV_KILL_GRACE = "LLMMIXER_PTY_KILL_GRACE_S"

# The suggested LLMMIXER_PTY_ALLOW for a production worker: build and test
# tools plus the CLI coding agents that `kind: agent` steps drive. Not applied
# automatically: an unset LLMMIXER_PTY_ALLOW means "allow all" so that
# `llmmixer dev` works out of the box.
PRODUCTION_ALLOWLIST: frozenset[str] = frozenset(
    {
        "git",
        "npm",
        "npx",
        "node",
        "python",
        "python3",
        "pytest",
        "make",
        "docker",
        "claude",
        "codex",
        "gemini",
    }
)

# Provider credentials and endpoints (CONTRACT section 3): the worker reads
# them, commands never see them unless passed through on purpose.
_SECRET_NAMES = frozenset(
    {
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_AUTH_TOKEN",
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_ORG_ID",
        "GEMINI_API_KEY",
        "GOOGLE_API_KEY",
        "GOOGLE_GEMINI_BASE_URL",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "LLMMIXER_API_TOKEN",
    }
)
_SECRET_SUFFIXES = (
    "_API_KEY",
    "_TOKEN",
    "_SECRET",
    "_SECRET_KEY",
    "_ACCESS_KEY",
    "_PRIVATE_KEY",
    "_PASSWORD",
)
# Every TEMPORAL_* variable goes: API keys, TLS client keys and certificates,
# and a profile pointing at them; a command has no business with the worker's
# own Temporal connection.
_SECRET_PREFIXES = ("TEMPORAL_",)


def is_secret_name(name: str) -> bool:
    """Whether a worker variable is scrubbed from command environments by default."""
    upper = name.upper()
    return (
        upper in _SECRET_NAMES
        or upper.endswith(_SECRET_SUFFIXES)
        or upper.startswith(_SECRET_PREFIXES)
    )


def scrub_environment(
    environ: Mapping[str, str], passthrough: frozenset[str] = frozenset()
) -> dict[str, str]:
    """``environ`` minus secret-looking variables, except those in ``passthrough``."""
    return {
        name: value
        for name, value in environ.items()
        if name in passthrough or not is_secret_name(name)
    }


def _split_list(raw: str) -> frozenset[str]:
    return frozenset(item.strip() for item in raw.split(",") if item.strip())


@dataclass(frozen=True, slots=True)
class PreparedCommand:
    """A command that passed the policy: what exactly to spawn."""

    executable: str  # absolute path
    cwd: str  # absolute, existing directory
    env: dict[str, str]  # the child's complete environment


@dataclass(frozen=True, kw_only=True)
class CommandPolicy:
    """The worker's rules for commands. Build with ``from_env`` on the worker."""

    # None = allow every executable (development default).
    allowed_executables: frozenset[str] | None = None
    # None = any cwd; otherwise cwd must resolve inside it (symlinks followed).
    root_dir: Path | None = None
    # Scrubbed variable names that commands may nevertheless see.
    env_passthrough: frozenset[str] = frozenset()
    # Run on pipes even where a pty is available.
    force_pipe: bool = False
    kill_grace_s: float = DEFAULT_KILL_GRACE_S
    mode_setting: ModeSetting = "auto"
    # The environment commands start from (before scrubbing); default: the worker's.
    base_environ: Mapping[str, str] | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CommandPolicy:
        """Read the ``LLMMIXER_PTY_*`` settings; a bad value raises ValueError naming it."""
        environ = os.environ if environ is None else environ
        allow_raw = environ.get(ENV_ALLOW)
        root_raw = environ.get(ENV_ROOT, "").strip()
        mode = environ.get(ENV_MODE, "auto").strip().lower() or "auto"
        if mode not in MODE_SETTINGS:
            raise ValueError(
                f"{ENV_MODE}={mode!r} is not one of {', '.join(MODE_SETTINGS)}; fix the "
                "worker's environment"
            )
        grace_raw = environ.get(ENV_KILL_GRACE, "").strip()
        try:
            grace = float(grace_raw) if grace_raw else DEFAULT_KILL_GRACE_S
        except ValueError:
            raise ValueError(
                f"{ENV_KILL_GRACE}={grace_raw!r} is not a number of seconds; fix the "
                "worker's environment"
            ) from None
        root = Path(root_raw).expanduser().resolve() if root_raw else None
        if root is not None and not root.is_dir():
            raise ValueError(
                f"{ENV_ROOT}={root_raw!r} is not a directory on this worker; create it "
                "or fix the setting"
            )
        setting: ModeSetting = "pipe" if mode == "pipe" else "pty" if mode == "pty" else "auto"
        return cls(
            allowed_executables=None if allow_raw is None else _split_list(allow_raw),
            root_dir=root,
            env_passthrough=_split_list(environ.get(ENV_PASSTHROUGH, "")),
            force_pipe=setting == "pipe",
            kill_grace_s=max(grace, 0.0),
            mode_setting=setting,
            base_environ=dict(environ),
        )

    def terminal_capability(self) -> TerminalCapability:
        """A fresh capability for this policy's mode; build one per worker."""
        return TerminalCapability("pipe" if self.force_pipe else self.mode_setting)

    # --- checks ---------------------------------------------------------------

    def prepare(self, call: CommandCall) -> PreparedCommand:
        """Check ``call`` and resolve what to spawn, or raise CommandRefusedError."""
        if not call.argv:
            raise CommandRefusedError("the step's command is empty; give an argv list")
        cwd = self.resolve_cwd(call.cwd)
        base = os.environ if self.base_environ is None else self.base_environ
        env = scrub_environment(base, self.env_passthrough)
        # Bare names are looked up on the worker's own PATH, not one the step
        # sets, so `env: {PATH: ...}` cannot put another program behind an
        # allowed name. The step's PATH still applies to what the program runs.
        executable = resolve_executable(call.argv[0], path=base.get("PATH"), cwd=cwd)
        self.check_executable(call.argv[0], executable)
        env.update(call.env)
        return PreparedCommand(executable=executable, cwd=cwd, env=env)

    def check_executable(self, name: str, resolved: str) -> None:
        allowed = self.allowed_executables
        if allowed is None:
            return
        bare = os.sep not in name
        if (bare and name in allowed) or resolved in allowed:
            return
        listed = ", ".join(sorted(allowed)) or "nothing"
        hint = name if bare else resolved
        raise CommandRefusedError(
            f"`{name}` is not in {ENV_ALLOW} ({listed}); add `{hint}` to the worker's "
            f"{ENV_ALLOW} to let steps run it"
        )

    def resolve_cwd(self, cwd: str | None) -> str:
        base = self.root_dir or Path.cwd()
        target = (base / cwd) if cwd else base
        resolved = target.expanduser().resolve()
        if self.root_dir is not None and not resolved.is_relative_to(self.root_dir):
            raise CommandRefusedError(
                f"cwd {cwd!r} resolves to {resolved}, outside {ENV_ROOT} ({self.root_dir}); "
                f"use a cwd inside it or change the worker's {ENV_ROOT}"
            )
        if not resolved.is_dir():
            raise CommandRefusedError(
                f"cwd {cwd!r} resolves to {resolved}, which is not a directory on this "
                "worker; create it or fix the step's cwd"
            )
        return str(resolved)

    def command_environment(self, step_env: Mapping[str, str]) -> dict[str, str]:
        """The complete environment of a child: the worker's, scrubbed, plus ``step_env``."""
        base = os.environ if self.base_environ is None else self.base_environ
        env = scrub_environment(base, self.env_passthrough)
        env.update(step_env)
        return env
