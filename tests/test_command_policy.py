"""The worker's command policy: allowlist, cwd root, environment scrubbing."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from llmmixer.activities.command_policy import (
    PRODUCTION_ALLOWLIST,
    CommandPolicy,
    is_secret_name,
    scrub_environment,
)
from llmmixer.activities.contracts import CommandCall
from llmmixer.activities.terminal import CommandRefusedError, run_command
from llmmixer.activities.terminal_mode import TerminalCapability, probe_pty


def call(argv: list[str], **fields: object) -> CommandCall:
    return CommandCall(workflow_id="wf", step_id="s", argv=argv, **fields)


def worker_env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": "/home/worker", **extra}


def test_unset_allowlist_allows_everything() -> None:
    policy = CommandPolicy.from_env(worker_env())
    assert policy.allowed_executables is None
    prepared = policy.prepare(call([sys.executable, "-c", "pass"]))
    assert prepared.executable == os.path.abspath(sys.executable)


def test_refusal_names_the_setting_and_how_to_change_it() -> None:
    policy = CommandPolicy.from_env(worker_env(LLMMIXER_PTY_ALLOW="git, npm"))
    assert policy.allowed_executables == frozenset({"git", "npm"})
    with pytest.raises(CommandRefusedError) as refused:
        policy.prepare(call(["rm", "-rf", "/tmp/x"]))
    message = str(refused.value)
    assert "`rm` is not in LLMMIXER_PTY_ALLOW (git, npm)" in message
    assert "add `rm` to the worker's LLMMIXER_PTY_ALLOW" in message


def test_allowlist_accepts_names_and_absolute_paths() -> None:
    python = os.path.abspath(sys.executable)
    name = os.path.basename(python)
    by_path = CommandPolicy.from_env(worker_env(LLMMIXER_PTY_ALLOW=python))
    assert by_path.prepare(call([python])).executable == python
    by_name = CommandPolicy.from_env(
        worker_env(LLMMIXER_PTY_ALLOW=name, PATH=os.path.dirname(python))
    )
    assert by_name.prepare(call([name])).executable == python


def test_a_path_does_not_pass_for_an_allowed_name(tmp_path: Path) -> None:
    fake = tmp_path / "git"
    fake.write_text("#!/bin/sh\necho pwned\n")
    fake.chmod(0o755)
    policy = CommandPolicy.from_env(worker_env(LLMMIXER_PTY_ALLOW="git"))
    with pytest.raises(CommandRefusedError, match="LLMMIXER_PTY_ALLOW"):
        policy.prepare(call([str(fake)]))


def test_step_path_cannot_swap_the_program_behind_an_allowed_name(tmp_path: Path) -> None:
    fake = tmp_path / "git"
    fake.write_text("#!/bin/sh\necho pwned\n")
    fake.chmod(0o755)
    policy = CommandPolicy.from_env(worker_env(LLMMIXER_PTY_ALLOW="git"))
    try:
        prepared = policy.prepare(call(["git"], env={"PATH": str(tmp_path)}))
    except CommandRefusedError as exc:  # no git on this machine at all
        assert "not found" in str(exc)
    else:
        assert prepared.executable != str(fake)
        assert prepared.env["PATH"] == str(tmp_path)  # the child still gets the step's PATH


def test_production_allowlist_covers_the_agents() -> None:
    assert {"claude", "codex", "gemini", "git", "pytest"} <= PRODUCTION_ALLOWLIST


def test_cwd_escaping_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "project").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "sneaky").symlink_to(tmp_path / "outside")
    policy = CommandPolicy.from_env(worker_env(LLMMIXER_PTY_ROOT=str(root)))

    assert policy.prepare(call([sys.executable], cwd="project")).cwd == str(
        (root / "project").resolve()
    )
    assert policy.prepare(call([sys.executable])).cwd == str(root.resolve())
    for escape in ("..", "../outside", str(tmp_path / "outside"), "sneaky"):
        with pytest.raises(CommandRefusedError) as refused:
            policy.prepare(call([sys.executable], cwd=escape))
        assert "outside LLMMIXER_PTY_ROOT" in str(refused.value)
        assert "change the worker's LLMMIXER_PTY_ROOT" in str(refused.value)


def test_missing_cwd_is_refused(tmp_path: Path) -> None:
    policy = CommandPolicy.from_env(worker_env(LLMMIXER_PTY_ROOT=str(tmp_path)))
    with pytest.raises(CommandRefusedError, match="not a directory"):
        policy.prepare(call([sys.executable], cwd="missing"))


@pytest.mark.parametrize(
    "name",
    [
        "OPENAI_API_KEY",
        "TEMPORAL_API_KEY",
        "TEMPORAL_TLS_CLIENT_KEY_PATH",
        "ANTHROPIC_BASE_URL",
        "GOOGLE_API_KEY",
        "LLMMIXER_API_TOKEN",
        "GITHUB_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "MY_SERVICE_SECRET",
    ],
)
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


def test_ordinary_names_are_kept() -> None:
    env = {"PATH": "/bin", "HOME": "/h", "LANG": "C.UTF-8", "OPENAI_API_KEY": "sk-x"}
    assert scrub_environment(env) == {"PATH": "/bin", "HOME": "/h", "LANG": "C.UTF-8"}


@pytest.mark.parametrize("mode", ["pty", "pipe"])
async def test_planted_keys_do_not_reach_the_child_but_passthrough_does(mode: str) -> None:
    environ = worker_env(
        OPENAI_API_KEY="sk-planted-openai",
        TEMPORAL_API_KEY="planted-temporal",
        ANTHROPIC_API_KEY="sk-ant-passed",
        LLMMIXER_PTY_ENV_PASSTHROUGH="ANTHROPIC_API_KEY",
        LLMMIXER_PTY_MODE=mode,
    )
    policy = CommandPolicy.from_env(environ)
    if mode == "pty" and probe_pty() is not None:
        pytest.skip(f"no pty here: {probe_pty()}")
    script = (
        "import os\n"
        "for name in ('OPENAI_API_KEY', 'TEMPORAL_API_KEY', 'ANTHROPIC_API_KEY', 'STEP'):\n"
        "    print(name, os.environ.get(name, '<unset>'))"
    )
    step = call([sys.executable, "-c", script], env={"STEP": "visible"})
    prepared = policy.prepare(step)
    outcome = await run_command(
        step,
        mode=policy.terminal_capability().mode,
        env=prepared.env,
        cwd=prepared.cwd,
        executable=prepared.executable,
    )
    assert outcome.mode == mode
    assert "OPENAI_API_KEY <unset>" in outcome.output
    assert "TEMPORAL_API_KEY <unset>" in outcome.output
    assert "ANTHROPIC_API_KEY sk-ant-passed" in outcome.output
    assert "STEP visible" in outcome.output
    assert "planted" not in outcome.output


def test_bad_settings_name_themselves(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="LLMMIXER_PTY_MODE"):
        CommandPolicy.from_env({"LLMMIXER_PTY_MODE": "tty"})
    with pytest.raises(ValueError, match="LLMMIXER_PTY_KILL_GRACE_S"):
        CommandPolicy.from_env({"LLMMIXER_PTY_KILL_GRACE_S": "soon"})
    with pytest.raises(ValueError, match="LLMMIXER_PTY_ROOT"):
        CommandPolicy.from_env({"LLMMIXER_PTY_ROOT": str(tmp_path / "nope")})


def test_mode_setting_and_capability() -> None:
    forced = CommandPolicy.from_env({"LLMMIXER_PTY_MODE": "pipe"})
    assert forced.force_pipe
    capability = forced.terminal_capability()
    assert capability.mode == "pipe" and "forced" in capability.reason
    auto = TerminalCapability("auto")
    assert auto.mode in ("pty", "pipe")
    assert auto.mode == auto.mode  # decided once, then remembered


def test_forced_pty_without_ptyprocess_fails_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import llmmixer.activities.terminal_mode as terminal_mode

    monkeypatch.setattr(terminal_mode, "probe_pty", lambda: "no ptys in this test")
    with pytest.raises(RuntimeError, match="LLMMIXER_PTY_MODE=auto"):
        _ = TerminalCapability("pty").mode
    fallback = TerminalCapability("auto")
    assert fallback.mode == "pipe" and "no ptys in this test" in fallback.reason
