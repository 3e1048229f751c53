"""Start a command on plain pipes, under a supervisor that kills it with the worker.

Where no pseudo-terminal can be had (``mode.py``), a command runs on pipes.
A pipe, unlike a PTY, hangs nobody up when the worker dies, so the command
is started by a small supervisor (``reaper.py``) that kills its group when
its socket to the worker reaches end-of-file. The supervisor is started off
the event loop and gets no more than the locale of the child's environment;
the command's spec follows over the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from llmmixer.activities.terminal.child import Child, start_in_thread, wait_fd
from llmmixer.activities.terminal.errors import CommandRefusedError
from llmmixer.activities.terminal.groups import signal_group

__all__ = ["spawn_pipe"]

log = logging.getLogger(__name__)

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
                await wait_fd(loop, self.sock.fileno(), writable=False)

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
            signal_group(pgid, signal.SIGKILL)
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


async def spawn_pipe(
    executable: str,
    argv: list[str],
    cwd: str | None,
    env: dict[str, str],
    grace_s: float,
    launcher: Sequence[str] = (),
) -> Child:
    # The command is started by a supervisor (reaper.py) that kills its group
    # if this worker dies: a pipe, unlike a PTY, hangs nobody up.
    supervisor, in_write, out_read = await start_in_thread(
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
    child: Child

    def close() -> None:
        os.close(out_read)
        if not child.input_closed:
            child.input_closed = True
            os.close(in_write)
        supervisor.close()

    child = Child(
        pid=pid,
        read_fd=out_read,
        write_fd=in_write,
        mode="pipe",
        closer=close,
        poller=lambda: supervisor.exit_code(pid),
        releaser=supervisor.wait_released,
    )
    return child
