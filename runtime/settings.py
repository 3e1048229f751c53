"""Every ``LLMMIXER_*`` variable, declared once: name, type, default, meaning, example.

The tree is a set of small pydantic models, one per area (:class:`ConnectionEnv`,
:class:`WorkerEnv`, :class:`ProviderEnv`, :class:`CommandEnv`,
:class:`AgentEnv`, :class:`PayloadEnv`, :class:`TelemetryEnv`,
:class:`ServeEnv`), gathered in :class:`Settings`. Each field carries an
:class:`Env` (or, for one variable per provider, a :class:`PerProvider`) that
says which variable sets it, how its text is read, a one-line description and
a value that works. Everything that reads one of these variables reads it
here, so the names (a public contract: manifests and shell profiles set them)
cannot drift, ``docs/settings.md`` and ``llmmixer doctor`` list them all, and
a bad value always fails the same way.

Reading never touches ``os.environ`` unless asked to: every ``from_env`` takes
the mapping to read (tests and ``WorkerSettings.from_env(environ)`` pass their
own). A blank value counts as unset. Every bad value raises
:class:`SettingsError` (a ``ValueError``) with one line per bad variable::

    LLMMIXER_SHUTDOWN_GRACE_S: 'soon' is not a number of seconds; for example
    LLMMIXER_SHUTDOWN_GRACE_S=30

(on one line). A secret's value is never repeated in a message (``core.secrets`` says which
variables are secrets), and its example is a command that makes a fresh one.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Generic, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict

from llmmixer.core.endpoints import display_url, parse_endpoint
from llmmixer.core.providers import PROVIDER_SPECS
from llmmixer.core.secrets import is_secret_name, looks_like_secret, url_password

__all__ = [
    "AgentEnv",
    "CommandEnv",
    "ConnectionEnv",
    "DeclaredSetting",
    "EffectiveSetting",
    "Env",
    "PayloadEnv",
    "PerProvider",
    "ProviderEnv",
    "RateLimitRule",
    "RateLimits",
    "ServeEnv",
    "SettingProblem",
    "Settings",
    "SettingsError",
    "TelemetryEnv",
    "WorkerEnv",
    "declared_settings",
    "effective_settings",
]

T = TypeVar("T")


# ---- errors ------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingProblem:
    """One bad variable: its name and the whole line saying what to do."""

    variable: str
    message: str


class SettingsError(ValueError):
    """One or more variables hold values llmmixer cannot use; one line each."""

    def __init__(self, problems: Sequence[SettingProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(problem.message for problem in self.problems))

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(problem.variable for problem in self.problems)


# ---- how a variable's text is read ---------------------------------------------------


class Kind(Generic[T]):
    """How one variable's text becomes a value.

    ``parse`` raises ``ValueError`` when the text is not ``what``; its message,
    when there is one, says which part is wrong and is shown in parentheses.
    """

    what: str = "a value"

    def parse(self, text: str) -> T:
        raise NotImplementedError

    def show(self, value: T) -> str:
        """The value as a user would write it (docs and ``llmmixer doctor``)."""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, tuple | frozenset):
            return ",".join(str(item) for item in value)
        return str(value)


def _whole(text: str) -> int:
    """An integer; a bare ``ValueError`` (the kind's ``what`` says the rest) otherwise."""
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError from None


def _real(text: str) -> float:
    try:
        number = float(text.strip())
    except ValueError:
        raise ValueError from None
    if not math.isfinite(number):
        raise ValueError
    return number


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class Flag(Kind[bool]):
    what = "true or false (1/0, yes/no, on/off)"

    def parse(self, text: str) -> bool:
        word = text.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ValueError


@dataclass(frozen=True)
class Count(Kind[int]):
    minimum: int = 1
    unit: str = ""

    @property
    def what(self) -> str:  # type: ignore[override]
        unit = f" of {self.unit}" if self.unit else ""
        return f"a whole number{unit} of at least {self.minimum}"

    def parse(self, text: str) -> int:
        number = _whole(text)
        if number < self.minimum:
            raise ValueError
        return number


@dataclass(frozen=True)
class Seconds(Kind[float]):
    #: Zero allowed (no grace at all) or not (a window of 0 s means nothing).
    zero: bool = True

    @property
    def what(self) -> str:  # type: ignore[override]
        return "a number of seconds" if self.zero else "a number of seconds above 0"

    def parse(self, text: str) -> float:
        number = _real(text)
        if number < 0 or (number == 0 and not self.zero):
            raise ValueError
        return number

    def show(self, value: float) -> str:
        return f"{value:g}"


class Share(Kind[float]):
    what = "a share above 0 and at most 1"

    def parse(self, text: str) -> float:
        number = _real(text)
        if not 0 < number <= 1:
            raise ValueError
        return number

    def show(self, value: float) -> str:
        return f"{value:g}"


@dataclass(frozen=True)
class Port(Kind[int]):
    #: 0 asks the system for a free port.
    zero: bool = False

    @property
    def what(self) -> str:  # type: ignore[override]
        if self.zero:
            return "a port number (1-65535; 0 picks a free port)"
        return "a port number (1-65535)"

    def parse(self, text: str) -> int:
        port = _whole(text)
        if not (0 if self.zero else 1) <= port <= 65535:
            raise ValueError
        return port


@dataclass(frozen=True)
class Choice(Kind[str]):
    options: tuple[str, ...]

    @property
    def what(self) -> str:  # type: ignore[override]
        return f"one of {', '.join(self.options)}"

    def parse(self, text: str) -> str:
        word = text.strip().lower()
        if word not in self.options:
            raise ValueError
        return word


@dataclass(frozen=True)
class Text(Kind[str]):
    """Free text held to a pattern (whole match)."""

    pattern: str
    description: str

    @property
    def what(self) -> str:  # type: ignore[override]
        return self.description

    def parse(self, text: str) -> str:
        if not re.fullmatch(self.pattern, text):
            raise ValueError
        return text


class Host(Kind[str]):
    what = "a host name or IP address"
    _LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    _NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")

    def parse(self, text: str) -> str:
        host = text.strip().strip("[]")
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(host))
        if not self._NAME.fullmatch(host):
            raise ValueError
        return host


