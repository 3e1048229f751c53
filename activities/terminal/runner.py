"""Run one command in a pseudo-terminal (or plain pipes) without blocking the loop.

``run_command`` is what the command activity (``activities/commands.py``)
calls once ``policy.py`` has decided what may run. It knows nothing about
Temporal, so its behaviour (prompts answered, timeouts, group kill,
truncation) can be tested in plain asyncio. The pieces it puts together live
next to it: ``pty_child.py`` and ``pipe_child.py`` start the command,
``groups.py`` kills its process group, ``text.py`` cleans and bounds its
output, ``respond.py`` answers its prompts.

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

Errors (``errors.py``)::

    CommandRefusedError     the command cannot be started as given (executable
                            missing or not executable, cwd missing, bad respond
                            regex, empty argv); nothing ran, retrying won't help
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from llmmixer.activities.terminal.child import TerminalMode, dispose, reap
from llmmixer.activities.terminal.errors import CommandRefusedError
from llmmixer.activities.terminal.groups import terminate_group
from llmmixer.activities.terminal.pipe_child import spawn_pipe
from llmmixer.activities.terminal.pty_child import spawn_pty
from llmmixer.activities.terminal.respond import Responder, compile_rules
from llmmixer.activities.terminal.text import BoundedOutput, TextCleaner
from llmmixer.core.contracts import CommandCall
from llmmixer.core.redaction import StreamRedactor

__all__ = ["DEFAULT_KILL_GRACE_S", "RunOutcome", "resolve_executable", "run_command"]

log = logging.getLogger(__name__)

DEFAULT_KILL_GRACE_S = 3.0
# After the direct child exits, how long to wait for the rest of its output
# (a grandchild may still hold the terminal) before the group is terminated.
_DRAIN_AFTER_EXIT_S = 1.0
# How long to keep reading once the group is dead: only buffered bytes remain.
_DRAIN_AFTER_KILL_S = 1.0
# A quiet command's unfinished last token (a prompt without a trailing space)
# is held back in case it is the start of a key; after this long without more
# output it is shown anyway (only the tail that begins a known secret stays).
_RELEASE_HELD_S = 0.5


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
    rules = compile_rules(call.respond)
    child_env = dict(env) if env is not None else {**os.environ, **call.env}
    if mode == "pty":
        # Workers started by systemd or docker often have no TERM, and many
        # tools refuse to run or print warnings in a terminal without one.
        child_env.setdefault("TERM", "xterm-256color")
    workdir = cwd if cwd is not None else call.cwd
    program = _check_start(call.argv, child_env, workdir, executable)

    started = time.monotonic()
    if mode == "pty":
        child = await spawn_pty(program, list(call.argv), workdir, child_env, launcher)
    else:
        child = await spawn_pipe(
            program, list(call.argv), workdir, child_env, kill_grace_s, launcher
        )

    cleaner = TextCleaner()
    output = BoundedOutput(call.max_output_bytes if max_output_bytes is None else max_output_bytes)
    responder = Responder(rules)
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
                await reap(child, timeout_s=float("inf"))
        except TimeoutError:
            timed_out = True
            await terminate_group(child, kill_grace_s)
        else:
            # The child is gone; let its output drain, then make sure nothing
            # it left behind in its group outlives the step.
            done, _ = await asyncio.wait({reader}, timeout=_DRAIN_AFTER_EXIT_S)
            if not done:
                await terminate_group(child, kill_grace_s)
        await asyncio.wait({reader}, timeout=_DRAIN_AFTER_KILL_S)
    finally:
        # Runs on success, error and cancellation alike: kill, reap, close.
        try:
            await terminate_group(child, kill_grace_s)
            await reap(child, timeout_s=kill_grace_s)
            await child.release()
        finally:
            for task in (reader, writer):
                task.cancel()
            try:
                # asyncio.wait never raises the tasks' errors, only our own
                # cancellation, which must propagate.
                await asyncio.wait({reader, writer})
            finally:
                dispose(child)
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
