"""What a worker lets ``kind: pty`` steps run, where, and with which environment.

The policy is the worker operator's, not the spec author's: it is read from
the worker's environment once at start-up and every command is checked
against it before anything is spawned. It is a guard against a spec (or a
model that wrote a ``decompose`` plan) reaching for programs, settings or
secrets nobody meant to give it; it is not a sandbox (an allowed program can
still do anything the worker's user can). Run workers that execute untrusted
specs in a container.

What a command gets:

- only executables the operator lists in ``LLMMIXER_PTY_ALLOW``. Unset, a
  worker started by ``llmmixer worker`` runs no command at all; ``llmmixer
  dev`` and the embedded ``llmmixer run`` build their policy with
  ``user_is_operator=True`` and then allow any executable.
- an environment built from an allow-list (``BASE_ENV_NAMES`` and ``LC_*``),
  plus the names the operator passes through, plus the step's ``env``. Never
  "the worker's minus a deny-list": a worker holds keys under names nobody
  can list in advance.
- a step's ``env`` may not set a variable that decides which code runs
  (``is_hook_name``: loader, interpreter, shell, pager, config-location
  variables) unless the operator allows that name in ``LLMMIXER_PTY_ENV_ALLOW``.
- no capabilities: a worker running as root (or holding any capability)
  starts commands through ``setpriv`` so that ``CAP_SYS_PTRACE`` cannot read
  the worker's memory or ``/proc/<pid>/environ`` (the worker marks itself
  non-dumpable, which stops everyone else). Without ``setpriv`` such a
  worker refuses commands rather than run them privileged.

Settings (all optional)::

    LLMMIXER_PTY_ALLOW            comma list of executable names or absolute paths;
                                  * allows any executable. Unset: no commands on
                                  `llmmixer worker`, any on `llmmixer dev`/`run`.
                                  PRODUCTION_ALLOWLIST is a suggested value.
    LLMMIXER_PTY_ROOT             a step's cwd must resolve inside this directory;
                                  relative cwds are taken from it.
    LLMMIXER_PTY_ENV_PASSTHROUGH  comma list of worker variables commands see as
                                  well (e.g. ANTHROPIC_API_KEY for a Claude Code
                                  agent step); their values are still redacted
                                  from everything the command prints.
    LLMMIXER_PTY_ENV_ALLOW        comma list of hook variables (see is_hook_name)
                                  that a step's env may set, e.g. GIT_AUTHOR_NAME.
    LLMMIXER_PTY_MAX_OUTPUT_BYTES ceiling on a step's max_output_bytes (default
                                  16 MiB); a step asking for more is clamped to it
                                  and its output truncated head + marker + tail.
    LLMMIXER_PTY_MODE             auto | pty | pipe (see mode.py).
    LLMMIXER_PTY_KILL_GRACE_S     seconds between SIGTERM and SIGKILL (default 3).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llmmixer.activities.terminal.errors import CommandRefusedError
from llmmixer.activities.terminal.mode import ModeSetting, TerminalCapability
from llmmixer.activities.terminal.runner import DEFAULT_KILL_GRACE_S, resolve_executable
from llmmixer.core.contracts import CommandCall
from llmmixer.core.secrets import (
    BASE_ENV_NAMES,
    BASE_ENV_PREFIXES,
    is_secret_name,
    secret_values,
)
from llmmixer.runtime.settings import CommandEnv

__all__ = [
    "ALLOW_ANY",
    "BASE_ENV_NAMES",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "ENV_ALLOW",
    "ENV_HOOK_ALLOW",
    "ENV_KILL_GRACE",
    "ENV_MAX_OUTPUT",
    "ENV_MODE",
    "ENV_PASSTHROUGH",
    "ENV_ROOT",
    "PRODUCTION_ALLOWLIST",
    "CommandPolicy",
    "PreparedCommand",
    "capability_launcher",
    "is_hook_name",
    "is_secret_name",
    "local_operator_note",
    "scrub_environment",
    "worker_note",
]

ENV_ALLOW = "LLMMIXER_PTY_ALLOW"
ENV_ROOT = "LLMMIXER_PTY_ROOT"
ENV_PASSTHROUGH = "LLMMIXER_PTY_ENV_PASSTHROUGH"
ENV_HOOK_ALLOW = "LLMMIXER_PTY_ENV_ALLOW"
ENV_MAX_OUTPUT = "LLMMIXER_PTY_MAX_OUTPUT_BYTES"
ENV_MODE = "LLMMIXER_PTY_MODE"
ENV_KILL_GRACE = "LLMMIXER_PTY_KILL_GRACE_S"

#: In LLMMIXER_PTY_ALLOW: any executable.
ALLOW_ANY = "*"
#: The default ceiling on a step's max_output_bytes: one spec must not be able
#: to hold a shared worker's memory (output is kept in memory, then recorded).
DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024 * 1024

# A suggested LLMMIXER_PTY_ALLOW for a production worker. It holds no
# interpreter: nothing whose *arguments* are code (python -c, node -e, npx
# <package>, sh -c, make/npm scripts, docker run <image>), since with one of
# those the allowlist allows everything. What is left still runs code by
# design, the operator should know which: git runs the repository's hooks and
# what `-c` settings name, pytest runs the project's tests and conftest.py,
# and the coding agents run the tools they decide to. Not applied
# automatically: the operator sets LLMMIXER_PTY_ALLOW.
PRODUCTION_ALLOWLIST: frozenset[str] = frozenset(
    {
        "git",
        "pytest",
        "claude",
        "codex",
        "gemini",
    }
)

# The worker variables every command gets (when the worker has them) are
# BASE_ENV_NAMES and LC_* (core/secrets.py, shared with the dev server's
# child). Anything else only through the passthrough.

# Variables that decide which code a program runs, rather than what it works
# on. A step that may set them picks the program, whatever LLMMIXER_PTY_ALLOW
# says: `git` with GIT_PAGER or GIT_SSH_COMMAND, anything with LD_PRELOAD, a
# node agent with NODE_OPTIONS=--require, python with PYTHONSTARTUP, a shell
# with BASH_ENV. Grouped by what they hook:
_HOOK_NAMES = frozenset(
    {
        # where programs are found
        "PATH",
        # shells: startup files, exported functions, tracing prompts
        "BASH_ENV",
        "ENV",
        "SHELL",
        "SHELLOPTS",
        "BASHOPTS",
        "PROMPT_COMMAND",
        "PS4",
        "IFS",
        "CDPATH",
        # programs other programs start for the user
        "PAGER",
        "MANPAGER",
        "EDITOR",
        "VISUAL",
        "BROWSER",
        "LESSOPEN",
        "LESSCLOSE",
        "SSH_ASKPASS",
        "SUDO_ASKPASS",
        # where configuration is read from (and configuration names programs:
        # git's core.pager and aliases, npm's script-shell, ...)
        "HOME",
        "XDG_CONFIG_HOME",
        "XDG_CONFIG_DIRS",
        "XDG_DATA_DIRS",
        # the C library: code loaded into every program
        "GCONV_PATH",
        "GLIBC_TUNABLES",
        "HOSTALIASES",
        "LOCPATH",
        # language runtimes and toolchains
        "CLASSPATH",
        "RUBYOPT",
        "RUBYLIB",
        "GEM_HOME",
        "GEM_PATH",
        "GOFLAGS",
        "GOPATH",
        "GOROOT",
        "GOTOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CC",
        "CXX",
        "LD",
    }
)
_HOOK_PREFIXES = (
    "LD_",  # the dynamic loader: LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT
    "DYLD_",  # the macOS loader
    "PYTHON",  # PYTHONSTARTUP, PYTHONPATH, PYTHONHOME, PYTHONINSPECT
    "GIT_",  # GIT_PAGER, GIT_SSH_COMMAND, GIT_EXEC_PATH, GIT_CONFIG_*
    "NODE_",  # NODE_OPTIONS (--require), NODE_PATH
    "NPM_CONFIG_",  # npm settings, script-shell among them
    "YARN_",
    "PERL5",  # PERL5OPT, PERL5LIB, PERL5DB
    "PERLLIB",
    "PERL_",
    "BASH_FUNC_",  # exported bash functions replace commands by name
    "CARGO_",
    "JAVA_",
    "_JAVA_",
    "JDK_",
)
_HOOK_SUFFIXES = (
    "_OPTIONS",  # NODE_OPTIONS, JAVA_TOOL_OPTIONS, ...
    "_OPTS",  # MAVEN_OPTS, GRADLE_OPTS, JAVA_OPTS
    "_PAGER",
    "_EDITOR",
    "_SHELL",
    "_COMMAND",  # GIT_SSH_COMMAND and friends
    "_PRELOAD",
    "_WRAPPER",
    "_ASKPASS",
)


def is_hook_name(name: str) -> bool:
    """Whether a variable decides which code runs (loader, interpreter, shell, pager...)."""
    upper = name.upper()
    return (
        upper in _HOOK_NAMES or upper.startswith(_HOOK_PREFIXES) or upper.endswith(_HOOK_SUFFIXES)
    )


def _is_base_name(name: str) -> bool:
    return name in BASE_ENV_NAMES or name.startswith(BASE_ENV_PREFIXES)


def scrub_environment(
    environ: Mapping[str, str], passthrough: frozenset[str] = frozenset()
) -> dict[str, str]:
    """What a command may see of ``environ``: the allow-listed names plus ``passthrough``."""
    return {
        name: value for name, value in environ.items() if _is_base_name(name) or name in passthrough
    }


def local_operator_note(environ: Mapping[str, str] | None = None) -> str | None:
    """What `llmmixer dev` / `run` tell the user once at start, when it applies.

    Their worker allows any executable when LLMMIXER_PTY_ALLOW is unset (the
    user is the operator); saying so keeps that from being a surprise.
    """
    environ = os.environ if environ is None else environ
    if environ.get(ENV_ALLOW) is not None:
        return None
    return (
        f"commands: this worker runs any executable a spec names ({ENV_ALLOW} is unset "
        "and you are its operator); set it to a comma list to restrict"
    )


def worker_note(environ: Mapping[str, str] | None = None) -> str | None:
    """What `llmmixer worker` tells its operator at start when it will run no command."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_ALLOW) is not None:
        return None
    return (
        f"commands: {ENV_ALLOW} is unset, so this worker refuses `kind: pty` and "
        f"`kind: agent` steps; set {ENV_ALLOW} to the executables they may run "
        f"(e.g. git,pytest) or {ALLOW_ANY} for any"
    )


