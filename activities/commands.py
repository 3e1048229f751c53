"""The ``PTY_ACTIVITY``: one command per activity execution, policed and heartbeating.

The worker builds one ``CommandActivities`` from its ``CommandPolicy`` (read
from ``LLMMIXER_PTY_*``) and registers ``run_command``. What the workflow
sees when a command does not succeed (``ApplicationError.type``)::

    CommandRefused   the policy refused argv[0], cwd or env (or the worker allows
                     no commands: LLMMIXER_PTY_ALLOW unset), the program is
                     missing, or a respond rule is invalid; non-retryable
                     (nothing ran)
    CommandTimeout   ran past ``timeout_s``; the group was killed; non-retryable
                     (a timeout is final), partial output in the details
    CommandFailed    exit code outside ``success_codes``; retryable, so the
                     step's retry policy decides; output tail in the message

Every error carries ``FailureDetails`` (attempt, partial output) as its first
detail. Cancellation (workflow cancelled, heartbeat timeout, worker shutdown)
arrives through heartbeats as ``CancelledError``; the runner then kills the
whole process group before the cancellation propagates.

Nothing a command prints leaves the activity unredacted: the worker's secret
values (read from its environment at start, ``core/secrets.py``) and key
shapes are cut from the output stream before it reaches deltas, heartbeat
tails, the result, failure messages or their details.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from temporalio import activity
from temporalio.exceptions import ApplicationError

from llmmixer.activities.agents import WorktreeError, finish_worktree, prepare_agent
from llmmixer.activities.deltas import DeltaForwarder
from llmmixer.activities.telemetry import observe_command
from llmmixer.activities.terminal.errors import CommandRefusedError
from llmmixer.activities.terminal.mode import TerminalCapability
from llmmixer.activities.terminal.policy import CommandPolicy
from llmmixer.activities.terminal.reaper import set_undumpable
from llmmixer.activities.terminal.runner import RunOutcome, run_command
from llmmixer.activities.terminal.text import bound_text
from llmmixer.core.contracts import (
    AGENT_ACTIVITY,
    PTY_ACTIVITY,
    AgentCall,
    CommandCall,
    CommandResult,
    ErrorType,
    FailureDetails,
)
from llmmixer.core.redaction import redact
from llmmixer.core.secrets import secret_values

__all__ = ["CommandActivities", "OutputDelta", "OutputSink"]

# Heartbeat at most this often; the SDK also throttles, but building the
# details for every chunk of a chatty command would be wasted work.
HEARTBEAT_INTERVAL_S = 2.0
# How much of the output's end rides on each heartbeat and in error messages.
HEARTBEAT_TAIL_CHARS = 2048
MESSAGE_TAIL_CHARS = 1500
# Failure details are recorded in history; keep them well below its limits.
PARTIAL_OUTPUT_BYTES = 256 * 1024
# How often a running command's output goes to watchers (one signal, so one
# history event and one workflow task, per batch).
DELTA_INTERVAL_S = 1.0
# Most text one batch carries: every batch is recorded in the run's history,
# and a chatty command (a test run, a build) would otherwise write its whole
# output there. Watchers show the last lines; the result keeps the rest.
DELTA_BATCH_CHARS = 4096


@dataclass(frozen=True, slots=True)
class OutputDelta:
    """A piece of cleaned output, for whoever the worker forwards it to."""

    workflow_id: str
    step_id: str
    attempt: int
    text: str


OutputSink = Callable[[OutputDelta], None]


class _Tail:
    """The last ``size`` characters of the output, kept cheaply."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._text = ""

    def add(self, text: str) -> None:
        self._text = (self._text + text)[-self._size :]

    @property
    def text(self) -> str:
        return self._text


