"""The command runner without Temporal, in both terminal modes.

Test programs are small Python scripts run with ``sys.executable`` so nothing
depends on what else the machine has installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from fakes.processes import SPAWN_TREE, open_fds, pid_alive, pids_in, wait_gone

from llmmixer.activities.terminal import pty_child
from llmmixer.activities.terminal.child import TerminalMode
from llmmixer.activities.terminal.errors import CommandRefusedError
from llmmixer.activities.terminal.runner import run_command
from llmmixer.activities.terminal.text import TextCleaner, bound_text, clean_terminal_text
from llmmixer.core.contracts import CommandCall, RespondRule

pytestmark = pytest.mark.timeout(60)

MODES: list[TerminalMode] = ["pty", "pipe"]


def py(script: str, *args: str, **fields: object) -> CommandCall:
    return CommandCall(
        workflow_id="wf",
        step_id="step",
        argv=[sys.executable, "-c", script, *args],
        **fields,
    )


PROCEED = r"""
import sys
sys.stdout.write("Proceed? [y/N] ")
sys.stdout.flush()
answer = sys.stdin.readline().strip()
print("answered", repr(answer))
sys.exit(0 if answer == "y" else 1)
"""


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> TerminalMode:
    return request.param


async def test_prompt_is_answered(mode: TerminalMode) -> None:
    call = py(PROCEED, respond=[RespondRule(expect=r"Proceed\? \[y/N\]", send="y\n")])
    outcome = await run_command(call, mode=mode)
    assert outcome.exit_code == 0, outcome.output
    assert "answered 'y'" in outcome.output
    assert outcome.mode == mode
    assert not outcome.timed_out


async def test_colour_codes_stripped_and_line_endings_normalised(mode: TerminalMode) -> None:
    script = (
        "import sys\n"
        r"sys.stdout.write('\x1b[1;31mred\x1b[0m \x1b]0;title\x07plain\r\n')" + "\n"
        r"sys.stdout.write('\x1b[2K\x1b[1Gprogress\rdone\n')"
    )
    outcome = await run_command(py(script), mode=mode)
    assert outcome.output == "red plain\nprogress\ndone\n"
    assert "\x1b" not in outcome.output and "\r" not in outcome.output


async def test_times_limits_how_often_a_rule_fires(mode: TerminalMode) -> None:
    # Asks three times; an unanswered question gives up after 1 s.
    script = r"""
import select, sys
for i in range(3):
    sys.stdout.write(f"Again {i}? ")
    sys.stdout.flush()
    ready, _, _ = select.select([sys.stdin], [], [], 1.0)
    print("yes" if ready and sys.stdin.readline().strip() == "y" else "unanswered")
"""
    call = py(script, respond=[RespondRule(expect=r"Again \d\?", send="y\n", times=2)])
    outcome = await run_command(call, mode=mode)
    assert outcome.exit_code == 0
    assert outcome.output.count("yes") == 2, outcome.output
    assert outcome.output.count("unanswered") == 1


async def test_rule_matches_only_output_after_its_last_match(mode: TerminalMode) -> None:
    # Both prompts arrive in one chunk: the rule fires once per prompt, not
    # once per chunk, and never twice on the same text.
    script = r"""
