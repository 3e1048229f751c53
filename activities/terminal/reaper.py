"""Supervisor that makes a pipe-mode command die with the worker that started it.

A PTY ties a command to its worker for free: when the worker dies, the
kernel closes the terminal's master side and SIGHUPs the session. Plain
pipes have no such thing, so the worker starts each pipe-mode command
through this script instead (``python -I -S reaper.py FDS``, then the
command's argv, executable, cwd, env and kill grace as one JSON line on the
socket)::

    worker ──socketpair── supervisor ──fork/exec── command (own session)
                                                   └── its descendants

The supervisor starts the command as a session leader (argv executed
directly, never through a shell) with the worker's stdin/stdout pipes, tells
the worker the command's pid, reports the command's exit status, and then
waits for one of two things on the socket:

- a byte from the worker ("release"): the worker has dealt with the group
  itself; the supervisor exits without touching it.
- end-of-file: the worker is gone (killed, crashed), since only it held the
  other end. The supervisor then does what the worker would have done on
  cancellation: SIGTERM the command's process group, SIGKILL it after the
  grace period, and exits. SIGTERM or SIGHUP to the supervisor itself means
  the same.

This file is stdlib-only and runs with ``-I -S`` (no site-packages, no
PYTHON* variables, no script or current directory on ``sys.path``) so the
step's environment and working directory cannot change how it behaves; the
worker imports :func:`group_alive` and :func:`set_undumpable` from it too.
The supervisor starts with no more than the command's locale variables and
marks itself non-dumpable at once, so the command it starts (its child, of
the same user) cannot read the spec, env included, from its memory or /proc.

Messages to the worker, one line each: ``started PID``, ``error MESSAGE``
(the command could not be started; the supervisor exits), ``exit CODE``
(``subprocess`` convention: negative is the signal that ended it).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from types import FrameType
from typing import Any

__all__ = ["group_alive", "main", "set_undumpable"]

_POLL_S = 0.05


def group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is still in the group.

    ``killpg(pgid, 0)`` also succeeds for zombies, and orphaned zombies linger
    wherever PID 1 does not reap (many containers), so when it succeeds /proc
    says whether anyone still runs. Not before: that scan reads every
    process's stat, slow on a busy host, and it runs on the worker's loop.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False  # not even a zombie is left
    except PermissionError:
        pass  # someone is there; /proc says whether it still runs
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8", errors="replace") as stat_file:
                stat = stat_file.read()
        except OSError:
            continue  # exited while we looked
        # "pid (comm) state ppid pgrp ..."; comm may contain spaces and ")"
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


_PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def set_undumpable() -> bool:
    """Make this process non-dumpable (Linux); False where that is not possible.

    A non-dumpable process's /proc/<pid>/environ, mem, maps and fds are
    readable only with CAP_SYS_PTRACE, and it cannot be ptrace-attached by
    its own user's other processes: a command started by the worker cannot
    read the worker's keys there. Commands themselves start without
    capabilities (see policy.capability_launcher). The flag is reset
    by execve, so the commands this process starts are unaffected.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes  # late: only Linux workers pay for it

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class _Stop(Exception):
    """SIGTERM or SIGHUP reached the supervisor: act as if the worker died."""


# A signal that arrives before the command is watched is remembered and acted
# on as soon as it is; raising earlier could lose a command already started.
_stop_requested = False
_watching = False


def _stop(signum: int, frame: FrameType | None) -> None:
    global _stop_requested, _watching
    _stop_requested = True
    if _watching:
        _watching = False  # once: a second signal must not cut the kill short
        raise _Stop


def _tell(sock: int, line: str) -> None:
    # A dead worker makes this fail; the next read sees the EOF and acts.
    with contextlib.suppress(OSError):
        os.write(sock, f"{line}\n".encode())


def _terminate(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the command's group, SIGKILL whatever is left after ``grace_s``."""
    pgid = proc.pid
    proc.poll()
    if not group_alive(pgid):
        return
    _signal_group(pgid, signal.SIGTERM)
    _signal_group(pgid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader so it does not count as alive
        if not group_alive(pgid):
            return
        time.sleep(_POLL_S)
    _signal_group(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1.0)


def _watch(sock: int, proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """Report the command's exit; kill its group if the worker goes away."""
    global _watching
    reported = False

    def report() -> None:
        nonlocal reported
        if not reported and proc.poll() is not None:
            reported = True
            _tell(sock, f"exit {proc.returncode}")

    pidfd: int | None = None
    with contextlib.suppress(AttributeError, OSError):
        pidfd = os.pidfd_open(proc.pid)  # readable once the command exits
    try:
        _watching = True
        if _stop_requested:
            raise _Stop
        while True:
            watching_exit = not reported
            fds = [sock] + ([pidfd] if pidfd is not None and watching_exit else [])
            timeout = _POLL_S if watching_exit and pidfd is None else None
            ready, _, _ = select.select(fds, [], [], timeout)
            report()
            if sock not in ready:
                continue
            try:
                data = os.read(sock, 64)
            except OSError:
                data = b""
            _watching = False
            if data:
                # Released: the worker has already killed and awaited the
                # group. Only a leader it could not reap is left to finish.
                if proc.poll() is None:
                    _signal_group(proc.pid, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=1.0)
                return
            _terminate(proc, grace_s)
            return
    except _Stop:
        _terminate(proc, grace_s)
        report()  # a worker still alive learns how its command ended
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _read_spec(sock: int) -> dict[str, Any] | None:
    """The command's spec, one JSON line from the worker; None if it went away."""
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = os.read(sock, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            return None
        data += chunk
    spec: dict[str, Any] = json.loads(data)
    return spec


def main(argv: list[str]) -> int:
    set_undumpable()  # before the spec (the command's env) is read
    fds = json.loads(argv[1])
    sock: int = fds["control_fd"]
    stdin_fd: int = fds["stdin_fd"]
    output_fd: int = fds["output_fd"]
    spec = _read_spec(sock)
    if spec is None:
        return 0  # the worker died or gave up before saying what to run
    # Python-level handlers: the command gets the default actions back on exec.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    try:
        proc = subprocess.Popen(
            spec["argv"],
            executable=spec["executable"],
            stdin=stdin_fd,
            stdout=output_fd,
            stderr=output_fd,
            cwd=spec["cwd"],
            env=spec["env"],
            start_new_session=True,
        )
    except OSError as exc:
        _tell(sock, f"error {exc}".replace("\n", " "))
        return 0
    finally:
        # Only the command may hold the pipes: the worker sees end-of-output
        # when the command's group, not this process, closes them.
        os.close(stdin_fd)
        os.close(output_fd)
    _tell(sock, f"started {proc.pid}")
    _watch(sock, proc, float(spec["grace_s"]))
    return 0


if __name__ == "__main__":
    # Nothing to flush or finalise: skip interpreter teardown so a released
    # supervisor is gone at once.
    os._exit(main(sys.argv))
