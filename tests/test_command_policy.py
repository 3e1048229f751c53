"""The worker's command policy: allowlist, cwd root, allow-listed environment, hooks."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

from llmmixer.activities.terminal.errors import CommandRefusedError
from llmmixer.activities.terminal.mode import TerminalCapability, probe_pty
from llmmixer.activities.terminal.policy import (
    DEFAULT_MAX_OUTPUT_BYTES,
    PRODUCTION_ALLOWLIST,
    CommandPolicy,
    capability_launcher,
    is_hook_name,
    is_secret_name,
    local_operator_note,
    scrub_environment,
    worker_note,
)
from llmmixer.activities.terminal.runner import run_command
from llmmixer.core.contracts import CommandCall


def call(argv: list[str], **fields: object) -> CommandCall:
    return CommandCall(workflow_id="wf", step_id="s", argv=argv, **fields)


def worker_env(**extra: str) -> dict[str, str]:
    """A worker whose operator allows any executable, unless ``extra`` says otherwise."""
    return {"PATH": os.environ["PATH"], "HOME": "/home/worker", "LLMMIXER_PTY_ALLOW": "*", **extra}


def unset_allow_env() -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": "/home/worker"}


def test_unset_allowlist_runs_nothing_unless_the_user_is_the_operator() -> None:
    # `llmmixer worker`: unset means no command at all, and the refusal says
    # which variable the operator sets.
    with pytest.raises(CommandRefusedError) as refused:
        CommandPolicy.from_env(unset_allow_env()).prepare(call([sys.executable, "-c", "pass"]))
    assert "LLMMIXER_PTY_ALLOW is not set" in str(refused.value)
    with pytest.raises(CommandRefusedError, match="LLMMIXER_PTY_ALLOW"):
        CommandPolicy().prepare(call([sys.executable, "-c", "pass"]))
    # `llmmixer dev` / `run`, and an operator's explicit "*": any executable.
    for policy in (
        CommandPolicy.from_env(unset_allow_env(), user_is_operator=True),
        CommandPolicy.from_env(worker_env(LLMMIXER_PTY_ALLOW="*")),
    ):
        prepared = policy.prepare(call([sys.executable, "-c", "pass"]))
        assert prepared.executable == os.path.abspath(sys.executable)
    # An operator's list wins over "the user is the operator".
    listed = CommandPolicy.from_env(worker_env(LLMMIXER_PTY_ALLOW="git"), user_is_operator=True)
    with pytest.raises(CommandRefusedError, match="not in LLMMIXER_PTY_ALLOW"):
        listed.prepare(call([sys.executable, "-c", "pass"]))


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
    refusing = CommandPolicy.from_env(worker_env(LLMMIXER_PTY_ALLOW="git"))
    with pytest.raises(CommandRefusedError, match="LLMMIXER_PTY_ENV_ALLOW"):
        refusing.prepare(call(["git"], env={"PATH": str(tmp_path)}))
    # Even where the operator lets steps set PATH, the allowed name is looked
    # up on the worker's PATH.
    policy = CommandPolicy.from_env(
        worker_env(LLMMIXER_PTY_ALLOW="git", LLMMIXER_PTY_ENV_ALLOW="PATH")
    )
    try:
        prepared = policy.prepare(call(["git"], env={"PATH": str(tmp_path)}))
    except CommandRefusedError as exc:  # no git on this machine at all
        assert "not found" in str(exc)
    else:
        assert prepared.executable != str(fake)
        assert prepared.env["PATH"] == str(tmp_path)  # the child still gets the step's PATH


def test_production_allowlist_covers_the_agents_and_holds_no_interpreter() -> None:
    assert {"claude", "codex", "gemini", "git", "pytest"} <= PRODUCTION_ALLOWLIST
    # With any of these allowed, a step's arguments are a program: the
    # allowlist would allow everything.
    interpreters = {"python", "python3", "node", "npx", "npm", "make", "docker", "sh", "bash"}
    assert not interpreters & PRODUCTION_ALLOWLIST


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
        "ANTHROPIC_AUTH_TOKEN",
        "GOOGLE_API_KEY",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "LLMMIXER_API_TOKEN",
        "LLMMIXER_PAYLOAD_KEY",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "GITHUB_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "DATABASE_URL",
        "SSH_AUTH_SOCK",
        "MY_SERVICE_SECRET",
        "DB_PASSWORD",
        "SIGNING_PRIVATE_KEY",
        "SERVICE_ACCOUNT_CREDENTIALS",
    ],
)
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


def test_only_allow_listed_names_reach_commands() -> None:
    env = {
        "PATH": "/bin",
        "HOME": "/h",
        "LANG": "C.UTF-8",
        "LC_TIME": "C",
        "OPENAI_API_KEY": "sk-x",
        # No deny-list can name every secret a host holds.
        "ACME_LICENCE": "licence-value",
        "LLMMIXER_PAYLOAD_KEY": "k",
        "PYTHONPATH": "/evil",
    }
    assert scrub_environment(env) == {
        "PATH": "/bin",
        "HOME": "/h",
        "LANG": "C.UTF-8",
        "LC_TIME": "C",
    }
    assert scrub_environment(env, frozenset({"ACME_LICENCE"}))["ACME_LICENCE"] == "licence-value"


def test_command_environment_is_the_allow_list_plus_passthrough_plus_step_env() -> None:
    policy = CommandPolicy.from_env(
        worker_env(
            LANG="C.UTF-8",
            OPENAI_API_KEY="sk-worker-openai-key",
            DATABASE_URL="postgres://app:pw-secret@db/app",
            OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer otel-secret",
            SSH_AUTH_SOCK="/tmp/ssh-agent.sock",
            ANTHROPIC_API_KEY="anthropic-passed",
            LLMMIXER_PTY_ENV_PASSTHROUGH="ANTHROPIC_API_KEY",
            LLMMIXER_PTY_ALLOW="*",
        )
    )
    env = policy.command_environment({"CI": "1", "LANG": "en_GB.UTF-8"})
    assert env == {
        "PATH": os.environ["PATH"],
        "HOME": "/home/worker",
        "LANG": "en_GB.UTF-8",
        "ANTHROPIC_API_KEY": "anthropic-passed",
        "CI": "1",
    }
    # The values the worker redacts from everything a command prints.
    assert {
        "sk-worker-openai-key",
        "postgres://app:pw-secret@db/app",
        "pw-secret",
        "authorization=Bearer otel-secret",
        "anthropic-passed",
    } <= policy.secrets


HOOKS = [
    "GIT_PAGER",
    "GIT_SSH_COMMAND",
    "GIT_CONFIG_COUNT",
    "GIT_CONFIG_KEY_0",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "DYLD_INSERT_LIBRARIES",
    "NODE_OPTIONS",
    "PYTHONSTARTUP",
    "PYTHONPATH",
    "BASH_ENV",
    "ENV",
    "PATH",
    "PAGER",
    "EDITOR",
    "PERL5OPT",
    "RUBYOPT",
    "JAVA_TOOL_OPTIONS",
    "BASH_FUNC_ls%%",
    "HOME",
]


@pytest.mark.parametrize("name", HOOKS)
def test_step_env_may_not_set_a_hook_unless_the_operator_allows_it(name: str) -> None:
    assert is_hook_name(name)
    policy = CommandPolicy.from_env(worker_env(LLMMIXER_PTY_ALLOW="*"))
    with pytest.raises(CommandRefusedError) as refused:
        policy.command_environment({name: "/tmp/evil"})
    message = str(refused.value)
    assert f"env: {name}" in message
    assert f"add {name} to the worker's LLMMIXER_PTY_ENV_ALLOW" in message
    with pytest.raises(CommandRefusedError, match="LLMMIXER_PTY_ENV_ALLOW"):
        policy.prepare(call([sys.executable, "-c", "pass"], env={name: "/tmp/evil"}))
    allowing = CommandPolicy.from_env(
        worker_env(LLMMIXER_PTY_ALLOW="*", LLMMIXER_PTY_ENV_ALLOW=f"CI, {name}")
    )
    assert allowing.command_environment({name: "/tmp/evil"})[name] == "/tmp/evil"


@pytest.mark.parametrize("name", ["CI", "NO_COLOR", "RUST_LOG", "LANG", "TZ", "STEP_VAR"])
def test_ordinary_step_variables_are_fine(name: str) -> None:
    assert not is_hook_name(name)
    policy = CommandPolicy.from_env(worker_env(LLMMIXER_PTY_ALLOW="*"))
    assert policy.command_environment({name: "1"})[name] == "1"


@pytest.mark.skipif(probe_pty() is not None, reason="git pages only on a terminal")
async def test_an_allowed_git_cannot_run_another_program_through_its_pager(
    tmp_path: Path,
) -> None:
    """The attack: LLMMIXER_PTY_ALLOW=git, and the step's GIT_PAGER runs what it likes."""
    marker = tmp_path / "pwned"
    policy = CommandPolicy.from_env(worker_env(LLMMIXER_PTY_ALLOW="git", LLMMIXER_PTY_MODE="pty"))
    step = call(["git", "-p", "version"], env={"GIT_PAGER": f"touch {marker}; cat"})
    ran = False
    try:
        prepared = policy.prepare(step)
        await run_command(
            step,
            mode="pty",
            env=prepared.env,
            cwd=prepared.cwd,
            executable=prepared.executable,
            launcher=prepared.launcher,
        )
        ran = True
    except CommandRefusedError as refused:
        assert "GIT_PAGER" in str(refused) and "LLMMIXER_PTY_ENV_ALLOW" in str(refused)
    assert not marker.exists(), "the step's pager ran"
    assert not ran