class CommandActivities:
    """Holds the worker's policy and terminal capability; registers ``run_command``.

    ``stream_deltas``: send a running command's output to the run's
    watchers as ``step_delta`` events (the worker passes its
    ``LLMMIXER_STREAM_DELTAS`` setting). ``on_output`` receives every output
    delta as well (embedding, tests); it is called on the event loop and must
    not block.
    """

    def __init__(
        self,
        policy: CommandPolicy,
        capability: TerminalCapability | None = None,
        *,
        on_output: OutputSink | None = None,
        heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
        stream_deltas: bool = False,
        delta_interval_s: float = DELTA_INTERVAL_S,
    ) -> None:
        self.policy = policy
        # The policy's (the worker environment it was built from) and this
        # process's own: both are the worker's, and either may hold keys.
        self.secrets = policy.secrets | secret_values(os.environ)
        # This process holds the keys and starts commands as the same user:
        # make its memory and /proc/<pid>/environ unreadable to them.
        set_undumpable()
        self.capability = capability or policy.terminal_capability()
        self.on_output = on_output
        self.heartbeat_interval_s = heartbeat_interval_s
        self.stream_deltas = stream_deltas
        self.delta_interval_s = delta_interval_s
        # Decide now: a worker told LLMMIXER_PTY_MODE=pty on a host without
        # ptys should fail at start-up, not on its first step.
        _ = self.capability.mode

    @activity.defn(name=PTY_ACTIVITY)
    async def run_command(self, call: CommandCall) -> CommandResult:
        info = activity.info()
        attempt = info.attempt
        mode = self.capability.mode
        try:
            prepared = self.policy.prepare(call)
        except CommandRefusedError as exc:
            raise self._refused(exc, attempt) from None

        tail = _Tail(HEARTBEAT_TAIL_CHARS)
        interval = self.heartbeat_interval_s
        if info.heartbeat_timeout:
            # Three beats per timeout window survive one slow or lost beat.
            interval = min(interval, info.heartbeat_timeout.total_seconds() / 3)
        last_beat = 0.0

        def beat() -> None:
            nonlocal last_beat
            last_beat = time.monotonic()
            activity.heartbeat(tail.text)

        sink = self.on_output
        # A quick command's output is in its result only; a longer one's
        # last batch follows before the activity returns.
        deltas = DeltaForwarder.open(
            call.step_id,
            attempt,
            enabled=self.stream_deltas,
            interval_s=self.delta_interval_s,
            max_batch_chars=DELTA_BATCH_CHARS,
            silent_if_quick=True,
        )

        def on_output(text: str) -> None:
            tail.add(text)
            deltas(text)
            if sink is not None:
                sink(OutputDelta(call.workflow_id, call.step_id, attempt, text))
            if time.monotonic() - last_beat >= interval:
                beat()

        async def beat_while_quiet() -> None:
            # A silent command (a long test run) must still heartbeat, both to
            # stay alive and to receive cancellation.
            while True:
                await asyncio.sleep(max(interval - (time.monotonic() - last_beat), 0.05))
                if time.monotonic() - last_beat >= interval:
                    beat()

        beat()
        beater = asyncio.create_task(beat_while_quiet(), name=f"heartbeat-{call.step_id}")
        try:
            async with deltas:
                outcome = await observe_command(
                    call,
                    prepared.executable,
                    lambda: run_command(
                        call,
                        mode=mode,
                        on_output=on_output,
                        env=prepared.env,
                        cwd=prepared.cwd,
                        executable=prepared.executable,
                        kill_grace_s=self.policy.kill_grace_s,
                        launcher=prepared.launcher,
                        secrets=self.secrets,
                        max_output_bytes=prepared.max_output_bytes,
                    ),
                )
        except CommandRefusedError as exc:
            raise self._refused(exc, attempt) from None
        finally:
            beater.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beater

        if outcome.timed_out:
            raise self._redacted(_timeout_error(call, outcome, attempt))
        if outcome.exit_code not in call.success_codes:
            raise self._redacted(_failed_error(call, outcome, attempt))
        return CommandResult(
            output=outcome.output,
            exit_code=outcome.exit_code,
            mode=outcome.mode,
            truncated=outcome.truncated,
            duration_ms=outcome.duration_ms,
            attempt=attempt,
        )

    @activity.defn(name=AGENT_ACTIVITY)
    async def run_agent(self, call: AgentCall) -> CommandResult:
        """A CLI coding agent as a preset over ``run_command``, optionally in a worktree.

        The worktree keeps parallel agents out of each other's checkout; it is
        removed whatever happens, and the changes come back as a diff.
        """
        attempt = activity.info().attempt
        try:
            # Before anything runs, git for the worktree included.
            self.policy.check_allowed()
            self.policy.check_step_env(call.env)
            launch = await prepare_agent(call, self.policy)
        except WorktreeError as exc:
            raise ApplicationError(
                redact(f"{exc}; or set `worktree: false` on the step", self.secrets),
                _details(attempt, None),
                type=ErrorType.COMMAND_REFUSED,
                non_retryable=True,
            ) from None
        except CommandRefusedError as exc:
            raise self._refused(exc, attempt) from None
        worktree = launch.worktree
        try:
            result = await self.run_command(launch.command)
        finally:
            diff = await finish_worktree(worktree) if worktree is not None else None
        if diff is None:
            return result
        diff = redact(diff, self.secrets)
        shown = diff if diff.strip() else "(no changes)\n"
        return result.model_copy(
            update={"diff": diff, "output": f"{result.output.rstrip()}\n\n--- changes ---\n{shown}"}
        )

    def _refused(self, exc: CommandRefusedError, attempt: int) -> ApplicationError:
        return self._redacted(_refused(exc, attempt))

    def _redacted(self, error: ApplicationError) -> ApplicationError:
        """``error`` with its message redacted once more, whatever built it.

        The output in it is redacted already; this also covers what the
        message quotes from elsewhere (an OSError, a path).
        """
        return ApplicationError(
            redact(error.message, self.secrets),
            *error.details,
            type=error.type,
            non_retryable=error.non_retryable,
        )


