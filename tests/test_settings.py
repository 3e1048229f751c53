"""The settings tree: every LLMMIXER_* variable declared once, read one way, refused one way.

A bad value of any variable fails with one error type whose line names the
variable, repeats what it got (never a secret) and gives an example that
really works; the worker reports it without a traceback; ``llmmixer doctor``
lists every setting with secrets masked; and no module can read a variable
the tree does not declare.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmmixer.client.cli import main
from llmmixer.client.doctor import settings_checks
from llmmixer.core.providers import provider_names
from llmmixer.runtime.settings import (
    DeclaredSetting,
    Settings,
    SettingsError,
    declared_settings,
    effective_settings,
)
from llmmixer.workers.worker import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent

# A value each variable must refuse. Written out here, not taken from the tree,
# so a new variable needs a line (test_every_declared_setting_has_a_bad_value).
BAD: dict[str, str] = {
    "LLMMIXER_TASK_QUEUE": "my queue",
    "LLMMIXER_PTY_TASK_QUEUE": "pty\tqueue",
    "LLMMIXER_HOME": "relative/home",
    "LLMMIXER_WORKER_ROLES": "workflows,gpu",
    "LLMMIXER_MAX_CONCURRENT_ACTIVITIES": "lots",
    "LLMMIXER_MAX_CONCURRENT_WORKFLOW_TASKS": "0",
    "LLMMIXER_SHUTDOWN_GRACE_S": "soon",
    "LLMMIXER_STREAM_DELTAS": "maybe",
    "LLMMIXER_HEALTH_PORT": "70000",
    "LLMMIXER_ALLOWED_BASE_URLS": "ftp://files.example",
    "LLMMIXER_RATE_LIMITS": "openai:gpt-4.1=5rps",
    "LLMMIXER_ALLOWED_MCP_URLS": "http://tools.example/../admin",
    "LLMMIXER_BREAKER_FAILURE_RATIO": "1.5",
    "LLMMIXER_BREAKER_MIN_CALLS": "-3",
    "LLMMIXER_BREAKER_WINDOW_S": "0",
    "LLMMIXER_BREAKER_COOLDOWN_S": "nan",
    "LLMMIXER_PTY_ALLOW": "git,bin/sh",
    "LLMMIXER_PTY_ROOT": "/nonexistent/llmmixer-root",
    "LLMMIXER_PTY_ENV_PASSTHROUGH": "HTTPS_PROXY,A=B",
    "LLMMIXER_PTY_ENV_ALLOW": "PYTHON PATH",
    "LLMMIXER_PTY_MAX_OUTPUT_BYTES": "512",
    "LLMMIXER_PTY_MODE": "tty",
    "LLMMIXER_PTY_KILL_GRACE_S": "-1",
    "LLMMIXER_AGENT_TRUST_FOLDERS": "sure",
    "LLMMIXER_AGENT_SKIP_PERMISSIONS": "2",
    "LLMMIXER_PAYLOAD_STORE": "disk",
    "LLMMIXER_PAYLOAD_DIR": "payloads",
    "LLMMIXER_PAYLOAD_S3_BUCKET": "My_Bucket",
    "LLMMIXER_PAYLOAD_THRESHOLD_BYTES": "1k",
    "LLMMIXER_MAX_ATTACHMENT_BYTES": "32MB",
    "LLMMIXER_PAYLOAD_COMPRESS": "zlib",
    "LLMMIXER_PAYLOAD_KEY": "hunter2-not-a-key",
    "LLMMIXER_CODEC_TOKEN": "short-secret",
    "LLMMIXER_OTEL_CAPTURE_CONTENT": "all",
    "LLMMIXER_PROMETHEUS_PORT": "metrics",
    "LLMMIXER_PROMETHEUS_HOST": "bad host!",
    "LLMMIXER_API_TOKEN": "hunter2-token",
    **{f"LLMMIXER_{name.upper()}_CONCURRENCY": "eight" for name in provider_names()},
}

DECLARED = declared_settings()


def _id(setting: DeclaredSetting) -> str:
    return setting.name


def _example(message: str, name: str) -> str:
    """The value the message suggests, made real when it is a command to run."""
    example = message.split(f"for example {name}=", 1)[1]
    command = re.fullmatch(r'\$\(python3 -c "(.+)"\)', example)
    if command is None:
        return example
    made = subprocess.run(
        [sys.executable, "-c", command.group(1)], capture_output=True, text=True, check=True
    )
    return made.stdout.strip()


def test_every_declared_setting_has_a_bad_value_here_and_names_are_unique() -> None:
    names = [setting.name for setting in DECLARED]
    assert len(names) == len(set(names))
    assert set(BAD) == set(names)
    # One concurrency variable per registered provider, from the registry.
    for provider in provider_names():
        assert f"LLMMIXER_{provider.upper()}_CONCURRENCY" in names


@pytest.mark.parametrize("setting", DECLARED, ids=_id)
def test_a_bad_value_names_the_variable_what_it_got_and_a_working_example(
    setting: DeclaredSetting,
) -> None:
    name, bad = setting.name, BAD[setting.name]
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({name: bad})
    assert refused.value.variables == (name,)
    message = str(refused.value)
    assert message.startswith(f"{name}: ")
    assert f"; for example {name}=" in message
    if setting.env.secret:
        assert bad not in message
        assert "not shown" in message
    else:
        assert repr(bad) in message
    # The example in the message is a value the same variable accepts.
    example = _example(message, name)
    Settings.from_env({name: example})
    (row,) = [row for row in effective_settings({name: example}) if row.name == name]
    assert row.source == "set" and row.problem is None


@pytest.mark.parametrize("setting", DECLARED, ids=_id)
def test_the_documented_example_is_accepted(setting: DeclaredSetting) -> None:
    example = _example(f"for example {setting.name}={setting.env.example}", setting.name)
    Settings.from_env({setting.name: example})


def test_several_bad_variables_are_all_listed_in_one_error() -> None:
    environ = {
        "LLMMIXER_SHUTDOWN_GRACE_S": "soon",
        "LLMMIXER_PTY_MODE": "tty",
        "LLMMIXER_OPENAI_CONCURRENCY": "eight",
        "LLMMIXER_PAYLOAD_STORE": "disk",
    }
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(environ)
    assert set(refused.value.variables) == set(environ)
    lines = str(refused.value).splitlines()
    assert len(lines) == 4
    assert (
        "LLMMIXER_SHUTDOWN_GRACE_S: 'soon' is not a number of seconds; "
        "for example LLMMIXER_SHUTDOWN_GRACE_S=30"
    ) in lines
    # The worker's own settings refuse the same way, listing them all.
    with pytest.raises(SettingsError) as again:
        WorkerSettings.from_env(environ)
    assert set(again.value.variables) == set(environ)


@pytest.mark.parametrize(
    ("text", "on"),
    [
        ("False", False),
        ("false", False),
        ("0", False),
        ("no", False),
        ("OFF", False),
        ("True", True),
        ("1", True),
        ("Yes", True),
        ("on", True),
        ("", True),
    ],
)
def test_stream_deltas_reads_the_usual_boolean_forms(text: str, on: bool) -> None:
    assert WorkerSettings.from_env({"LLMMIXER_STREAM_DELTAS": text}).stream_deltas is on


def test_stream_deltas_false_turns_streaming_off_for_the_worker() -> None:
    # Before the tree, only "0", "false" and "no" did: "False" left it on.
    settings = WorkerSettings.from_env({"LLMMIXER_STREAM_DELTAS": "False"})
    assert settings.stream_deltas is False
    assert WorkerSettings.from_env({}).stream_deltas is True


def test_settings_come_from_the_mapping_given_not_the_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMMIXER_SHUTDOWN_GRACE_S", "soon")
    monkeypatch.setenv("LLMMIXER_TASK_QUEUE", "from-the-process")
    settings = WorkerSettings.from_env({"LLMMIXER_OPENAI_CONCURRENCY": "3"})
    assert settings.task_queue == "llmmixer"
    assert settings.provider_concurrency == {"openai": 3}
    with pytest.raises(SettingsError, match="LLMMIXER_SHUTDOWN_GRACE_S"):
        Settings.from_env()


def test_credentials_never_appear_in_refusals() -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(
            {
                "LLMMIXER_PAYLOAD_KEY": "sk-planted-payload-key",
                "LLMMIXER_API_TOKEN": "planted",
                "LLMMIXER_ALLOWED_BASE_URLS": "http://user:planted-pw@llm.example:8080/v1,x",
            }
        )
    message = str(refused.value)
    assert "planted" not in message
    assert "LLMMIXER_ALLOWED_BASE_URLS" in message and "LLMMIXER_API_TOKEN" in message


_NAME = re.compile(r"\bLLMMIXER_[A-Z0-9_]*[A-Z0-9]\b")


def _package_sources() -> list[Path]:
    skip = {"tests", "build", "dist", ".git", ".venv", "__pycache__"}
    return [path for path in ROOT.rglob("*.py") if not skip & set(path.relative_to(ROOT).parts)]


def test_every_variable_named_in_the_source_is_declared_in_the_tree() -> None:
    declared = {setting.name for setting in DECLARED}
    used: dict[str, str] = {}
    built: list[str] = []
    for path in _package_sources():
        text = path.read_text()
        relative = path.relative_to(ROOT).as_posix()
        for name in _NAME.findall(text):
            used.setdefault(name, relative)
        # A name put together at run time would slip past the scan above.
        if relative != "runtime/settings.py" and re.search(r"LLMMIXER_\{", text):
            built.append(relative)
    undeclared = {name: where for name, where in used.items() if name not in declared}
    assert not undeclared, (
        f"declare these in runtime/settings.py (name, type, default, example): {undeclared}"
    )
    assert not built, f"LLMMIXER_ names built with f-strings; declare them instead: {built}"
    assert "LLMMIXER_PTY_ALLOW" in used and "LLMMIXER_STREAM_DELTAS" in used


def test_doctor_lists_every_setting_with_its_source_and_masks_secrets(tmp_path: Path) -> None:
    payload_key = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY="
    environ = {
        "LLMMIXER_TASK_QUEUE": "billing",
        "LLMMIXER_PTY_ROOT": str(tmp_path),
        "LLMMIXER_STREAM_DELTAS": "off",
        "LLMMIXER_PAYLOAD_KEY": payload_key,
        "LLMMIXER_API_TOKEN": "api-token-marker-0123456789",
        "LLMMIXER_CODEC_TOKEN": "tiny-c0dec",
    }
    rows = {name: (ok, detail) for name, ok, detail in settings_checks(environ)}
    assert set(rows) == {setting.name for setting in DECLARED}
    assert rows["LLMMIXER_TASK_QUEUE"] == (True, "billing (set)")
    assert rows["LLMMIXER_STREAM_DELTAS"] == (True, "false (set)")
    assert rows["LLMMIXER_PTY_ROOT"] == (True, f"{tmp_path} (set)")
    assert rows["LLMMIXER_SHUTDOWN_GRACE_S"] == (True, "30 (default)")
    assert rows["LLMMIXER_PAYLOAD_KEY"] == (True, "*** (set)")
    assert rows["LLMMIXER_API_TOKEN"] == (True, "*** (set)")
    # A bad secret is reported as bad, still without its value.
    ok, detail = rows["LLMMIXER_CODEC_TOKEN"]
    assert not ok and detail.startswith("LLMMIXER_CODEC_TOKEN: ")
    shown = "\n".join(detail for _, detail in rows.values())
    for secret in (payload_key, "api-token-marker", "tiny-c0dec"):
        assert secret not in shown


def test_the_worker_stops_with_the_settings_message_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLMMIXER_SHUTDOWN_GRACE_S", "soon")
    monkeypatch.setenv("LLMMIXER_WORKER_ROLES", "gpu")
    # Nothing listens here: the settings must be refused before any connection.
    monkeypatch.setenv("TEMPORAL_ADDRESS", "127.0.0.1:1")
    code = main(["worker"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert (
        "LLMMIXER_SHUTDOWN_GRACE_S: 'soon' is not a number of seconds; "
        "for example LLMMIXER_SHUTDOWN_GRACE_S=30"
    ) in err
    assert "LLMMIXER_WORKER_ROLES: 'gpu'" in err