import sys
sys.stdout.write("Q? Q? ")
sys.stdout.flush()
print(repr(sys.stdin.readline()), repr(sys.stdin.readline()))
"""
    call = py(script, respond=[RespondRule(expect=r"Q\?", send="a\n")], timeout_s=10)
    outcome = await run_command(call, mode=mode)
    assert "'a\\n' 'a\\n'" in outcome.output


@pytest.mark.parametrize("stubborn", [False, True], ids=["polite", "ignores-sigterm"])
async def test_timeout_kills_child_and_grandchild(mode: TerminalMode, stubborn: bool) -> None:
    args = ["stubborn"] if stubborn else []
    call = py(SPAWN_TREE, *args, timeout_s=2.0)
    outcome = await run_command(call, mode=mode, kill_grace_s=0.5)
    assert outcome.timed_out
    child, grandchild = pids_in(outcome.output)
    assert child == outcome.pid
    assert await wait_gone([child, grandchild], timeout_s=3) == []
    assert outcome.exit_code is not None and outcome.exit_code < 0  # killed by a signal


async def test_cancellation_kills_the_group_and_reraises(mode: TerminalMode) -> None:
    seen: list[str] = []
    task = asyncio.create_task(
        run_command(py(SPAWN_TREE, timeout_s=60), mode=mode, on_output=seen.append)
    )
    for _ in range(200):
        if "PIDS" in "".join(seen):
            break
        await asyncio.sleep(0.05)
    child, grandchild = pids_in("".join(seen))
    assert pid_alive(child) and pid_alive(grandchild)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_gone([child, grandchild], timeout_s=3) == []


# Runs one SPAWN_TREE command and forwards its output, until it is killed.
RUNNER = r"""
import asyncio, sys
from llmmixer.core.contracts import CommandCall
from llmmixer.activities.terminal.runner import run_command
call = CommandCall(workflow_id="wf", step_id="s", argv=[sys.executable, "-c", sys.argv[2]])
out = lambda text: (sys.stdout.write(text), sys.stdout.flush())
asyncio.run(run_command(call, mode=sys.argv[1], on_output=out, kill_grace_s=0.5))
"""


async def test_the_group_dies_with_a_sigkilled_runner(mode: TerminalMode) -> None:
    # A dead worker's step runs again elsewhere, so the dead worker's copy
    # must stop. A PTY hangs up; in pipe mode the supervisor kills the group.
    runner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RUNNER, mode, SPAWN_TREE, stdout=asyncio.subprocess.PIPE
    )
    assert runner.stdout is not None
    try:
        line = await asyncio.wait_for(runner.stdout.readline(), 20)
        pids = pids_in(line.decode())
        assert all(pid_alive(pid) for pid in pids)
    finally:
        runner.kill()
        await runner.wait()
    left = await wait_gone(pids, timeout_s=5)
    for pid in left:  # a failure must not leave sleepers behind
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"{mode}: command outlived its runner"


async def test_background_process_left_behind_is_killed(mode: TerminalMode) -> None:
    # The command "succeeds" but leaves a sleeper in its group holding the
    # output open: it must not outlive the step.
    script = r"""
import os, subprocess, sys
p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print("PIDS", p.pid, flush=True)
os._exit(0)
"""
    outcome = await run_command(py(script, timeout_s=30), mode=mode, kill_grace_s=0.5)
    assert outcome.exit_code == 0
    assert not outcome.timed_out
    assert await wait_gone(pids_in(outcome.output), timeout_s=3) == []


async def test_output_flood_is_truncated_head_marker_tail(mode: TerminalMode) -> None:
    script = r"""
import sys
sys.stdout.write("HEAD\n")
for i in range(20000):
    sys.stdout.write(f"line {i:06d} " + "x" * 40 + "\n")