@dataclass(frozen=True)
class Directory(Kind[Path]):
    """A directory path; ``~`` is the user's home."""

    #: Must exist now (the worker checks every ``cwd`` against it).
    existing: bool = False

    @property
    def what(self) -> str:  # type: ignore[override]
        return "an existing directory" if self.existing else "an absolute path (or ~/...)"

    def parse(self, text: str) -> Path:
        path = Path(text.strip()).expanduser()
        if self.existing:
            path = path.resolve()
            if not path.is_dir():
                raise ValueError
        elif not path.is_absolute():
            raise ValueError("a relative path means another directory in every process")
        return path


@dataclass(frozen=True)
class Items(Kind[tuple[str, ...]]):
    """A comma list; each entry checked by ``item`` (a ``ValueError`` names it)."""

    description: str
    item: Kind[str]

    @property
    def what(self) -> str:  # type: ignore[override]
        return self.description

    def parse(self, text: str) -> tuple[str, ...]:
        entries: list[str] = []
        for part in text.split(","):
            if not part.strip():
                continue
            try:
                entry = self.item.parse(part.strip())
            except ValueError as error:
                reason = f": {error}" if str(error) else ""
                shown = _shown_item(part.strip())
                raise ValueError(f"{shown!r} is not {self.item.what}{reason}") from None
            if entry not in entries:
                entries.append(entry)
        return tuple(entries)


def _shown_item(text: str) -> str:
    return display_url(text) if "://" in text else text


class Executable(Kind[str]):
    what = "an executable name (git) or an absolute path (/usr/bin/git)"

    def parse(self, text: str) -> str:
        if text == "*" or (os.sep not in text and re.fullmatch(r"[^\s]+", text)):
            return text
        if os.path.isabs(text) and re.fullmatch(r"[^\s,]+", text):
            return text
        raise ValueError


class VariableName(Kind[str]):
    # Not only letters and digits: bash exports functions as BASH_FUNC_name%%.
    what = "an environment variable name (no spaces or '=')"

    def parse(self, text: str) -> str:
        if not re.fullmatch(r"[^\s=]+", text):
            raise ValueError
        return text


class UrlPrefix(Kind[str]):
    what = "an http(s) origin or URL prefix"

    def parse(self, text: str) -> str:
        return parse_endpoint(text).text()