def test_max_output_bytes_is_clamped_to_the_worker_ceiling() -> None:
    big = call([sys.executable], max_output_bytes=1 << 40)
    default = CommandPolicy.from_env(worker_env(LLMMIXER_PTY_ALLOW="*"))
    assert default.prepare(big).max_output_bytes == DEFAULT_MAX_OUTPUT_BYTES == 16 * 1024 * 1024
    capped = CommandPolicy.from_env(
        worker_env(LLMMIXER_PTY_ALLOW="*", LLMMIXER_PTY_MAX_OUTPUT_BYTES="65536")
    )
    assert capped.prepare(big).max_output_bytes == 65536
    small = call([sys.executable], max_output_bytes=2048)
    assert capped.prepare(small).max_output_bytes == 2048
    for bad in ("lots", "0", "100"):
        with pytest.raises(ValueError, match="LLMMIXER_PTY_MAX_OUTPUT_BYTES"):
            CommandPolicy.from_env({"LLMMIXER_PTY_MAX_OUTPUT_BYTES": bad})


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root worker needs setpriv")
def test_a_root_worker_without_setpriv_refuses_commands(tmp_path: Path) -> None:
    launcher, problem = capability_launcher(str(tmp_path))  # no setpriv there
    assert launcher == () and problem is not None
    policy = dataclasses.replace(
        CommandPolicy.from_env(worker_env(LLMMIXER_PTY_ALLOW="*")),
        launcher=launcher,
        launcher_problem=problem,
    )
    with pytest.raises(CommandRefusedError) as refused:
        policy.prepare(call([sys.executable, "-c", "pass"]))
    assert "setpriv" in str(refused.value) and "root" in str(refused.value)
    with_setpriv = CommandPolicy.from_env(worker_env(LLMMIXER_PTY_ALLOW="*"))
    launcher = with_setpriv.prepare(call(["python3", "-c", "pass"])).launcher
    assert launcher and os.path.basename(launcher[0]) == "setpriv"