def _details(attempt: int, output: str | None) -> dict[str, object]:
    partial = None if output is None else bound_text(output, PARTIAL_OUTPUT_BYTES)
    return FailureDetails(attempt=attempt, partial_output=partial).model_dump()


def _last_lines(output: str) -> str:
    text = output[-MESSAGE_TAIL_CHARS:].rstrip()
    return text if text else "(no output)"


def _refused(exc: CommandRefusedError, attempt: int) -> ApplicationError:
    return ApplicationError(
        str(exc),
        _details(attempt, None),
        type=ErrorType.COMMAND_REFUSED,
        non_retryable=True,
    )


def _timeout_error(call: CommandCall, outcome: RunOutcome, attempt: int) -> ApplicationError:
    return ApplicationError(
        f"`{call.argv[0]}` ran past timeout_s={call.timeout_s:g} and its process group "
        "was killed; raise the step's timeout_s or make the command finish sooner "
        f"(answer its prompts with respond rules). Last output:\n{_last_lines(outcome.output)}",
        _details(attempt, outcome.output),
        type=ErrorType.COMMAND_TIMEOUT,
        non_retryable=True,
    )


def _failed_error(call: CommandCall, outcome: RunOutcome, attempt: int) -> ApplicationError:
    codes = ", ".join(str(code) for code in call.success_codes)
    return ApplicationError(
        f"`{call.argv[0]}` exited with code {outcome.exit_code} (success_codes: {codes}); "
        "fix the cause shown below, or add the code to the step's success_codes if it "
        f"means success. Last output:\n{_last_lines(outcome.output)}",
        _details(attempt, outcome.output),
        type=ErrorType.COMMAND_FAILED,
        # The step's retry policy decides: flaky tests deserve another try.
        non_retryable=False,
    )