# Starts a program with no capabilities and no way to gain any (setuid bits
# are ignored under no_new_privs). An argv prefix, exec'd directly: nothing of
# ours runs between fork and exec.
_SETPRIV_ARGS = ("--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--")
# Where setpriv is looked for after the worker's PATH: a system tool, and a
# worker's PATH (a venv's bin, say) need not list the system directories.
_SYSTEM_BIN_DIRS = ("/usr/bin", "/bin", "/usr/sbin", "/sbin")


def _has_capabilities() -> bool:
    """Whether a program this process starts could hold any capability.

    Any capability in our own sets may be passed on; and a program exec'd as
    root gets the whole bounding set, so root with a non-empty one counts too
    (a container started with every capability dropped has an empty one).
    """
    if not sys.platform.startswith("linux"):
        return False
    sets: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name.startswith("Cap"):
                    sets[name] = int(value.strip(), 16)
    except (OSError, ValueError):
        return os.geteuid() == 0
    if any(sets.get(name, 0) for name in ("CapInh", "CapPrm", "CapEff", "CapAmb")):
        return True
    return os.geteuid() == 0 and sets.get("CapBnd", 1) != 0


def _with_system_dirs(path: str | None) -> str:
    return os.pathsep.join(part for part in (path, *_SYSTEM_BIN_DIRS) if part)