@pytest.mark.parametrize("mode", ["pty", "pipe"])
async def test_planted_keys_do_not_reach_the_child_but_passthrough_does(mode: str) -> None:
    environ = worker_env(
        OPENAI_API_KEY="sk-planted-openai",
        TEMPORAL_API_KEY="planted-temporal",
        LLMMIXER_PAYLOAD_KEY="planted-payload-key",
        OTEL_EXPORTER_OTLP_HEADERS="authorization=planted-otel",
        DATABASE_URL="postgres://app:planted-db@db/app",
        AWS_SECRET_ACCESS_KEY="planted-aws",
        SSH_AUTH_SOCK="/tmp/planted-agent.sock",
        ACME_LICENCE="planted-licence",
        ANTHROPIC_API_KEY="anthropic-passed",
        LLMMIXER_PTY_ENV_PASSTHROUGH="ANTHROPIC_API_KEY",
        LLMMIXER_PTY_MODE=mode,
        LLMMIXER_PTY_ALLOW="*",
    )
    policy = CommandPolicy.from_env(environ)
    if mode == "pty" and probe_pty() is not None:
        pytest.skip(f"no pty here: {probe_pty()}")
    script = (
        "import os\n"
        "for name in ('OPENAI_API_KEY', 'TEMPORAL_API_KEY', 'ANTHROPIC_API_KEY', 'STEP'):\n"
        "    print(name, os.environ.get(name, '<unset>'))\n"
        "print(sorted(os.environ.items()))"
    )
    step = call([sys.executable, "-c", script], env={"STEP": "visible"})
    prepared = policy.prepare(step)
    outcome = await run_command(
        step,
        mode=policy.terminal_capability().mode,
        env=prepared.env,
        cwd=prepared.cwd,
        executable=prepared.executable,
        launcher=prepared.launcher,
    )
    assert outcome.mode == mode
    assert "OPENAI_API_KEY <unset>" in outcome.output
    assert "TEMPORAL_API_KEY <unset>" in outcome.output
    assert "ANTHROPIC_API_KEY anthropic-passed" in outcome.output
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
    import llmmixer.activities.terminal.mode as terminal_mode

    monkeypatch.setattr(terminal_mode, "probe_pty", lambda: "no ptys in this test")
    with pytest.raises(RuntimeError, match="LLMMIXER_PTY_MODE=auto"):
        _ = TerminalCapability("pty").mode
    fallback = TerminalCapability("auto")
    assert fallback.mode == "pipe" and "no ptys in this test" in fallback.reason


def test_start_up_notes_say_who_decides() -> None:
    local = local_operator_note({})
    assert local is not None and "any executable" in local and "LLMMIXER_PTY_ALLOW" in local
    assert local_operator_note({"LLMMIXER_PTY_ALLOW": "git"}) is None
    operator = worker_note({})
    assert operator is not None and "refuses" in operator and "LLMMIXER_PTY_ALLOW" in operator
    assert worker_note({"LLMMIXER_PTY_ALLOW": "*"}) is None