class PayloadKeys(Kind[tuple[bytes, ...]]):
    what = "a comma list of 32-byte keys in base64 or hex"

    def parse(self, text: str) -> tuple[bytes, ...]:
        keys: list[bytes] = []
        for index, part in enumerate(part.strip() for part in text.split(",")):
            if not part:
                continue
            key: bytes | None = None
            if re.fullmatch(r"[0-9a-fA-F]{64}", part):
                key = bytes.fromhex(part)
            else:
                with contextlib.suppress(binascii.Error, ValueError):
                    key = base64.b64decode(part + "=" * (-len(part) % 4), altchars=b"-_")
            if key is None or len(key) != 32:
                raise ValueError(f"key {index + 1} is not 32 bytes")
            keys.append(key)
        return tuple(keys)

    def show(self, value: tuple[bytes, ...]) -> str:
        return f"{len(value)} key(s)"


@dataclass(frozen=True)
class Token(Kind[str]):
    minimum: int = 16

    @property
    def what(self) -> str:  # type: ignore[override]
        return (
            f"a token of at least {self.minimum} characters (a short token can be guessed "
            "over the network)"
        )

    def parse(self, text: str) -> str:
        if len(text) < self.minimum:
            raise ValueError
        return text


@dataclass(frozen=True)
class RateLimitRule:
    """One entry of ``LLMMIXER_RATE_LIMITS``: a per-minute budget for one provider's model.

    ``model`` ``*`` gives each model of the provider a budget of that size
    (providers count per model); an entry naming the model wins over it.
    """

    provider: str
    model: str = "*"
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def __str__(self) -> str:
        limits = [f"{self.requests_per_minute}rpm"] if self.requests_per_minute else []
        limits += [f"{self.tokens_per_minute}tpm"] if self.tokens_per_minute else []
        return f"{self.provider}:{self.model}={'/'.join(limits)}"


_RATE_ENTRY = re.compile(r"(?P<provider>[a-z0-9_-]+)(?::(?P<model>[^=\s]+))?=(?P<limits>\S+)")
_RATE_LIMIT = re.compile(r"(?P<count>[0-9]+)(?P<unit>rpm|tpm)")


class RateLimits(Kind[tuple[RateLimitRule, ...]]):
    what = "a comma list of provider:model=<n>rpm/<n>tpm entries"

    def parse(self, text: str) -> tuple[RateLimitRule, ...]:
        known = [spec.name for spec in PROVIDER_SPECS]
        rules: dict[tuple[str, str], RateLimitRule] = {}
        for part in (part.strip() for part in text.split(",")):
            if not part:
                continue
            entry = _RATE_ENTRY.fullmatch(part)
            if entry is None:
                raise ValueError(f"{part!r} is not provider:model=<limits>")
            provider, model = entry["provider"], entry["model"] or "*"
            if provider not in known:
                raise ValueError(
                    f"{part!r} names provider {provider!r}; use one of {', '.join(known)}"
                )
            per_minute: dict[str, int] = {}
            for limit in entry["limits"].lower().split("/"):
                found = _RATE_LIMIT.fullmatch(limit)
                if found is None or int(found["count"]) < 1:
                    raise ValueError(
                        f"{part!r} has limit {limit!r}; write a whole number above 0 followed by "
                        "rpm (requests per minute) or tpm (tokens per minute)"
                    )
                if found["unit"] in per_minute:
                    raise ValueError(f"{part!r} gives {found['unit']} twice")
                per_minute[found["unit"]] = int(found["count"])
            if (provider, model) in rules:
                raise ValueError(f"{provider}:{model} is listed twice")
            rules[(provider, model)] = RateLimitRule(
                provider, model, per_minute.get("rpm"), per_minute.get("tpm")
            )
        return tuple(rules.values())


# ---- declarations ------------------------------------------------------------------

_TOKEN_EXAMPLE = '$(python3 -c "import secrets; print(secrets.token_urlsafe(32))")'
_KEY_EXAMPLE = '$(python3 -c "import os, base64; print(base64.b64encode(os.urandom(32)).decode())")'
_QUEUE = Text(r"[^\s\x00-\x1f]{1,1000}", "a task queue name (no spaces, at most 1000 characters)")


@dataclass(frozen=True)
class Env:
    """Which variable sets a field, how it is read, and how to document it."""

    name: str
    kind: Kind[Any]
    description: str
    example: str
    #: The docs' "default" column when the field's default does not say it.
    default_text: str | None = None
    #: Set but empty means something (``LLMMIXER_PTY_ALLOW=`` allows nothing),
    #: instead of counting as unset.
    empty_is_a_value: bool = False

    @property
    def secret(self) -> bool:
        return is_secret_name(self.name)