sys.stdout.write("TAIL\n")
"""
    outcome = await run_command(py(script, max_output_bytes=10_000), mode=mode)
    assert outcome.exit_code == 0
    assert outcome.truncated and outcome.truncated_bytes > 900_000
    assert outcome.output.startswith("HEAD\nline 000000 ")
    assert outcome.output.endswith("TAIL\n")
    marker = re.search(r"\n\[\.\.\. (\d+) bytes truncated \.\.\.\]\n", outcome.output)
    assert marker and int(marker.group(1)) == outcome.truncated_bytes
    assert len(outcome.output.encode()) < 10_000 + 100


async def test_argv_is_never_run_through_a_shell(mode: TerminalMode, tmp_path: Path) -> None:
    victim = tmp_path / "x"
    victim.mkdir()
    hostile = f"; rm -rf {victim}"
    outcome = await run_command(
        py("import sys; print('ARG', repr(sys.argv[1]), len(sys.argv))", hostile), mode=mode
    )
    assert f"ARG {hostile!r} 2" in outcome.output
    assert victim.is_dir()


async def test_stdin_text_is_written_then_input_ends(mode: TerminalMode) -> None:
    script = "import sys; data = sys.stdin.read(); print('GOT', repr(data))"
    outcome = await run_command(py(script, stdin="hello\nworld\n", timeout_s=10), mode=mode)
    assert outcome.exit_code == 0
    assert "GOT 'hello\\nworld\\n'" in outcome.output


async def test_exit_codes_are_reported(mode: TerminalMode) -> None:
    outcome = await run_command(py("import sys; print('bye'); sys.exit(3)"), mode=mode)
    assert outcome.exit_code == 3
    assert outcome.output == "bye\n"


@pytest.fixture
def real_tmp(tmp_path: Path) -> Path:
    return tmp_path.resolve()


async def test_env_and_cwd_reach_the_child(mode: TerminalMode, real_tmp: Path) -> None:
    script = "import os; print(os.getcwd(), os.environ['STEP_VAR'])"
    call = py(script, env={"STEP_VAR": "from-step"}, cwd=str(real_tmp))
    outcome = await run_command(call, mode=mode)
    assert outcome.output.strip() == f"{real_tmp} from-step"


async def test_a_pty_child_gets_a_term_even_if_the_worker_has_none(mode: TerminalMode) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    script = "import os, sys; print(sys.stdout.isatty(), os.environ.get('TERM'))"
    outcome = await run_command(py(script), mode=mode, env=env)
    expected = "True xterm-256color" if mode == "pty" else "False None"
    assert outcome.output.strip() == expected


async def test_no_file_descriptor_leaks(mode: TerminalMode) -> None:
    def ours(fds: set[str]) -> set[str]:
        return {fd for fd in fds if "pipe:" in fd or "ptmx" in fd or "/dev/pts" in fd}

    before = ours(open_fds())
    await run_command(py("print('hi')"), mode=mode)
    await run_command(py(PROCEED, respond=[RespondRule(expect="Proceed", send="y\n")]), mode=mode)
    await run_command(py(SPAWN_TREE, timeout_s=1.0), mode=mode, kill_grace_s=0.2)
    task = asyncio.create_task(run_command(py(SPAWN_TREE, timeout_s=60), mode=mode))
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(CommandRefusedError):
        await run_command(py("", respond=[RespondRule(expect="(", send="")]), mode=mode)
    assert ours(open_fds()) - before == set()


async def test_missing_program_is_refused(mode: TerminalMode) -> None:
    call = CommandCall(workflow_id="wf", step_id="s", argv=["no-such-program-llmmixer"])
    with pytest.raises(CommandRefusedError, match="not found on the worker's PATH"):
        await run_command(call, mode=mode)


async def test_on_output_sees_cleaned_deltas(mode: TerminalMode) -> None:
    seen: list[str] = []
    script = r"import sys; print('\x1b[32mone\x1b[0m'); sys.stdout.flush(); print('two')"
    outcome = await run_command(py(script), mode=mode, on_output=seen.append)
    assert "".join(seen) == outcome.output == "one\ntwo\n"


async def test_a_failing_output_sink_does_not_break_the_command(mode: TerminalMode) -> None:
    def broken(_: str) -> None:
        raise RuntimeError("sink down")

    outcome = await run_command(py("print('fine')"), mode=mode, on_output=broken)
    assert outcome.exit_code == 0 and outcome.output == "fine\n"


def test_cleaner_handles_sequences_split_across_reads() -> None:
    cleaner = TextCleaner()
    parts = [b"a\x1b[3", b"1mb\r", b"\nc\xe2\x82", b"\xac\x1b]8;;http://x", b"\x07d\r"]
    text = "".join(cleaner.feed(part) for part in parts) + cleaner.flush()
    assert text == "ab\nc€d\n"


def test_clean_terminal_text_drops_control_characters() -> None:
    assert clean_terminal_text("a\x07b\x1b(Bc\tz\x00") == "abc\tz"


def test_bound_text_keeps_short_text_whole() -> None:
    assert bound_text("short", 100) == "short"
    cut = bound_text("a" * 50 + "b" * 50, 20)
    assert cut.startswith("a" * 10) and cut.endswith("b" * 10)
    assert "[... 80 bytes truncated ...]" in cut


async def test_a_backtracking_respond_pattern_does_not_stall_the_event_loop(
    mode: TerminalMode,
) -> None:
    """``(a+)+$`` against ``aaaa...b`` takes ``re`` minutes; RE2 is linear."""
    gaps: list[float] = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    script = "import sys; sys.stdout.write('a' * 40000 + 'b'); sys.stdout.flush()"
    started = time.monotonic()
    try:
        outcome = await run_command(
            py(script, respond=[RespondRule(expect=r"(a+)+$", send="x\n")]), mode=mode
        )
    finally:
        ticker.cancel()
    assert outcome.exit_code == 0 and outcome.output.endswith("ab")
    assert time.monotonic() - started < 5
    assert gaps and max(gaps) < 0.5  # the loop kept turning: heartbeats would flow


async def test_a_pattern_re2_cannot_run_is_refused_before_spawning(mode: TerminalMode) -> None:
    rules = [RespondRule(expect="fine", send="y\n"), RespondRule(expect=r"(?<=x)y", send="")]
    with pytest.raises(CommandRefusedError) as refused:
        await run_command(py("print('must not run')", respond=rules), mode=mode)
    message = str(refused.value)
    assert "respond[1].expect" in message and "RE2" in message


async def test_output_is_redacted_before_it_is_bounded_or_forwarded(mode: TerminalMode) -> None:
    secret = "worker-secret-0123456789abcdef"
    # The secret straddles the head/tail cut of a 64-byte bound, and a read.
    script = (
        "import sys, time\n"
        f"sys.stdout.write('x' * 20 + {secret[:10]!r}); sys.stdout.flush(); time.sleep(0.3)\n"
        f"sys.stdout.write({secret[10:]!r} + ' sk-ant-abcdefghijkl\\n' + 'y' * 300)"
    )
    seen: list[str] = []
    outcome = await run_command(
        py(script, max_output_bytes=64),
        mode=mode,
        on_output=seen.append,
        secrets=[secret],
    )
    streamed = "".join(seen)
    assert streamed.startswith("x" * 20 + "[REDACTED] [REDACTED]\n")
    for text in (outcome.output, streamed):
        for fragment in (secret[:10], secret[10:], "sk-ant-abc"):
            assert fragment not in text
    assert outcome.output.startswith("x" * 20 + "[REDACTED]")


@pytest.mark.skipif(sys.platform != "linux", reason="capabilities and /proc are Linux's")
async def test_launcher_starts_the_program_without_capabilities(mode: TerminalMode) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        if os.environ.get("CI") == "true":
            pytest.fail("setpriv (util-linux) is missing on this CI machine")
        pytest.skip("setpriv (util-linux) is not installed")
    script = "print([l for l in open('/proc/self/status') if l.startswith('CapEff')][0])"
    launcher = [setpriv, "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--"]
    outcome = await run_command(py(script), mode=mode, launcher=launcher)
    assert outcome.exit_code == 0, outcome.output
    assert "CapEff:\t0000000000000000" in outcome.output


async def test_a_pipe_supervisor_does_not_carry_the_workers_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The supervisor's /proc/<pid>/environ is its start environment: keep keys out."""
    monkeypatch.setenv("ACME_API_TOKEN", "supervisor-must-not-hold-this")
    script = "import os, time; print('PARENT', os.getppid(), flush=True); time.sleep(3)"
    seen: list[str] = []
    task = asyncio.create_task(
        run_command(
            py(script), mode="pipe", env={"PATH": os.environ["PATH"]}, on_output=seen.append
        )
    )
    try:
        for _ in range(200):
            if "PARENT" in "".join(seen):
                break
            await asyncio.sleep(0.02)
        supervisor = int("".join(seen).split()[1])
        environ = await asyncio.to_thread(Path(f"/proc/{supervisor}/environ").read_bytes)
        assert b"supervisor-must-not-hold-this" not in environ
        assert b"PATH=" not in environ  # only the locale, if anything
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# What makes the worker's death reach a PTY command: the terminal is its
# controlling terminal and it leads the session, so the kernel's hang-up when
# the master closes goes to its whole foreground group.
SESSION = (
    "import os, termios; print('SESSION', os.getsid(0) == os.getpid() == os.getpgrp(), "
    "os.tcgetpgrp(0) == os.getpgrp(), tuple(os.get_terminal_size(0)), "
    "bool(termios.tcgetattr(0)[3] & termios.ECHO))"
)


