"""``llmmixer doctor``: what is installed, reachable and configured; never a secret."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from llmmixer.activities.agents import (
    ENV_AGENT_SKIP_PERMISSIONS,
    ENV_AGENT_TRUST_FOLDERS,
    AgentSettings,
)
from llmmixer.activities.providers.settings import ALLOWED_BASE_URLS_VARIABLE, ProviderSettings
from llmmixer.activities.terminal.errors import CommandRefusedError
from llmmixer.activities.terminal.mode import probe_pty
from llmmixer.activities.terminal.policy import ALLOW_ANY, ENV_ALLOW, CommandPolicy
from llmmixer.activities.terminal.pty_child import session_launcher
from llmmixer.client.http.auth import TOKEN_ENV
from llmmixer.runtime.address import is_listening, is_loopback, parse_address
from llmmixer.runtime.connection import Connection
from llmmixer.runtime.home import llmmixer_home
from llmmixer.runtime.settings import ServeEnv, SettingsError, effective_settings
from llmmixer.runtime.storage import PayloadSettings
from llmmixer.runtime.telemetry import prometheus_address
from llmmixer.workers.devserver import EmbeddedServerError, find_temporal_binary

AGENT_EXECUTABLES = {
    "claude": "npm install -g @anthropic-ai/claude-code",
    "codex": "npm install -g @openai/codex",
    "gemini": "npm install -g @google/gemini-cli",
    "git": "apt-get install git (or your OS's package manager)",
}


async def run_doctor(*, json_output: bool) -> int:
    connection = Connection.from_env()
    host, port = parse_address(connection.address)
    listening = await is_listening(host, port)
    checks = await asyncio.to_thread(_collect, connection, listening)
    if json_output:
        print(json.dumps(checks, indent=2))
    else:
        width = max(len(item["check"]) for item in checks)
        for item in checks:
            mark = "ok  " if item["ok"] else "--  "
            print(f"{mark}{item['check']:<{width}} {item['detail']}")
    essential = {"python", "temporal CLI", "temporal server"}
    return 0 if all(item["ok"] for item in checks if item["check"] in essential) else 1


def _telemetry_summary(environ: Mapping[str, str]) -> str:
    endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    parts = [f"OTLP to {endpoint}" if endpoint else "off (set OTEL_EXPORTER_OTLP_ENDPOINT)"]
    try:
        metrics = prometheus_address(environ)
    except SettingsError as error:
        parts.append(str(error))
    else:
        if metrics:
            parts.append(f"Prometheus at http://{metrics}/metrics")
    return "; ".join(parts)


def settings_checks(environ: Mapping[str, str]) -> list[tuple[str, bool, str]]:
    """Every ``LLMMIXER_*`` setting in force: value, and ``set`` or ``default``.

    From the settings tree, so the list is every variable there is; a secret's
    value is never shown (``core.secrets`` decides which are), only that it is set.
    """
    rows: list[tuple[str, bool, str]] = []
    for setting in effective_settings(environ):
        detail = setting.problem or f"{setting.value} ({setting.source})"
        rows.append((setting.name, setting.problem is None, detail))
    return rows


def _collect(connection: Connection, listening: bool) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    host, _ = parse_address(connection.address)

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "ok": ok, "detail": detail})

    check("python", sys.version_info >= (3, 11), f"{platform.python_version()} at {sys.executable}")
    try:
        binary = find_temporal_binary()
        version = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=20, check=False
        ).stdout.strip()
        check("temporal CLI", True, f"{binary} ({version})")
    except (EmbeddedServerError, OSError, subprocess.TimeoutExpired) as error:
        check("temporal CLI", False, str(error))

    if listening:
        detail = f"{connection.address} answers (namespace {connection.namespace})"
    elif is_loopback(host):
        detail = (
            f"nothing at {connection.address}: `llmmixer run` will start the embedded server, "
            "or run `llmmixer dev`"
        )
    else:
        detail = f"nothing answers at {connection.address}: check TEMPORAL_ADDRESS and network"
    check("temporal server", listening or is_loopback(host), detail)
    check("task queue", True, connection.task_queue)
    try:
        check("home", True, str(llmmixer_home()))
    except (ValueError, OSError) as error:
        check("home", False, str(error))
    check("telemetry", True, _telemetry_summary(os.environ))
    try:
        payloads = PayloadSettings.from_env(os.environ)
    except ValueError as error:
        check("payloads", False, str(error))
    else:
        where = payloads.s3_bucket if payloads.store == "s3" else payloads.directory
        extras = [
            name
            for name, on in (("compressed", payloads.compress), ("encrypted", bool(payloads.keys)))
            if on
        ]
        check(
            "payloads",
            True,
            f"over {payloads.threshold} bytes go to {payloads.store} ({where})"
            + (f", {' and '.join(extras)}" if extras else ""),
        )

    try:
        providers = ProviderSettings.from_env(os.environ)
    except ValueError as error:
        check("providers", False, str(error))
    else:
        for provider, info in providers.describe().items():
            key_state = "set" if info.get("key_set") else "NOT set"
            check(
                f"provider {provider}",
                bool(info.get("key_set")),
                f"{info.get('key_variable')} {key_state}; endpoint {info.get('base_url')}",
            )
        allowed = ", ".join(providers.allowed_base_urls)
        check(
            "step base URLs",
            True,
            f"{allowed} (called without the worker's keys)"
            if allowed
            else "none: a step's own base_url is refused "
            f"(list origins in {ALLOWED_BASE_URLS_VARIABLE})",
        )
    for name, ok, detail in security_checks(os.environ):
        check(name, ok, detail)

    pty_problem = probe_pty()
    check(
        "pseudo-terminal",
        pty_problem is None,
        f"/dev/ptmx, session via {session_launcher()[0]}"
        if pty_problem is None
        else f"pipe fallback: {pty_problem}",
    )
    for executable, install in AGENT_EXECUTABLES.items():
        found = shutil.which(executable)
        check(f"executable {executable}", bool(found), found or f"not found: {install}")
    for name, ok, detail in settings_checks(os.environ):
        check(name, ok, detail)

    return checks


def security_checks(environ: Mapping[str, str]) -> list[tuple[str, bool, str]]:
    """The effective command policy, agent settings and `serve` token, as checks."""
    checks: list[tuple[str, bool, str]] = []
    try:
        policy = CommandPolicy.from_env(environ)
    except (ValueError, CommandRefusedError) as error:
        checks.append(("commands", False, str(error)))
    else:
        allowed = policy.allowed_executables
        if allowed is None:
            detail = (
                f"`llmmixer worker` runs none ({ENV_ALLOW} unset); "
                "`llmmixer dev` and `run` run any executable"
            )
        elif ALLOW_ANY in allowed:
            detail = f"any executable ({ENV_ALLOW}={ALLOW_ANY})"
        else:
            detail = f"only {', '.join(sorted(allowed))} ({ENV_ALLOW})"
        extras = [
            f"cwd inside {policy.root_dir}" if policy.root_dir else "any cwd",
            f"passes through {', '.join(sorted(policy.env_passthrough))}"
            if policy.env_passthrough
            else "no worker variable passed through",
        ]
        checks.append(("commands", True, f"{detail}; {'; '.join(extras)}"))
    try:
        agents = AgentSettings.from_env(environ)
    except CommandRefusedError as error:
        checks.append(("agents", False, str(error)))
    else:
        checks.append(
            (
                "agents",
                True,
                f"trust checkout config: {'yes' if agents.trust_folders else 'no'} "
                f"({ENV_AGENT_TRUST_FOLDERS}); specs may skip permissions: "
                f"{'yes' if agents.skip_permissions else 'no'} ({ENV_AGENT_SKIP_PERMISSIONS})",
            )
        )
    try:
        token = ServeEnv.from_env(environ).api_token
    except SettingsError as error:
        checks.append(("serve", False, str(error)))
    else:
        checks.append(
            (
                "serve",
                True,
                f"{TOKEN_ENV} set: requests need it, any host may be bound"
                if token
                else f"no token ({TOKEN_ENV} unset): loopback only, browsers on other sites "
                "refused",
            )
        )
    return checks