@dataclass(frozen=True)
class PerProvider:
    """One variable per provider of ``core.providers`` (``{}`` is its name, upper case)."""

    template: str
    kind: Kind[Any]
    description: str
    example: str
    default_text: str

    def each(self) -> Iterator[tuple[str, Env]]:
        for spec in PROVIDER_SPECS:
            yield (
                spec.name,
                Env(
                    self.template.format(spec.name.upper()),
                    self.kind,
                    self.description.format(provider=spec.name),
                    self.example,
                    self.default_text,
                ),
            )


def _holds_credential(env: Env, raw: str) -> bool:
    """Whether ``raw`` must not be repeated: a secret, or a value carrying one."""
    return (
        env.secret or looks_like_secret(raw) or any(url_password(part) for part in raw.split(","))
    )


def _message(env: Env, raw: str, error: ValueError) -> str:
    # Kinds word their details without the value itself, so secrets keep them.
    shown = (
        f"its value ({len(raw)} characters, not shown)"
        if _holds_credential(env, raw)
        else repr(raw)
    )
    detail = f" ({error})" if str(error) else ""
    return (
        f"{env.name}: {shown} is not {env.kind.what}{detail}; for example {env.name}={env.example}"
    )


def _read(env: Env, environ: Mapping[str, str]) -> tuple[bool, Any]:
    """(set, parsed value) of one variable; ``ValueError`` carries the whole message."""
    raw = environ.get(env.name)
    if raw is None or (not raw.strip() and not env.empty_is_a_value):
        return False, None
    try:
        return True, env.kind.parse(raw)
    except ValueError as error:
        raise ValueError(_message(env, raw, error)) from None


class _Group(BaseModel):
    """A group of settings read together; see the module docstring."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    #: The heading and paragraph of this group in docs/settings.md.
    title: ClassVar[str] = ""
    intro: ClassVar[str] = ""

    @classmethod
    def variables(cls) -> Iterator[tuple[str, Env, str | None]]:
        """(field, declaration, provider or None) for every variable, in order."""
        for name, info in cls.model_fields.items():
            for meta in info.metadata:
                if isinstance(meta, Env):
                    yield name, meta, None
                elif isinstance(meta, PerProvider):
                    for provider, env in meta.each():
                        yield name, env, provider

    @classmethod
    def collect(cls, environ: Mapping[str, str]) -> tuple[Self | None, list[SettingProblem]]:
        """This group and no problem, or None and every problem found."""
        values: dict[str, Any] = {}
        problems: list[SettingProblem] = []
        for field, env, provider in cls.variables():
            try:
                found, value = _read(env, environ)
            except ValueError as error:
                problems.append(SettingProblem(env.name, str(error)))
                continue
            if found and provider is None:
                values[field] = value
            elif found:
                values.setdefault(field, {})[provider] = value
        if problems:
            return None, problems
        group = cls(**values)
        problems.extend(group.check())
        return (None if problems else group), problems

    def check(self) -> list[SettingProblem]:
        """Rules between this group's variables; each problem names one of them."""
        return []

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """This group from ``environ`` (default: ``os.environ``); :class:`SettingsError` if bad."""
        group, problems = cls.collect(os.environ if environ is None else environ)
        if group is None:
            raise SettingsError(problems)
        return group


# ---- the tree ------------------------------------------------------------------------


class ConnectionEnv(_Group):
    title: ClassVar[str] = "Connection and queues (clients and workers)"
    intro: ClassVar[str] = (
        "Read by clients and workers alike: set them the same on both sides of a namespace."
    )

    task_queue: Annotated[
        str,
        Env(
            "LLMMIXER_TASK_QUEUE",
            _QUEUE,
            "the task queue runs start on and workers poll",
            "llmmixer",
        ),
    ] = "llmmixer"
    pty_task_queue: Annotated[
        str | None,
        Env(
            "LLMMIXER_PTY_TASK_QUEUE",
            _QUEUE,
            "task queue for command and agent steps; clients write it into each run's spec, "
            "workers with the `pty` role poll it",
            "llmmixer-pty",
            default_text="unset: the run's own queue",
        ),
    ] = None
    home: Annotated[
        Path | None,
        Env(
            "LLMMIXER_HOME",
            Directory(),
            "the embedded server's SQLite file and log, and the default payload directory",
            "/var/lib/llmmixer",
            default_text="the user's data directory (`~/.local/share/llmmixer` on Linux)",
        ),
    ] = None