def capability_launcher(path: str | None) -> tuple[tuple[str, ...], str | None]:
    """The argv prefix that drops capabilities, and the problem if it is needed but missing.

    ``((), None)`` for an unprivileged worker: its commands hold no capability
    and the non-dumpable worker is out of their reach already.
    """
    if not _has_capabilities():
        return (), None
    setpriv = shutil.which("setpriv", path=path)
    if setpriv is None:
        return (), (
            "this worker runs as root (or holds capabilities) and `setpriv` is not "
            f"installed (looked on {path}), so a command could read the worker's "
            "secrets through /proc; install util-linux (setpriv) on the worker, or run "
            "the worker as an unprivileged user"
        )
    return (os.path.abspath(setpriv), *_SETPRIV_ARGS), None


@dataclass(frozen=True, slots=True)
class PreparedCommand:
    """A command that passed the policy: what exactly to spawn."""

    executable: str  # absolute path
    cwd: str  # absolute, existing directory
    env: dict[str, str]  # the child's complete environment
    # argv prefix that starts the program without capabilities; () when not needed
    launcher: tuple[str, ...] = ()
    # the step's max_output_bytes, clamped to the worker's ceiling
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES


@dataclass(frozen=True, kw_only=True)
class CommandPolicy:
    """The worker's rules for commands. Build with ``from_env`` on the worker.

    The defaults are the safe ones: a policy built without settings runs no
    command at all.
    """

    # Executable names / absolute paths steps may run; ALLOW_ANY in it allows
    # any. None: LLMMIXER_PTY_ALLOW is unset and the user is not the operator,
    # so no command runs.
    allowed_executables: frozenset[str] | None = None
    # None = any cwd; otherwise cwd must resolve inside it (symlinks followed).
    root_dir: Path | None = None
    # Worker variables (beyond BASE_ENV_NAMES) that commands see as well.
    env_passthrough: frozenset[str] = frozenset()
    # Hook variables (is_hook_name) that a step's env may nevertheless set.
    env_allow: frozenset[str] = frozenset()
    # Ceiling on a step's max_output_bytes.
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    # Run on pipes even where a pty is available.
    force_pipe: bool = False
    kill_grace_s: float = DEFAULT_KILL_GRACE_S
    mode_setting: ModeSetting = "auto"
    # The worker's environment commands take their allow-listed variables
    # from; default: this process's.
    base_environ: Mapping[str, str] | None = field(default=None, repr=False)
    # The worker's secret values, redacted from everything commands print.
    secrets: frozenset[str] = field(default=frozenset(), repr=False)
    # How commands start without capabilities (see capability_launcher);
    # None: decided from this process when a command is prepared.
    launcher: tuple[str, ...] | None = None
    launcher_problem: str | None = None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, user_is_operator: bool = False
    ) -> CommandPolicy:
        """Read the ``LLMMIXER_PTY_*`` settings; a bad value raises SettingsError naming it.

        ``user_is_operator``: the person who writes the specs runs this worker
        (``llmmixer dev``, the embedded ``llmmixer run``), so an unset
        ``LLMMIXER_PTY_ALLOW`` allows any executable instead of none.
        """
        environ = os.environ if environ is None else environ
        settings = CommandEnv.from_env(environ)  # SettingsError names each bad variable
        if settings.allow is not None:
            allowed: frozenset[str] | None = frozenset(settings.allow)
        else:
            allowed = frozenset({ALLOW_ANY}) if user_is_operator else None
        setting: ModeSetting = settings.mode
        launcher, problem = capability_launcher(_with_system_dirs(environ.get("PATH")))
        return cls(
            allowed_executables=allowed,
            root_dir=settings.root,
            env_passthrough=frozenset(settings.env_passthrough),
            env_allow=frozenset(settings.env_allow),
            max_output_bytes=settings.max_output_bytes,
            force_pipe=setting == "pipe",
            kill_grace_s=settings.kill_grace_s,
            mode_setting=setting,
            base_environ=dict(environ),
            secrets=secret_values(environ),
            launcher=launcher,
            launcher_problem=problem,
        )

    @property
    def allows_any_executable(self) -> bool:
        return self.allowed_executables is not None and ALLOW_ANY in self.allowed_executables

    def terminal_capability(self) -> TerminalCapability:
        """A fresh capability for this policy's mode; build one per worker."""
        return TerminalCapability("pipe" if self.force_pipe else self.mode_setting)

    def _worker_environ(self) -> Mapping[str, str]:
        return os.environ if self.base_environ is None else self.base_environ

    # --- checks ---------------------------------------------------------------

    def command_environment(self, step_env: Mapping[str, str]) -> dict[str, str]:
        """The complete environment of a command this worker starts.

        The allow-listed worker variables (BASE_ENV_NAMES, LC_*), the names the
        operator passes through, then the step's ``env``, which may not set a
        hook variable (``is_hook_name``) unless the operator allows it in
        LLMMIXER_PTY_ENV_ALLOW. Raises CommandRefusedError naming the variable.
        """
        self.check_step_env(step_env)
        env = scrub_environment(self._worker_environ(), self.env_passthrough)
        env.update(step_env)
        return env

    def check_step_env(self, step_env: Mapping[str, str]) -> None:
        """Refuse a step ``env`` that would choose the code a command runs."""
        for name in step_env:
            if not name or "=" in name or "\0" in name:
                raise CommandRefusedError(
                    f"env name {name!r} is not a valid environment variable name; fix the "
                    "step's env"
                )
            if is_hook_name(name) and name not in self.env_allow:
                raise CommandRefusedError(
                    f"env: {name} decides which code a program runs (loader, interpreter, "
                    f"shell, pager or config location), so a step may not set it on this "
                    f"worker; remove {name} from the step's env, or have the operator add "
                    f"{name} to the worker's {ENV_HOOK_ALLOW}"
                )

    def prepare(self, call: CommandCall) -> PreparedCommand:
        """Check ``call`` and resolve what to spawn, or raise CommandRefusedError."""
        if not call.argv:
            raise CommandRefusedError("the step's command is empty; give an argv list")
        self.check_allowed()
        env = self.command_environment(call.env)
        cwd = self.resolve_cwd(call.cwd)
        base = self._worker_environ()
        # Bare names are looked up on the worker's own PATH, not one the step
        # sets (a step may only set PATH when the operator allows it), so
        # `env: {PATH: ...}` cannot put another program behind an allowed name.
        executable = resolve_executable(call.argv[0], path=base.get("PATH"), cwd=cwd)
        self.check_executable(call.argv[0], executable)
        launcher = self.command_launcher()
        return PreparedCommand(
            executable=executable,
            cwd=cwd,
            env=env,
            launcher=launcher,
            max_output_bytes=min(call.max_output_bytes, self.max_output_bytes),
        )

    def command_launcher(self) -> tuple[str, ...]:
        """The argv prefix that starts commands without capabilities, or a refusal."""
        if self.launcher is None:
            path = _with_system_dirs(self._worker_environ().get("PATH"))
            launcher, problem = capability_launcher(path)
        else:
            launcher, problem = self.launcher, self.launcher_problem
        if problem is not None:
            raise CommandRefusedError(problem)
        return launcher

    def check_allowed(self) -> None:
        """Refuse every command when the operator allowed none (LLMMIXER_PTY_ALLOW unset)."""
        if self.allowed_executables is None:
            raise CommandRefusedError(
                f"this worker runs no commands: {ENV_ALLOW} is not set. The worker's "
                f"operator lists the executables steps may run in {ENV_ALLOW} (e.g. "
                f"{ENV_ALLOW}=git,pytest; {ALLOW_ANY} allows any), or run the spec locally "
                "with `llmmixer dev` / `llmmixer run`"
            )

    def check_executable(self, name: str, resolved: str) -> None:
        self.check_allowed()
        allowed = self.allowed_executables
        if allowed is None or ALLOW_ANY in allowed:
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