@pytest.mark.parametrize("session", ["setsid", "python shim"])
async def test_a_pty_command_leads_its_session_and_owns_its_terminal(
    session: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if session == "python shim":
        # Where util-linux's setsid is missing, a fresh interpreter does its job.
        monkeypatch.setattr(pty_child, "_SESSION_TOOL_DIRS", "/nonexistent-llmmixer")
        assert pty_child.session_launcher()[0] == sys.executable
    elif shutil.which("setsid", path="/usr/bin:/bin") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("setsid (util-linux) is missing on this CI machine")
        pytest.skip("setsid (util-linux) is not installed")
    outcome = await run_command(py(SESSION), mode="pty")
    assert outcome.exit_code == 0, outcome.output
    # Wide enough not to wrap tools' lines, and no echo of what respond rules send.
    assert "SESSION True True (200, 50) False" in outcome.output
    # The pid we watch and kill is the command itself, not a forked launcher.
    pid_line = await run_command(py("import os; print('PID', os.getpid())"), mode="pty")
    assert pids_in(pid_line.output, "PID") == [pid_line.pid]


async def test_a_spawn_cancelled_while_starting_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fork runs in a thread; cancelling the step meanwhile must not orphan the command."""
    started: list[int] = []
    original = pty_child._start_pty

    def slow_start(*args: object, **kwargs: object) -> pty_child._PtyStart:
        start = original(*args, **kwargs)  # type: ignore[arg-type]
        started.append(start.proc.pid)
        time.sleep(0.5)  # the step is cancelled while we are still here
        return start

    monkeypatch.setattr(pty_child, "_start_pty", slow_start)

    def ours(fds: set[str]) -> set[str]:
        return {fd for fd in fds if "ptmx" in fd or "/dev/pts" in fd}

    before = ours(open_fds())
    task = asyncio.create_task(
        run_command(py("import time; time.sleep(60)", timeout_s=90), mode="pty")
    )
    for _ in range(100):
        if started:
            break
        await asyncio.sleep(0.02)
    assert started, "the command never started"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_gone(started, timeout_s=5) == []
    for _ in range(100):  # the thread lets go of the terminal once it returns
        if not ours(open_fds()) - before:
            break
        await asyncio.sleep(0.02)
    assert ours(open_fds()) - before == set()