ROLES = ("workflows", "llm", "pty")


class WorkerEnv(_Group):
    title: ClassVar[str] = "Workers"
    intro: ClassVar[str] = "How much a worker runs at once, and how it stops."

    roles: Annotated[
        tuple[str, ...],
        Env(
            "LLMMIXER_WORKER_ROLES",
            Items("a comma list of workflows, llm, pty", Choice(ROLES)),
            "what this worker runs: a comma list of `workflows`, `llm`, `pty`",
            "workflows,llm",
            default_text="all three",
        ),
    ] = ROLES
    max_concurrent_activities: Annotated[
        int,
        Env(
            "LLMMIXER_MAX_CONCURRENT_ACTIVITIES",
            Count(),
            "activities (LLM calls, commands) at once per worker",
            "50",
        ),
    ] = 100
    max_concurrent_workflow_tasks: Annotated[
        int,
        Env(
            "LLMMIXER_MAX_CONCURRENT_WORKFLOW_TASKS",
            Count(),
            "workflow tasks at once per worker",
            "50",
        ),
    ] = 100
    shutdown_grace_s: Annotated[
        float,
        Env(
            "LLMMIXER_SHUTDOWN_GRACE_S",
            Seconds(),
            "seconds running activities get after SIGTERM before they are cancelled",
            "30",
        ),
    ] = 30.0
    stream_deltas: Annotated[
        bool,
        Env(
            "LLMMIXER_STREAM_DELTAS",
            Flag(),
            "forward streamed model text and commands' output to watchers as they arrive",
            "false",
        ),
    ] = True
    health_port: Annotated[
        int | None,
        Env(
            "LLMMIXER_HEALTH_PORT",
            Port(zero=True),
            "serve `/healthz` and `/readyz` on this port (`llmmixer worker`)",
            "8081",
            default_text="off",
        ),
    ] = None


class ProviderEnv(_Group):
    title: ClassVar[str] = "Providers: endpoints, limits and circuit breakers"
    intro: ClassVar[str] = (
        "Keys and endpoints are each SDK's own variables (`ANTHROPIC_API_KEY`, "
        "`OPENAI_BASE_URL`, ...); these say where else a step may go and how hard a "
        "worker leans on each provider."
    )

    allowed_base_urls: Annotated[
        tuple[str, ...],
        Env(
            "LLMMIXER_ALLOWED_BASE_URLS",
            Items("a comma list of http(s) origins or URL prefixes", UrlPrefix()),
            "origins or URL prefixes a step's own `base_url` may name (comma list); such "
            "calls never carry the worker's key",
            "http://127.0.0.1:11434,https://llm.internal.example/v1",
            default_text="none: a step's own `base_url` is refused",
        ),
    ] = ()
    concurrency: Annotated[
        Mapping[str, int],
        PerProvider(
            "LLMMIXER_{}_CONCURRENCY",
            Count(),
            "most concurrent {provider} calls on this worker; beyond it calls wait",
            "8",
            "unlimited",
        ),
    ] = {}
    rate_limits: Annotated[
        tuple[RateLimitRule, ...],
        Env(
            "LLMMIXER_RATE_LIMITS",
            RateLimits(),
            "requests and tokens per minute this worker sends each provider's model, waited "
            "for before the call (`provider:model=<n>rpm/<n>tpm`, comma list; `model` `*` "
            "gives each model of the provider its own budget); see the README's Rate limits",
            "anthropic:claude-sonnet-5-5=50rpm/40000tpm,openai:*=500rpm",
            default_text="none: only the providers' rate-limit headers slow calls down",
        ),
    ] = ()
    breaker_failure_ratio: Annotated[
        float,
        Env(
            "LLMMIXER_BREAKER_FAILURE_RATIO",
            Share(),
            "share of failed calls in the window that opens a provider/model's circuit",
            "0.5",
        ),
    ] = 0.5
    breaker_min_calls: Annotated[
        int,
        Env(
            "LLMMIXER_BREAKER_MIN_CALLS",
            Count(),
            "calls in the window before the circuit may open",
            "5",
        ),
    ] = 5
    breaker_window_s: Annotated[
        float,
        Env(
            "LLMMIXER_BREAKER_WINDOW_S",
            Seconds(zero=False),
            "seconds of calls the circuit breaker looks at",
            "60",
        ),
    ] = 60.0
    breaker_cooldown_s: Annotated[
        float,
        Env(
            "LLMMIXER_BREAKER_COOLDOWN_S",
            Seconds(zero=False),
            "seconds an open circuit waits before letting one call try the provider again",
            "30",
        ),
    ] = 30.0


