"""Start a command on a new pseudo-terminal, off the event loop.

``spawn_pty`` forks in a thread (``start_in_thread``) with ``subprocess``
(C code, no Python at-fork handlers: those of a tracing SDK could hang a
child forked from this multi-threaded process), on a fresh ``os.openpty()``
whose settings are made on our side. The command becomes session leader with
the terminal as its controlling tty through util-linux ``setsid --ctty``
exec'd after the launcher (``session_launcher``), so its pid is also its
process-group id, and the kernel hangs the whole session up when the
worker's master fd closes, even when the worker is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from llmmixer.activities.terminal.child import Child, start_in_thread
from llmmixer.activities.terminal.errors import CommandRefusedError

__all__ = ["PTY_DIMENSIONS", "session_launcher", "spawn_pty"]

# Wide enough that tools do not wrap long lines into the captured output.
PTY_DIMENSIONS = (50, 200)

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


async def spawn_pty(
    executable: str,
    argv: list[str],
    cwd: str | None,
    env: dict[str, str],
    launcher: Sequence[str] = (),
) -> Child:
    # The capability launcher first, so that nothing after it (setsid
    # included) runs with a capability; then the session; then the program.
    full = [*launcher, *session_launcher(), executable, *argv[1:]]
    try:
        started = await start_in_thread(functools.partial(_start_pty, full, cwd, env), _discard_pty)
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

    return Child(pid=pid, read_fd=fd, write_fd=fd, mode="pty", closer=close, poller=poll)
