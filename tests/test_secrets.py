"""Planted credentials never reach history, logs, traces, errors or the audit (docs/security.md).

The worker holds marker values for the provider key, the Temporal API key and
the HTTP API token. The fake provider echoes the key it received back in its
error bodies, as some real servers do, and a command step prints its
environment. Every place a secret could end up is then searched for the
markers; the test also checks that the echo really happened, so it cannot
pass by never exercising the leak.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from fakes.otel_capture import OtelCapture, install_otel_capture
from fakes.provider_server import FakeProviderServer, Reply
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from llmmixer.client.audit import audit_from_client, render_markdown
from llmmixer.client.mixer import MixerClient
from llmmixer.core.redaction import REDACTED, StreamRedactor, redact
from llmmixer.core.secrets import (
    SECRET_SUFFIXES,
    is_secret_field,
    is_secret_name,
    secret_values,
)
from llmmixer.core.validation import find_issues
from llmmixer.runtime.telemetry import client_interceptors
from llmmixer.workers.worker import WorkerSettings, mixer_worker
from llmmixer.workflows.records import RunStatus, StepStatus

MARK = uuid.uuid4().hex[:12]
MARKERS = {
    "OPENAI_API_KEY": f"sk-marker-{MARK}-openai",
    "TEMPORAL_API_KEY": f"temporal-marker-{MARK}",
    "LLMMIXER_API_TOKEN": f"api-token-marker-{MARK}",
    # Not on any list of provider names: found by shape (a URL with a
    # password) and by suffix; the command environment is an allow-list.
    "DATABASE_URL": f"postgres://app:db-marker-{MARK}@db.internal/app",
    "ACME_SERVICE_TOKEN": f"acme-marker-{MARK}",
}


@pytest.fixture
def otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtelCapture]:
    yield from install_otel_capture(monkeypatch)


@pytest.fixture
def worker_env(
    provider_server: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    # In the worker's environment and the process's, wherever code might look.
    for name, value in MARKERS.items():
        monkeypatch.setenv(name, value)
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        **provider_server.env(),
        **MARKERS,
        # The test is the operator: the `env` step may run.
        "LLMMIXER_PTY_ALLOW": "*",
    }


@pytest.fixture
async def traced_mixer(
    otel: OtelCapture, client: Client, task_queue: str, worker_env: dict[str, str]
) -> AsyncIterator[MixerClient]:
    traced = Client(
        client.service_client,
        namespace=client.namespace,
        data_converter=pydantic_data_converter,
        interceptors=client_interceptors(),
    )
    settings = WorkerSettings(task_queue=task_queue, shutdown_grace_s=2.0)
    async with mixer_worker(traced, settings, environ=worker_env) as worker, worker:
        yield MixerClient(traced, task_queue)


def _leaks(text: str) -> list[str]:
    return [name for name, value in MARKERS.items() if value in text]


async def test_planted_credentials_appear_nowhere(
    traced_mixer: MixerClient,
    otel: OtelCapture,
    provider_server: FakeProviderServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # auth: an echoed key in a 401 (not retried, the step waits for a person);
    # flaky: an echoed key in a 500 that is retried and then answered.
    provider_server.fail("openai", 401, model="gpt-4.1", echo_credential=True)
    provider_server.fail("openai", 500, model="gpt-4.1-mini", echo_credential=True)
    provider_server.script("openai", Reply(text="fine", usage=(2, 1)), model="gpt-4.1-mini")
    spec = {
        "name": "secrets",
        "defaults": {"retry": {"max_attempts": 2, "initial_interval_s": 0.1}},
        "steps": [
            {"id": "auth", "provider": "openai", "model": "gpt-4.1", "prompt": "a"},
            {"id": "flaky", "provider": "openai", "model": "gpt-4.1-mini", "prompt": "b"},
            {"id": "env", "kind": "pty", "command": ["env"]},
        ],
    }
    handle = await traced_mixer.start(spec)
    for _ in range(300):
        progress = await handle.progress()
        if progress.steps["auth"].status == StepStatus.WAITING and all(
            progress.steps[s].status == StepStatus.COMPLETED for s in ("flaky", "env")
        ):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(progress.model_dump_json(indent=1))
    # The credential was really sent and echoed, and the echo was redacted.
    assert all(call.sent_key(MARKERS["OPENAI_API_KEY"]) for call in provider_server.calls)
    assert "[REDACTED]" in (progress.steps["auth"].error or "")
    assert _leaks(progress.model_dump_json()) == []
    await handle.skip("auth", reason="no key")
    result = await handle.result()
    assert result.status == RunStatus.COMPLETED
    assert "PATH=" in (result.steps["env"].output or "")  # the command did print its env

    history = await handle.temporal.fetch_history()
    assert _leaks(history.to_json()) == [], "history"
    assert _leaks(result.model_dump_json()) == [], "result"
    audit = await audit_from_client(traced_mixer.temporal, handle.id)
    flaky_errors = [a["error"] for a in audit["steps"]["flaky"]["attempts"] if a["error"]]
    assert flaky_errors and all("[REDACTED]" in e for e in flaky_errors)
    assert _leaks(str(audit)) == [] and _leaks(render_markdown(audit)) == [], "audit"
    # The failures did reach spans and logs (redacted), so these checks bite.
    [auth_span] = otel.named("chat gpt-4.1")
    assert "[REDACTED]" in (auth_span.status.description or "")
    assert _leaks(otel.text()) == [], "traces"
    assert "[REDACTED]" in caplog.text
    assert _leaks(caplog.text) == [], "logs"
    events = [event async for event in handle.events()]
    assert _leaks("".join(event.model_dump_json() for event in events)) == [], "events"


# ---- what a secret is (core/secrets.py) and how text is redacted --------------------


def test_secret_values_come_from_names_and_urls_with_passwords() -> None:
    environ = {
        "PATH": "/usr/bin",
        "TEMPORAL_ADDRESS": "localhost:7233",  # an endpoint, not a secret
        "OPENAI_BASE_URL": "http://127.0.0.1:9999/v1",
        "ACME_API_KEY": "acme-key-value",
        "BROKER": "amqp://svc:p%40ss-word@mq.internal:5672/",
        "SHORT_TOKEN": "abc",  # too short to redact without shredding text
    }
    values = secret_values(environ)
    assert "acme-key-value" in values
    assert {"amqp://svc:p%40ss-word@mq.internal:5672/", "p%40ss-word", "p@ss-word"} <= values
    assert not {"localhost:7233", "/usr/bin", "http://127.0.0.1:9999/v1", "abc"} & values
    assert is_secret_name("LLMMIXER_PAYLOAD_KEY") and not is_secret_name("TEMPORAL_ADDRESS")


@pytest.mark.parametrize(
    "leak",
    [
        "sk-ant-api03-abcdefghijklmnop",
        "AIzaSyA1234567890abcdefghijklmnopq",
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_" + "a1B2" * 9,
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAA\n"
        "-----END OPENSSH PRIVATE KEY-----",
    ],
)
def test_key_shapes_are_redacted_without_being_configured(leak: str) -> None:
    redacted = redact(f"before {leak} after")
    assert leak not in redacted and REDACTED in redacted
    assert redacted.startswith("before ") and redacted.endswith(" after")


def test_a_urls_password_is_redacted_and_the_rest_kept() -> None:
    text = "connecting to postgres://app:hunter2-pw@db:5432/app"
    assert redact(text) == f"connecting to postgres://app:{REDACTED}@db:5432/app"


def test_stream_redaction_catches_a_secret_split_at_any_point() -> None:
    secret = "zz-worker-secret-0123456789"
    text = f"line one\nthe key is {secret} and it is {secret}\nbye"
    expected = redact(text, [secret])
    for cut in range(1, len(text)):
        stream = StreamRedactor([secret])
        out = stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.flush()
        assert out == expected, cut
    # One character at a time, releasing held tokens as a quiet command would.
    stream = StreamRedactor([secret])
    out = ""
    for char in text:
        out += stream.feed(char)
        if stream.can_release:
            out += stream.release_token()
    assert out + stream.flush() == expected


# ---- a spec never carries a secret: the same definition (core/secrets.py) ------


def _spec_issues(**step: object) -> list[str]:
    spec = {
        "name": "carries",
        "defaults": {"provider": "openai", "model": "gpt-4.1-mini"},
        "steps": [{"id": "s", "prompt": "hello", **step}],
    }
    return [str(issue) for issue in find_issues(spec)]


@pytest.mark.parametrize(
    "leak",
    [
        "sk-ant-api03-abcdefghijklmnop",
        "AKIAIOSFODNN7EXAMPLE",
        "github_pat_" + "a1B2" * 9,
        "xoxb-1234567890-abcdefghij",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAA\n"
        "-----END OPENSSH PRIVATE KEY-----",
        "postgres://app:hunter2-pw@db.internal:5432/app",
    ],
)
def test_a_value_redaction_would_cut_is_refused_in_a_spec(leak: str) -> None:
    # Before, the spec check kept its own shorter list: these went into history.
    issues = _spec_issues(prompt=f"use {leak} please")
    assert issues and issues[0].startswith("step s: prompt: looks like a credential")
    assert not any(leak in issue for issue in issues)


@pytest.mark.parametrize("field", ["AWS_ACCESS_KEY", "GPG_PASSPHRASE", "TLS_KEY_DATA"])
def test_a_field_named_like_a_secret_variable_is_refused(field: str) -> None:
    issues = _spec_issues(kind="pty", command=["make"], env={field: "value"})
    assert any(issue.startswith(f"step s: env.{field}: secret-looking field") for issue in issues)
    for suffix in SECRET_SUFFIXES:  # every worker secret suffix names a secret field
        assert is_secret_field(f"ACME{suffix}"), suffix


@pytest.mark.parametrize(
    "text",
    [
        "Write the task-definitions-for-all-services file",
        "Summarise the risk-assessment-framework-document",
    ],
)
def test_a_word_ending_in_sk_is_not_a_key(text: str) -> None:
    # "sk-" inside a word was taken for an OpenAI key: the spec was refused
    # and redaction cut the word out of every output.
    assert _spec_issues(prompt=text) == []
    assert redact(text) == text


def test_the_word_bearer_is_not_a_credential_in_a_spec() -> None:
    assert _spec_issues(prompt="Explain bearer instruments and their history") == []
    issues = _spec_issues(prompt="send Authorization: Bearer abcdefghijklmnop0123456789")
    assert issues and issues[0].startswith("step s: prompt: looks like a credential")