class CommandEnv(_Group):
    title: ClassVar[str] = "Commands and agents (`kind: pty`, `kind: agent`)"
    intro: ClassVar[str] = (
        "What a worker lets steps run, where, and with which environment "
        "(see [security.md](security.md))."
    )

    allowed_mcp_urls: Annotated[
        tuple[str, ...],
        Env(
            "LLMMIXER_ALLOWED_MCP_URLS",
            Items("a comma list of http(s) origins or URL prefixes", UrlPrefix()),
            "origins or URL prefixes an `mcp` tool's `url` may name (comma list); a stdio "
            "MCP server's `command` obeys `LLMMIXER_PTY_ALLOW` like any command",
            "http://127.0.0.1:8000/mcp,https://tools.internal.example",
            default_text="none: an MCP `url` is refused",
        ),
    ] = ()
    allow: Annotated[
        tuple[str, ...] | None,
        Env(
            "LLMMIXER_PTY_ALLOW",
            Items("a comma list of executable names or absolute paths, or *", Executable()),
            "executables steps may run: comma list of names or absolute paths; `*` any",
            "git,pytest,/usr/local/bin/claude",
            default_text="`llmmixer worker`: none (such steps fail naming this variable); "
            "`llmmixer dev` and the embedded `run`: any",
            empty_is_a_value=True,
        ),
    ] = None
    root: Annotated[
        Path | None,
        Env(
            "LLMMIXER_PTY_ROOT",
            Directory(existing=True),
            "directory every `cwd` (and an agent's repository) must stay inside",
            "/tmp",
            default_text="none",
        ),
    ] = None
    env_passthrough: Annotated[
        tuple[str, ...],
        Env(
            "LLMMIXER_PTY_ENV_PASSTHROUGH",
            Items("a comma list of variable names", VariableName()),
            "worker variables a command sees besides `PATH`, `HOME`, `USER`, `LOGNAME`, "
            "`LANG`, `LANGUAGE`, `LC_*`, `TERM`, `TZ`, `TMPDIR`",
            "ANTHROPIC_API_KEY,HTTPS_PROXY",
            default_text="none",
        ),
    ] = ()
    env_allow: Annotated[
        tuple[str, ...],
        Env(
            "LLMMIXER_PTY_ENV_ALLOW",
            Items("a comma list of variable names", VariableName()),
            "variables that pick the code a program runs (`PATH`, `LD_*`, `PYTHON*`, "
            "`GIT_*`, ...) that a step's `env` may set anyway",
            "PYTHONPATH",
            default_text="none: such a step is refused",
        ),
    ] = ()
    max_output_bytes: Annotated[
        int,
        Env(
            "LLMMIXER_PTY_MAX_OUTPUT_BYTES",
            Count(minimum=1024, unit="bytes"),
            "ceiling on a step's `max_output_bytes` (more is clamped)",
            "16777216",
            default_text="16777216 (16 MiB)",
        ),
    ] = 16 * 1024 * 1024
    mode: Annotated[
        Literal["auto", "pty", "pipe"],
        Env(
            "LLMMIXER_PTY_MODE",
            Choice(("auto", "pty", "pipe")),
            "run commands on a pseudo-terminal (`pty`), on pipes (`pipe`), or a pty when "
            "the host has one (`auto`)",
            "pipe",
        ),
    ] = "auto"
    kill_grace_s: Annotated[
        float,
        Env(
            "LLMMIXER_PTY_KILL_GRACE_S",
            Seconds(),
            "seconds between SIGTERM and SIGKILL of a command's process group",
            "3",
        ),
    ] = 3.0


