"""Run one command in a pseudo-terminal (or plain pipes) without blocking the loop.

This module knows nothing about Temporal: ``commands.py`` wraps it as the
``PTY_ACTIVITY`` and ``command_policy.py`` decides what may run. Keeping the
runner free of the SDK lets its behaviour (prompts answered, timeouts, group
kill, truncation) be tested in plain asyncio.

Guarantees:

- argv is executed directly (``execve``), never through a shell.
- The child is a session leader, so its pid is also its process-group id and
  every descendant that did not call ``setsid`` itself can be found and killed.
- The group dies with the worker, even when the worker is SIGKILLed: in PTY
  mode the kernel hangs up the terminal when the master side closes; in pipe
  mode the command is started by a small supervisor (``reaper.py``) that
  kills the group when its socket to the worker reaches end-of-file.
- On timeout, cancellation or any error the whole group gets SIGTERM, then
  SIGKILL after ``kill_grace_s``; the direct child is reaped and every file
  descriptor opened here is closed before ``run_command`` returns or raises.
- Output is decoded as UTF-8, stripped of ANSI escape sequences, has ``\\r\\n``
  and lone ``\\r`` turned into ``\\n``, has the given secrets and anything
  shaped like a key redacted (before it reaches the output sink, the result or
  the truncation), and is bounded to ``max_output_bytes`` as head + marker + tail.
- Respond rules are RE2 patterns: matching is linear in the output, so no
  pattern can stall the event loop (and every heartbeat of the worker).
- ``launcher`` (the policy's ``setpriv`` prefix) is exec'd in front of the
  program; nothing of ours runs in the child between fork and exec. A
  pipe-mode supervisor gets no more than the locale of the child's environment.
- Children are forked by ``subprocess`` (C code, no Python at-fork handlers:
  those of a tracing SDK could hang a child forked from this multi-threaded
  process) from a thread, so a slow fork or exec never holds the event loop.
  A PTY child becomes session leader with the terminal as its controlling tty
  through util-linux ``setsid --ctty`` exec'd after the launcher.

Errors::

    CommandRefusedError     the command cannot be started as given (executable
                            missing or not executable, cwd missing, bad respond
                            regex, empty argv); nothing ran, retrying won't help
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

from llmmixer.activities.reaper import group_alive
from llmmixer.core.contracts import CommandCall, RespondRule
from llmmixer.core.redaction import StreamRedactor

__all__ = [
    "DEFAULT_KILL_GRACE_S",
    "CommandRefusedError",
    "RunOutcome",
    "TerminalMode",
    "bound_text",
    "clean_terminal_text",
    "run_command",
    "session_launcher",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

TerminalMode = Literal["pty", "pipe"]

DEFAULT_KILL_GRACE_S = 3.0
# Wide enough that tools do not wrap long lines into the captured output.
PTY_DIMENSIONS = (50, 200)
# After the direct child exits, how long to wait for the rest of its output
# (a grandchild may still hold the terminal) before the group is terminated.
_DRAIN_AFTER_EXIT_S = 1.0
# How long to keep reading once the group is dead: only buffered bytes remain.
_DRAIN_AFTER_KILL_S = 1.0
# A respond rule only looks at this much recent text: prompts are short, and
# an unbounded window would make a chatty command quadratic.
_RESPOND_WINDOW_CHARS = 64 * 1024
_READ_SIZE = 64 * 1024
# A quiet command's unfinished last token (a prompt without a trailing space)
# is held back in case it is the start of a key; after this long without more
# output it is shown anyway (only the tail that begins a known secret stays).
_RELEASE_HELD_S = 0.5
_EOF = b"\x04"  # VEOF in a cooked terminal: what Ctrl-D sends


class CommandRefusedError(Exception):
    """The command cannot be started as given; the message says what to change."""


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """What happened to one command. ``output`` is already cleaned and bounded."""

    output: str
    # Exit status as ``subprocess`` reports it: negative means killed by that
    # signal. None only if the child could not be reaped (should not happen).
    exit_code: int | None
    mode: TerminalMode
    pid: int
    timed_out: bool = False
    truncated: bool = False
    truncated_bytes: int = 0
    duration_ms: float = 0.0


# --- output cleaning --------------------------------------------------------

# ECMA-48 sequences terminals understand: OSC (titles, hyperlinks) ended by BEL
# or ST; DCS/SOS/PM/APC strings ended by ST; CSI (colours, cursor moves);
# nF escapes (charset selection like ESC ( B); two-byte Fe/Fp/Fs escapes; and
# the 8-bit CSI that some programs emit.
_ANSI_RE = re.compile(
    r"""
    \x1b\][^\x07\x1b]*(?:\x07|\x1b\\)        # OSC ... BEL | ST
  | \x1b[PX^_][^\x1b]*\x1b\\                 # DCS / SOS / PM / APC ... ST
  | \x1b\[[0-?]*[ -/]*[@-~]                  # CSI
  | \x9b[0-?]*[ -/]*[@-~]                    # 8-bit CSI
  | \x1b[ -/]+[0-~]                          # nF: ESC ( B and friends
  | \x1b[0-~]                                # two-byte escapes
    """,
    re.VERBOSE,
)
# What a terminal would not show as text. Tab and newline stay; \r is handled
# before this runs.
# The start of a sequence cut off by the end of a read.
_ANSI_UNFINISHED_RE = re.compile(
    r"""
    \x1b(?:
        \][^\x07\x1b]*\x1b?                   # OSC, maybe the ESC of its ST
      | [PX^_][^\x1b]*\x1b?                   # DCS / SOS / PM / APC
      | \[[0-?]*[ -/]*                        # CSI
      | [ -/]*                                # nF, or a lone ESC
    )
  | \x9b[0-?]*[ -/]*
    """,
    re.VERBOSE,
)
_CR_RUN_LF_RE = re.compile(r"\r+\n")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# A sequence may be cut by a read boundary; hold back an unfinished one up to
# this length (long OSC hyperlinks) before giving up and emitting it stripped.
_MAX_PENDING_ESCAPE = 4096


def clean_terminal_text(text: str) -> str:
    """Strip ANSI sequences and control characters, normalise line endings."""
    text = _ANSI_RE.sub("", text)
    # A pty turns "\n" into "\r\n", so a program's own "\r\n" arrives as
    # "\r\r\n": any run of "\r" before "\n" is one line ending.
    text = _CR_RUN_LF_RE.sub("\n", text).replace("\r", "\n")
    return _CONTROL_RE.sub("", text)


class _TextCleaner:
    """Incremental ``clean_terminal_text`` over raw bytes read in chunks.

    Bytes arrive split at arbitrary points: in the middle of a UTF-8 character,
    of an escape sequence, or between ``\\r`` and ``\\n``. Each of those is held
    back until the next chunk decides it.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def feed(self, data: bytes) -> str:
        text = self._pending + self._decoder.decode(data)
        self._pending = ""
        cut = len(text)
        esc = max(text.rfind("\x1b"), text.rfind("\x9b"))
        if (
            esc >= 0
            and len(text) - esc < _MAX_PENDING_ESCAPE
            and _ANSI_UNFINISHED_RE.fullmatch(text, esc) is not None
        ):
            cut = esc
        while cut > 0 and text[cut - 1] == "\r":
            cut -= 1  # "\r" then "\n" in the next chunk is one line ending
        self._pending = text[cut:]
        return clean_terminal_text(text[:cut])

    def flush(self) -> str:
        text = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return clean_terminal_text(text)


class _BoundedOutput:
    """Keeps the first and last ``limit / 2`` bytes of the text, counts the rest."""

    def __init__(self, limit: int) -> None:
        self._limit = max(limit, 0)
        self._head_budget = self._limit // 2
        self._tail_budget = self._limit - self._head_budget
        self._head = bytearray()
        self._tail = bytearray()
        self._dropped = 0

    def append(self, text: str) -> None:
        data = text.encode("utf-8")
        room = self._head_budget - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if not data:
            return
        self._tail += data
        # Trim in batches so a flood of small chunks stays linear.
        if len(self._tail) > 2 * self._tail_budget + _READ_SIZE:
            self._trim()

    def _trim(self) -> None:
        excess = len(self._tail) - self._tail_budget
        if excess > 0:
            del self._tail[:excess]
            self._dropped += excess

    @property
    def dropped(self) -> int:
        self._trim()
        return self._dropped

    def text(self) -> str:
        self._trim()
        # A cut may split a UTF-8 character; "ignore" drops only that fragment.
        head = self._head.decode("utf-8", errors="ignore")
        tail = self._tail.decode("utf-8", errors="ignore")
        if not self._dropped:
            return head + tail
        return f"{head}\n[... {self._dropped} bytes truncated ...]\n{tail}"


def bound_text(text: str, limit_bytes: int) -> str:
    """``text`` cut to about ``limit_bytes`` of UTF-8 as head + marker + tail."""
    bounded = _BoundedOutput(limit_bytes)
    bounded.append(text)
    return bounded.text()


# --- respond rules ----------------------------------------------------------


@dataclass(slots=True)
class _Rule:
    pattern: Any  # a compiled re2 pattern
    send: bytes
    remaining: int | None
    since: int = 0  # absolute offset in the cleaned output after the last match


def _compile_rules(rules: Sequence[RespondRule]) -> list[_Rule]:
    """RE2, not ``re``: a backtracking pattern like ``(a+)+$`` against a long
    line would freeze the worker's event loop, heartbeats included. RE2 has no
    backreferences or lookarounds; a rule that needs them is refused."""
    compiled = []
    options = re2.Options()
    options.log_errors = False  # the refusal says it; no stray line on stderr
    for index, rule in enumerate(rules):
        try:
            pattern = re2.compile(rule.expect, options=options)
        except re2.error as exc:
            reason = exc.args[0] if exc.args else exc
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            raise CommandRefusedError(
                f"respond[{index}].expect {rule.expect!r} is not a regular expression "
                f"this worker can run ({reason}); respond rules use RE2 syntax (no "
                "backreferences or lookarounds), fix the step's respond rule"
            ) from None
        compiled.append(_Rule(pattern, rule.send.encode("utf-8"), rule.times))
    return compiled


class _Responder:
    """Matches rules against the output seen since each rule last fired."""

    def __init__(self, rules: list[_Rule]) -> None:
        self._rules = rules
        self._recent = ""
        self._recent_start = 0  # absolute offset of self._recent[0]

    def feed(self, text: str) -> list[bytes]:
        """Add cleaned output; return what to send, in the order rules matched."""
        if not self._rules:
            return []
        self._recent += text
        if len(self._recent) > 2 * _RESPOND_WINDOW_CHARS:
            drop = len(self._recent) - _RESPOND_WINDOW_CHARS
            self._recent = self._recent[drop:]
            self._recent_start += drop
        replies: list[bytes] = []
        for rule in self._rules:
            while rule.remaining is None or rule.remaining > 0:
                start = max(rule.since - self._recent_start, 0)
                match = rule.pattern.search(self._recent, start)
                # An empty match would fire forever without consuming output.
                if match is None or match.end() == match.start():
                    break
                rule.since = self._recent_start + match.end()
                if rule.remaining is not None:
                    rule.remaining -= 1
                replies.append(rule.send)
        return replies


# --- the child process ------------------------------------------------------


class _Child:
    """A started child: pid (= process group id), output fd and input fd."""

    def __init__(
        self,
        *,
        pid: int,
        read_fd: int,
        write_fd: int,
        mode: TerminalMode,
        closer: Callable[[], None],
        poller: Callable[[], int | None],
        releaser: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.pid = pid
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.mode = mode
        self._closer = closer
        self._poller = poller
        self._releaser = releaser
        self.returncode: int | None = None
        self.input_closed = False

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._poller()
        return self.returncode

    async def read(self) -> bytes:
        """The next chunk of output; ``b""`` once nobody holds the other end."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return os.read(self.read_fd, _READ_SIZE)
            except BlockingIOError:
                await _wait_fd(loop, self.read_fd, writable=False)
            except OSError as exc:
                # Linux reports a pty whose every slave fd is closed as EIO.
                if exc.errno == errno.EIO:
                    return b""
                raise

    async def write(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view and not self.input_closed:
            try:
                written = os.write(self.write_fd, view)
            except BlockingIOError:
                await _wait_fd(loop, self.write_fd, writable=True)
                continue
            except (BrokenPipeError, OSError) as exc:
                # The child stopped reading (closed stdin or exited): what it
                # no longer wants cannot matter, and the exit code tells the rest.
                log.debug("command %s stopped accepting input: %s", self.pid, exc)
                return
            view = view[written:]

    async def end_input(self, text_sent: str | None) -> None:
        """Tell the child no more input will come (EOF)."""
        if self.input_closed:
            return
        if self.mode == "pipe":
            os.close(self.write_fd)
            self.input_closed = True
            return
        # A cooked terminal needs an empty line for EOF: a pending partial line
        # takes one Ctrl-D to flush and a second one to signal end of input.
        await self.write(_EOF if not text_sent or text_sent.endswith("\n") else _EOF * 2)

    async def release(self) -> None:
        """Once the group is dead and the child reaped: let go of any helper."""
        if self._releaser is not None:
            await self._releaser()

    def close(self) -> None:
        self._closer()


async def _wait_fd(loop: asyncio.AbstractEventLoop, fd: int, *, writable: bool) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


# Where the session launcher is looked for: system directories only, so
# neither the worker's PATH nor a step's can put another program there.
_SESSION_TOOL_DIRS = os.pathsep.join(("/usr/bin", "/bin", "/usr/sbin", "/sbin"))
# Fallback where util-linux's setsid is missing (macOS, BusyBox images): a
# fresh interpreter, exec'd like any program, does what setsid does and execs
# the command. Its argv is ``-c PROGRAM ARGS...``.
_SESSION_SHIM = (
    "import fcntl, os, sys, termios\n"
    "os.setsid()\n"
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)
# How long a started command may take to become a session leader owning its
# terminal (setsid's exec and two system calls; seconds only on a host that
# is thrashing) before it is killed and the attempt fails.
_SESSION_START_S = 30.0


def session_launcher() -> tuple[str, ...]:
    """The argv prefix that makes a command a session leader with its pty as terminal.

    util-linux ``setsid --ctty``: ``setsid()``, then ``TIOCSCTTY`` on stdin,
    then exec. It must not be started in a new session or process group of
    its own (``setsid`` forks when it already leads a group, and the command
    would then not be the pid we watch). Without it, a ``python -I -S`` shim
    does the same after its own exec.
    """
    found = shutil.which("setsid", path=_SESSION_TOOL_DIRS)
    # BusyBox applets are links to one binary whose setsid spells this differently.
    if found is not None and os.path.basename(os.path.realpath(found)) == "setsid":
        return (found, "--ctty")
    return (sys.executable, "-I", "-S", "-c", _SESSION_SHIM)


@dataclass(frozen=True, slots=True)
class _PtyStart:
    """What the spawning thread hands back: the process and our end of its terminal."""

    proc: subprocess.Popen[bytes]
    master: int


def _start_pty(argv: list[str], cwd: str | None, env: dict[str, str]) -> _PtyStart:
    """Fork and exec ``argv`` on a new pty. Blocking: runs in a thread.

    ``subprocess`` forks in C (``vfork`` where it can) and runs no Python in
    the child: Python's at-fork handlers (OpenTelemetry's span and metric
    processors register some, which start threads and take locks) never run
    there, so a lock another worker thread held at fork time cannot hang the
    child before its exec. The terminal's settings are made here, on our
    side, for the same reason.
    """
    master, slave = os.openpty()
    try:
        # No echo: answers sent by respond rules would otherwise be echoed
        # into the output and could match the rules again.
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        rows, cols = PTY_DIMENSIONS
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=env,
            # Only the terminal's three fds: a master fd of another command
            # held open here would keep that command from being hung up.
            close_fds=True,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    try:
        _wait_for_session(proc, master)
    except BaseException:
        _discard_pty(_PtyStart(proc, master))
        raise
    return _PtyStart(proc, master)


def _wait_for_session(proc: subprocess.Popen[bytes], master: int) -> None:
    """Wait until the child leads its session and owns the terminal, or has exited.

    Until then it shares our process group: a group kill would miss it, and a
    dying worker would leave it without a hang-up.
    """
    deadline = time.monotonic() + _SESSION_START_S
    delay = 0.0002
    while True:
        with contextlib.suppress(OSError):
            if os.tcgetpgrp(master) == proc.pid:
                return
        # Exited (setsid failed, or the command was quick): nothing to wait
        # for. WNOWAIT leaves the status for the runner to collect.
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            return
        if time.monotonic() >= deadline:
            # Not a refusal: on a less loaded moment the same command starts.
            raise RuntimeError(
                f"the command (pid {proc.pid}) did not take its terminal within "
                f"{_SESSION_START_S:g}s; the worker host is overloaded, the step's "
                "retry policy decides whether it runs again"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


def _discard_pty(start: _PtyStart) -> None:
    """Kill and forget a command nobody will run (its starter was cancelled)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(start.proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(start.proc.pid, signal.SIGKILL)  # maybe not yet its own group's leader
    os.close(start.master)
    threading.Thread(
        target=start.proc.wait, name=f"reap-discarded-{start.proc.pid}", daemon=True
    ).start()


async def _in_thread(start: Callable[[], _T], discard: Callable[[_T], None]) -> _T:
    """``start()`` in a thread; what it started is discarded if we are cancelled meanwhile.

    Forking blocks for as long as the kernel takes to copy the worker (and,
    until the child's exec, so does ``subprocess``): on the event loop that
    would stop every heartbeat and stream of the worker with it.
    """
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, start)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:

        def cleanup(done: asyncio.Future[_T]) -> None:
            if not done.cancelled() and done.exception() is None:
                discard(done.result())

        future.add_done_callback(cleanup)
        raise


async def _spawn_pty(
    executable: str,
    argv: list[str],
    cwd: str | None,
    env: dict[str, str],
    launcher: Sequence[str] = (),
) -> _Child:
    # The capability launcher first, so that nothing after it (setsid
    # included) runs with a capability; then the session; then the program.
    full = [*launcher, *session_launcher(), executable, *argv[1:]]
    try:
        started = await _in_thread(functools.partial(_start_pty, full, cwd, env), _discard_pty)
    except OSError as exc:
        raise CommandRefusedError(
            f"could not start {argv[0]!r}: {exc}; check that it is an executable "
            "program for this worker's platform"
        ) from exc
    proc, fd = started.proc, started.master
    pid = proc.pid
    os.set_blocking(fd, False)

    def close() -> None:
        os.close(fd)

    def poll() -> int | None:
        if proc.returncode is None:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                proc.returncode = -signal.SIGKILL  # reaped elsewhere; only a kill gets us here
            else:
                if done:
                    proc.returncode = os.waitstatus_to_exitcode(status)
        return proc.returncode

    return _Child(pid=pid, read_fd=fd, write_fd=fd, mode="pty", closer=close, poller=poll)


_REAPER_SCRIPT = str(Path(__file__).with_name("reaper.py"))
# How long the supervisor may take to start the command and say so.
_SUPERVISOR_START_S = 30.0
# How long to wait for a released supervisor to exit before reaping it later.
_SUPERVISOR_EXIT_S = 1.0


class _Supervisor:
    """The worker's end of a pipe-mode command's supervisor (see ``reaper.py``).

    The socket is the tie: only this process holds its end (it is not
    inherited across exec), so when the worker dies, however it dies, the
    supervisor reads end-of-file and kills the command's group.
    """

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        self._buffer = b""
        self._eof = False
        self._lines: list[str] = []

    def _receive(self) -> None:
        while not self._eof:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._eof = True
                return
            self._buffer += data
            *lines, self._buffer = self._buffer.split(b"\n")
            self._lines += [line.decode("utf-8", "replace") for line in lines]

    async def first_message(self) -> str:
        """``started PID`` or ``error ...``; RuntimeError if the supervisor died."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(_SUPERVISOR_START_S):
            while True:
                self._receive()
                if self._lines:
                    return self._lines.pop(0)
                if self._eof:
                    raise RuntimeError(
                        f"the command supervisor (pid {self.proc.pid}) exited without "
                        "starting the command; see the worker's stderr"
                    )
                await _wait_fd(loop, self.sock.fileno(), writable=False)

    def exit_code(self, pgid: int) -> int | None:
        """The command's exit status once the supervisor has reported it."""
        if self.sock.fileno() < 0:
            return None
        self._receive()
        for line in self._lines:
            kind, _, value = line.partition(" ")
            if kind == "exit":
                return int(value)
        if self._eof:
            # Nobody watches the command any more and nobody will report its
            # status: make sure it is gone and report it as killed.
            log.warning("supervisor of command %s vanished; killing its group", pgid)
            _signal_group(pgid, signal.SIGKILL)
            return -signal.SIGKILL
        return None

    def release(self) -> None:
        """Tell the supervisor the group is dealt with; it exits without a signal."""
        if self.sock.fileno() < 0:
            return
        with contextlib.suppress(OSError):
            self.sock.send(b"r")
        self.sock.close()

    async def wait_released(self) -> None:
        self.release()
        deadline = time.monotonic() + _SUPERVISOR_EXIT_S
        while self.proc.poll() is None:
            if time.monotonic() >= deadline:
                return  # close() reaps it later
            await asyncio.sleep(0.005)

    def close(self) -> None:
        """Release the supervisor (if not yet) and make sure it gets reaped."""
        self.release()
        if self.proc.poll() is None:
            # Still killing (we were cancelled before releasing it, so it saw
            # end-of-file): reap it when it is done, without blocking the loop.
            threading.Thread(
                target=self.proc.wait, name=f"reap-supervisor-{self.proc.pid}", daemon=True
            ).start()


# What of the child's environment the supervisor gets: enough to decode and
# encode text the way the command will, nothing a step could use to change
# what Python loads, and no passed-through secret in its /proc/<pid>/environ.
_SUPERVISOR_ENV_NAMES = ("LANG", "LC_ALL", "LC_CTYPE")


def _start_supervisor(child_env: Mapping[str, str]) -> tuple[_Supervisor, int, int]:
    """Start ``reaper.py``; return it, the command's stdin write end and output read end."""
    # Raw pipes we own instead of asyncio's subprocess transports: both modes
    # then share one reader, one writer and one close path, and the fds are
    # ours to close even when a daemonised grandchild keeps the other end open.
    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    ours, theirs = socket.socketpair()
    fds = {"stdin_fd": in_read, "output_fd": out_write, "control_fd": theirs.fileno()}
    try:
        proc = subprocess.Popen(
            # Not the worker's environment (its keys would sit in the
            # supervisor's /proc/<pid>/environ), and -I -S: nothing the step
            # sets (PYTHON* or LD_* variables, its cwd) changes what the
            # supervisor runs. The command's spec, env included, follows over
            # the socket rather than in argv, which every user of the host can read.
            [sys.executable, "-I", "-S", _REAPER_SCRIPT, json.dumps(fds)],
            env={name: child_env[name] for name in _SUPERVISOR_ENV_NAMES if name in child_env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            pass_fds=tuple(fds.values()),
            # Its own session: a Ctrl-C meant for the worker must not kill the
            # supervisor and leave the command unwatched.
            start_new_session=True,
        )
    except BaseException:
        for fd in (in_write, out_read):
            os.close(fd)
        ours.close()
        raise
    finally:
        os.close(in_read)
        os.close(out_write)
        theirs.close()
    ours.setblocking(False)
    return _Supervisor(proc, ours), in_write, out_read


def _discard_supervisor(started: tuple[_Supervisor, int, int]) -> None:
    """Let go of a supervisor whose starter was cancelled: it exits, nothing ran."""
    supervisor, in_write, out_read = started
    os.close(in_write)
    os.close(out_read)
    supervisor.close()


async def _spawn_pipe(
    executable: str,
    argv: list[str],
    cwd: str | None,
    env: dict[str, str],
    grace_s: float,
    launcher: Sequence[str] = (),
) -> _Child:
    # The command is started by a supervisor (reaper.py) that kills its group
    # if this worker dies: a pipe, unlike a PTY, hangs nobody up.
    supervisor, in_write, out_read = await _in_thread(
        functools.partial(_start_supervisor, env), _discard_supervisor
    )
    if launcher:
        argv, executable = [*launcher, executable, *argv[1:]], launcher[0]
    spec = {"argv": argv, "executable": executable, "cwd": cwd, "env": env, "grace_s": grace_s}
    try:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(supervisor.sock, json.dumps(spec).encode() + b"\n")
        message = await supervisor.first_message()
        kind, _, detail = message.partition(" ")
        if kind != "started":
            raise CommandRefusedError(
                f"could not start {argv[0]!r}: {detail}; check that it is an executable "
                "program for this worker's platform"
            )
    except BaseException:
        # Refused, cancelled or the supervisor failed: closing our end makes a
        # supervisor that did start the command kill it.
        os.close(in_write)
        os.close(out_read)
        supervisor.close()
        raise
    pid = int(detail)
    os.set_blocking(out_read, False)
    os.set_blocking(in_write, False)
    child: _Child

    def close() -> None:
        os.close(out_read)
        if not child.input_closed:
            child.input_closed = True
            os.close(in_write)
        supervisor.close()

    child = _Child(
        pid=pid,
        read_fd=out_read,
        write_fd=in_write,
        mode="pipe",
        closer=close,
        poller=lambda: supervisor.exit_code(pid),
        releaser=supervisor.wait_released,
    )
    return child


# --- process-group termination ----------------------------------------------


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _terminate_group(child: _Child, grace_s: float) -> None:
    """SIGTERM the group, SIGKILL whatever is left after ``grace_s``.

    If this coroutine is itself cancelled mid-grace, the ``finally`` still
    sends SIGKILL: a second cancellation must never leave processes behind.
    """
    pgid = child.pid
    killed = False
    try:
        child.poll()
        if not group_alive(pgid):
            killed = True
            return
        _signal_group(pgid, signal.SIGTERM)
        # A stopped process only acts on SIGTERM once continued.
        _signal_group(pgid, signal.SIGCONT)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            child.poll()  # reap the direct child so it does not count as alive
            if not group_alive(pgid):
                killed = True
                return
            await asyncio.sleep(0.05)
    finally:
        if not killed:
            _signal_group(pgid, signal.SIGKILL)


def _release(child: _Child) -> None:
    """Reap the (already SIGKILLed) child if still needed and close our fds."""
    for _ in range(100):
        if child.poll() is not None:
            break
        # Only reached when cancelled twice or the child is stuck in the
        # kernel: a short blocking wait beats leaving a zombie behind.
        time.sleep(0.01)
    loop = asyncio.get_running_loop()
    # Unregister before closing: the fd number may be reused at once.
    loop.remove_reader(child.read_fd)
    if not child.input_closed:
        loop.remove_writer(child.write_fd)
    child.close()


async def _reap(child: _Child, *, timeout_s: float) -> int | None:
    """Wait for the direct child to exit, polling (it is not asyncio's child)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while child.poll() is None:
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return child.returncode


# --- the runner -------------------------------------------------------------


def resolve_executable(name: str, *, path: str | None, cwd: str | None) -> str:
    """The absolute program path for argv[0], or CommandRefusedError saying why not."""
    if not name:
        raise CommandRefusedError("argv[0] is empty; give the program to run as argv[0]")
    if os.sep in name:
        candidate = os.path.join(cwd or os.getcwd(), name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
        raise CommandRefusedError(
            f"{name!r} is not an executable file (looked at {candidate}); fix argv[0] "
            "or the step's cwd"
        )
    found = shutil.which(name, path=path)
    if found is None:
        raise CommandRefusedError(
            f"{name!r} was not found on the worker's PATH; install it on the worker "
            "or give an absolute path in argv[0]"
        )
    return os.path.abspath(found)


def _check_start(
    argv: Sequence[str], env: Mapping[str, str], cwd: str | None, executable: str | None
) -> str:
    """Refuse what cannot start before forking; return the program path."""
    if not argv:
        raise CommandRefusedError("argv is empty; give the program and its arguments")
    if cwd is not None and not os.path.isdir(cwd):
        raise CommandRefusedError(
            f"cwd {cwd!r} is not a directory on this worker; fix the step's cwd"
        )
    return executable or resolve_executable(argv[0], path=env.get("PATH"), cwd=cwd)


async def run_command(
    call: CommandCall,
    *,
    mode: TerminalMode,
    on_output: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    executable: str | None = None,
    kill_grace_s: float = DEFAULT_KILL_GRACE_S,
    launcher: Sequence[str] = (),
    secrets: Iterable[str] = (),
    max_output_bytes: int | None = None,
) -> RunOutcome:
    """Run ``call.argv`` to completion, timeout or cancellation.

    ``env`` is the child's complete environment (default: this process's
    environment plus ``call.env``); ``cwd`` overrides ``call.cwd`` (the policy
    passes the resolved directory); ``executable`` is the already resolved
    program path (default: argv[0] looked up on the env's PATH). ``launcher``
    is exec'd in front of the program (``setpriv ... --``); ``secrets`` are
    redacted from the output as it streams; ``max_output_bytes`` overrides
    the call's (the policy passes it clamped to the worker's ceiling).

    ``on_output`` receives each cleaned output delta as it arrives; it must be
    quick and must not raise (an exception is logged and the sink dropped).

    Input: ``call.stdin`` is written first. When there are no respond rules,
    end-of-input follows at once (so a program that reads its input to the end
    finishes instead of waiting for a timeout); with rules, input stays open
    for the answers.
    """
    rules = _compile_rules(call.respond)
    child_env = dict(env) if env is not None else {**os.environ, **call.env}
    if mode == "pty":
        # Workers started by systemd or docker often have no TERM, and many
        # tools refuse to run or print warnings in a terminal without one.
        child_env.setdefault("TERM", "xterm-256color")
    workdir = cwd if cwd is not None else call.cwd
    program = _check_start(call.argv, child_env, workdir, executable)

    started = time.monotonic()
    if mode == "pty":
        child = await _spawn_pty(program, list(call.argv), workdir, child_env, launcher)
    else:
        child = await _spawn_pipe(
            program, list(call.argv), workdir, child_env, kill_grace_s, launcher
        )

    cleaner = _TextCleaner()
    output = _BoundedOutput(call.max_output_bytes if max_output_bytes is None else max_output_bytes)
    responder = _Responder(rules)
    # Redacted before anything is kept or forwarded: a key cut in half by the
    # truncation or by a read boundary would otherwise get through in pieces.
    redactor = StreamRedactor(secrets)
    sink = on_output

    def emit(text: str) -> None:
        nonlocal sink
        if not text:
            return
        output.append(text)
        if sink is not None:
            try:
                sink(text)
            except Exception:
                log.exception("output sink failed; output of %s no longer forwarded", child.pid)
                sink = None

    async def next_chunk() -> bytes | None:
        """The next read; None when a held-back token was released instead."""
        if not redactor.can_release:
            return await child.read()
        try:
            async with asyncio.timeout(_RELEASE_HELD_S):
                return await child.read()
        except TimeoutError:
            emit(redactor.release_token())
            return None

    async def pump_output() -> None:
        while (chunk := await next_chunk()) != b"":
            if chunk is None:
                continue
            text = cleaner.feed(chunk)
            # Rules see the unredacted text: they answer prompts, record nothing.
            replies = responder.feed(text)
            emit(redactor.feed(text))
            for reply in replies:
                await child.write(reply)
        emit(redactor.feed(cleaner.flush()))
        emit(redactor.flush())

    async def feed_input() -> None:
        # A task of its own: a child that never reads its stdin must not keep
        # us from enforcing the timeout.
        if call.stdin:
            await child.write(call.stdin.encode("utf-8"))
        if not rules:
            await child.end_input(call.stdin)

    reader = asyncio.create_task(pump_output(), name=f"command-output-{child.pid}")
    writer = asyncio.create_task(feed_input(), name=f"command-input-{child.pid}")
    timed_out = False
    try:
        try:
            async with asyncio.timeout(call.timeout_s):
                await _reap(child, timeout_s=float("inf"))
        except TimeoutError:
            timed_out = True
            await _terminate_group(child, kill_grace_s)
        else:
            # The child is gone; let its output drain, then make sure nothing
            # it left behind in its group outlives the step.
            done, _ = await asyncio.wait({reader}, timeout=_DRAIN_AFTER_EXIT_S)
            if not done:
                await _terminate_group(child, kill_grace_s)
        await asyncio.wait({reader}, timeout=_DRAIN_AFTER_KILL_S)
    finally:
        # Runs on success, error and cancellation alike: kill, reap, close.
        try:
            await _terminate_group(child, kill_grace_s)
            await _reap(child, timeout_s=kill_grace_s)
            await child.release()
        finally:
            for task in (reader, writer):
                task.cancel()
            try:
                # asyncio.wait never raises the tasks' errors, only our own
                # cancellation, which must propagate.
                await asyncio.wait({reader, writer})
            finally:
                _release(child)
    if not reader.cancelled() and (error := reader.exception()) is not None:
        raise error

    return RunOutcome(
        output=output.text(),
        exit_code=child.returncode,
        mode=mode,
        pid=child.pid,
        timed_out=timed_out,
        truncated=output.dropped > 0,
        truncated_bytes=output.dropped,
        duration_ms=(time.monotonic() - started) * 1000.0,
    )