class AgentEnv(_Group):
    title: ClassVar[str] = "Agents"
    intro: ClassVar[str] = "Both widen what an agent step may do; both are off unless set."

    trust_folders: Annotated[
        bool,
        Env(
            "LLMMIXER_AGENT_TRUST_FOLDERS",
            Flag(),
            'agent steps answer "trust this folder" and load the checkout\'s own agent config',
            "true",
        ),
    ] = False
    skip_permissions: Annotated[
        bool,
        Env(
            "LLMMIXER_AGENT_SKIP_PERMISSIONS",
            Flag(),
            "an agent step's `args` may lift the agent's permission or sandbox limits",
            "true",
            default_text="false: such a step is refused",
        ),
    ] = False


class PayloadEnv(_Group):
    title: ClassVar[str] = "Payloads: large outputs and encryption"
    intro: ClassVar[str] = (
        "Every client, worker and codec server of a namespace needs the same values, or "
        "they cannot read each other's payloads."
    )

    store: Annotated[
        Literal["fs", "s3", "off"] | None,
        Env(
            "LLMMIXER_PAYLOAD_STORE",
            Choice(("fs", "s3", "off")),
            "where payloads from the threshold up go: `fs`, `s3` or `off` (kept in history)",
            "fs",
            default_text="`fs` (`s3` when a bucket is set)",
        ),
    ] = None
    directory: Annotated[
        Path | None,
        Env(
            "LLMMIXER_PAYLOAD_DIR",
            Directory(),
            "the `fs` store's directory (private, 0700)",
            "/var/lib/llmmixer/payloads",
            default_text="`$LLMMIXER_HOME/payloads`",
        ),
    ] = None
    s3_bucket: Annotated[
        str | None,
        Env(
            "LLMMIXER_PAYLOAD_S3_BUCKET",
            Text(
                r"(?!xn--)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]",
                "an S3 bucket name (3-63 lower-case letters, digits, '.', '-')",
            ),
            "an existing S3 bucket for payloads (needs `pip install 'llmmixer[s3]'`)",
            "llmmixer-payloads",
            default_text="unset",
        ),
    ] = None
    threshold_bytes: Annotated[
        int,
        Env(
            "LLMMIXER_PAYLOAD_THRESHOLD_BYTES",
            Count(minimum=1024, unit="bytes"),
            "payloads this large or larger leave history",
            "262144",
        ),
    ] = 256 * 1024
    compress: Annotated[
        bool,
        Env(
            "LLMMIXER_PAYLOAD_COMPRESS",
            Flag(),
            "zlib-compress payloads from the threshold up",
            "true",
        ),
    ] = False
    keys: Annotated[
        tuple[bytes, ...],
        Env(
            "LLMMIXER_PAYLOAD_KEY",
            PayloadKeys(),
            "32 random bytes in base64 or hex: encrypts every payload (AES-GCM); a comma "
            "list reads payloads of older keys too, the first one encrypts",
            _KEY_EXAMPLE,
            default_text="unset: payloads are plain JSON",
        ),
    ] = ()

    max_attachment_bytes: Annotated[
        int,
        Env(
            "LLMMIXER_MAX_ATTACHMENT_BYTES",
            Count(minimum=1024, unit="bytes"),
            'the largest file input (`--input NAME=@FILE`, `{"file": ...}`) a client or '
            "`llmmixer serve` accepts; larger ones are refused before they are read whole",
            "33554432",
        ),
    ] = 32 * 1024 * 1024

    def check(self) -> list[SettingProblem]:
        if self.store == "s3" and not self.s3_bucket:
            return [
                SettingProblem(
                    "LLMMIXER_PAYLOAD_S3_BUCKET",
                    "LLMMIXER_PAYLOAD_S3_BUCKET: unset, but LLMMIXER_PAYLOAD_STORE=s3 needs an "
                    "existing bucket; for example LLMMIXER_PAYLOAD_S3_BUCKET=llmmixer-payloads",
                )
            ]
        return []


class TelemetryEnv(_Group):
    title: ClassVar[str] = "Telemetry"
    intro: ClassVar[str] = (
        "OpenTelemetry's own variables (`OTEL_EXPORTER_OTLP_ENDPOINT`, ...) turn on traces "
        'and metrics; see the README section "Traces and metrics".'
    )

    capture_content: Annotated[
        bool,
        Env(
            "LLMMIXER_OTEL_CAPTURE_CONTENT",
            Flag(),
            "put prompts and completions (redacted of keys) on LLM spans",
            "true",
        ),
    ] = False
    prometheus_port: Annotated[
        int | None,
        Env(
            "LLMMIXER_PROMETHEUS_PORT",
            Port(),
            "serve Temporal's worker metrics at `http://HOST:PORT/metrics`",
            "9464",
            default_text="off",
        ),
    ] = None
    prometheus_host: Annotated[
        str,
        Env(
            "LLMMIXER_PROMETHEUS_HOST",
            Host(),
            "the address metrics bind to (they have no authentication)",
            "0.0.0.0",
        ),
    ] = "127.0.0.1"


class ServeEnv(_Group):
    title: ClassVar[str] = "HTTP servers"
    intro: ClassVar[str] = (
        "`llmmixer serve` (the HTTP API and the web page) and `llmmixer codec-server`."
    )

    api_token: Annotated[
        str | None,
        Env(
            "LLMMIXER_API_TOKEN",
            Token(),
            "bearer token every API request of `llmmixer serve` needs; required to bind "
            "beyond loopback",
            _TOKEN_EXAMPLE,
            default_text="unset: loopback only",
        ),
    ] = None
    codec_token: Annotated[
        str | None,
        Env(
            "LLMMIXER_CODEC_TOKEN",
            Token(),
            "bearer token `llmmixer codec-server` requires; unset, it serves loopback only",
            _TOKEN_EXAMPLE,
            default_text="unset",
        ),
    ] = None


class Settings(BaseModel):
    """Every group; :meth:`from_env` lists every bad variable at once."""

    model_config = ConfigDict(frozen=True)

    connection: ConnectionEnv = ConnectionEnv()
    worker: WorkerEnv = WorkerEnv()
    providers: ProviderEnv = ProviderEnv()
    commands: CommandEnv = CommandEnv()
    agents: AgentEnv = AgentEnv()
    payloads: PayloadEnv = PayloadEnv()
    telemetry: TelemetryEnv = TelemetryEnv()
    serve: ServeEnv = ServeEnv()

    @classmethod
    def groups(cls) -> tuple[type[_Group], ...]:
        found: list[type[_Group]] = []
        for info in cls.model_fields.values():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, _Group):
                found.append(annotation)
        return tuple(found)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The whole tree; :class:`SettingsError` lists every bad variable."""
        env = os.environ if environ is None else environ
        values: dict[str, _Group] = {}
        problems: list[SettingProblem] = []
        for name, info in cls.model_fields.items():
            group_type = info.annotation
            assert isinstance(group_type, type) and issubclass(group_type, _Group)
            group, found = group_type.collect(env)
            problems.extend(found)
            if group is not None:
                values[name] = group
        if problems:
            raise SettingsError(problems)
        return cls(**values)


# ---- listing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeclaredSetting:
    """One variable as the tree declares it."""

    group: type[_Group]
    field: str
    env: Env

    @property
    def name(self) -> str:
        return self.env.name

    @property
    def default_text(self) -> str:
        if self.env.default_text is not None:
            return self.env.default_text
        default = self.group.model_fields[self.field].default
        return self.env.kind.show(default)


def declared_settings() -> tuple[DeclaredSetting, ...]:
    """Every ``LLMMIXER_*`` variable, grouped and in declaration order."""
    return tuple(
        DeclaredSetting(group, field, env)
        for group in Settings.groups()
        for field, env, _ in group.variables()
    )


@dataclass(frozen=True)
class EffectiveSetting:
    """What one variable is in force, for ``llmmixer doctor``; secrets masked."""

    name: str
    value: str
    #: ``set`` (from the environment) or ``default``.
    source: Literal["set", "default"]
    #: The error line when the value set is bad.
    problem: str | None = None


def effective_settings(environ: Mapping[str, str] | None = None) -> tuple[EffectiveSetting, ...]:
    """Every declared variable's value in ``environ``; never raises, never shows a secret."""
    env = os.environ if environ is None else environ
    rows: list[EffectiveSetting] = []
    for declared in declared_settings():
        spec = declared.env
        try:
            found, value = _read(spec, env)
        except ValueError as error:
            raw = env.get(spec.name, "")
            shown = "***" if _holds_credential(spec, raw) else repr(raw)
            rows.append(EffectiveSetting(spec.name, shown, "set", str(error)))
            continue
        if not found:
            rows.append(EffectiveSetting(spec.name, declared.default_text, "default"))
        elif spec.secret:
            rows.append(EffectiveSetting(spec.name, "***", "set"))
        else:
            rows.append(EffectiveSetting(spec.name, spec.kind.show(value) or "(empty)", "set"))
    return tuple(rows)
