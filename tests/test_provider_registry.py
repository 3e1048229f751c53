"""One provider registry: every layer learns its providers from it.

The proof that adding a provider is one adapter module plus one registry
entry: a separate Python process adds an ``echo`` entry (an OpenAI-compatible
server, here the fake provider server) to the registry before anything else
is imported, and ``llmmixer validate``, ``llmmixer doctor`` and the real
``LlmActivities`` pick it up with no other module touched. The rest pins
each built-in fact (names, variables, price tables) to the registry, so a
second copy cannot creep back in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

from fakes.provider_server import FakeProviderServer

from llmmixer.activities import telemetry
from llmmixer.activities.providers.errors import KEY_VARIABLES
from llmmixer.activities.providers.pool import ProviderPool, default_factories
from llmmixer.activities.providers.settings import ProviderSettings
from llmmixer.core.contracts import PROVIDERS
from llmmixer.core.provider_options import option_model, provider_option_issues
from llmmixer.core.providers import (
    PROVIDER_SPECS,
    provider_names,
    provider_spec,
    resolve,
)
from llmmixer.core.validation import find_issues

ECHO_MODULE = '''
from llmmixer.activities.providers.openai import OpenAIAdapter


class EchoAdapter(OpenAIAdapter):
    """An OpenAI-compatible server under its own name, key and endpoint."""

    provider = "echo"
'''

# Registers `echo` the way a new built-in entry would be declared, then runs
# the CLI (argv) or one activity call ("activity") in this process.
DRIVER = """
import asyncio
import json
import os
import runpy
import sys

from llmmixer.core import providers as registry

registry.PROVIDER_SPECS = (
    *registry.PROVIDER_SPECS,
    registry.ProviderSpec(
        name="echo",
        key_variables=("ECHO_API_KEY", "ECHO_TOKEN"),
        base_url_variable="ECHO_BASE_URL",
        default_base_url="https://echo.invalid/v1",
        adapter="echo_provider:EchoAdapter",
        options="llmmixer.core.provider_options:OpenAIOptions",
        price_key="echo-prices",
        example_model="echo-1",
        otel_name="echo",
    ),
)


async def activity(case: dict) -> dict:
    from temporalio.exceptions import ApplicationError
    from temporalio.testing import ActivityEnvironment

    from llmmixer.core.contracts import ChatMessage, LlmCall
    from llmmixer.activities.llm import LlmActivities, LlmSettings
    from llmmixer.activities.pricing import PriceTable
    from llmmixer.activities.providers.settings import ProviderSettings

    acts = LlmActivities(
        ProviderSettings.from_env(case["env"]),
        prices=PriceTable.from_toml('[echo-prices."echo-1"]\\ninput = 1.0\\noutput = 2.0\\n'),
        settings=LlmSettings(stream_deltas=False),
    )
    call = LlmCall(
        workflow_id="wf-echo",
        step_id="s",
        provider="echo",
        model="echo-1",
        messages=[ChatMessage(role="user", content="hello")],
        provider_options=case["options"],
        timeout_s=10,
    )
    try:
        reply = await ActivityEnvironment().run(acts.call_llm, call)
    except ApplicationError as error:
        return {"error": error.message, "type": error.type}
    finally:
        await acts.aclose()
    return reply.model_dump(mode="json")


async def activities(cases: list[dict]) -> None:
    print(json.dumps([await activity(case) for case in cases]))


if sys.argv[1] == "activity":
    asyncio.run(activities(json.loads(sys.argv[2])))
else:
    sys.argv = ["llmmixer", *sys.argv[1:]]
    runpy.run_module("llmmixer.client.cli", run_name="__main__")
"""

ECHO_KEY = "echo-key-0123456789abcdef"


def _with_echo(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (tmp_path / "echo_provider.py").write_text(ECHO_MODULE)
    (tmp_path / "with_echo.py").write_text(DRIVER)
    pythonpath = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, str(tmp_path / "with_echo.py"), *args],
        env={
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "LLMMIXER_HOME": str(tmp_path / "home"),
            "TEMPORAL_ADDRESS": "127.0.0.1:1",
            "PYTHONPATH": pythonpath,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_validate_accepts_a_registered_provider_and_lists_it_among_the_known(
    tmp_path: Path,
) -> None:
    spec = tmp_path / "echo.yaml"
    spec.write_text(
        "name: echo\nsteps:\n"
        "  - id: a\n    provider: echo\n    model: echo-1\n    prompt: hi\n"
        "    provider_options: {seed: 7}\n"
    )
    done = _with_echo(tmp_path, "validate", str(spec), env={})
    assert done.returncode == 0, done.stderr

    spec.write_text(
        "name: echo\nsteps:\n"
        "  - id: a\n    provider: echo\n    model: echo-1\n    prompt: hi\n"
        "    provider_options: {base_url: 'http://elsewhere.example'}\n"
        "  - id: b\n    provider: mistral\n    model: m\n    prompt: hi\n"
        "  - id: c\n    provider: echo\n    model: echo-1\n    prompt: hi\n    api_key: k\n"
    )
    done = _with_echo(tmp_path, "validate", str(spec), env={})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert any(
        line.startswith("step a: provider_options.base_url: not allowed; echo provider_options")
        for line in lines
    ), lines
    assert (
        "step b: provider: unknown provider 'mistral': use one of anthropic, openai, gemini, echo"
        in lines
    )
    assert any(
        line.startswith("step c: api_key: secret-looking field")
        and line.endswith(
            "set keys on the worker: ANTHROPIC_API_KEY, OPENAI_API_KEY, GEMINI_API_KEY, "
            "ECHO_API_KEY"
        )
        for line in lines
    ), lines


def test_doctor_reports_a_registered_providers_key_variable_and_endpoint(tmp_path: Path) -> None:
    done = _with_echo(
        tmp_path,
        "doctor",
        "--json",
        env={"ECHO_TOKEN": ECHO_KEY, "ECHO_BASE_URL": "https://echo.internal.example/v1"},
    )
    assert ECHO_KEY not in done.stdout + done.stderr
    checks = {item["check"]: item for item in json.loads(done.stdout)}
    assert checks["provider echo"] == {
        "check": "provider echo",
        "ok": True,
        "detail": "ECHO_TOKEN set; endpoint https://echo.internal.example/v1",
    }
    assert checks["provider openai"]["ok"] is False


def test_a_registered_provider_is_called_with_its_own_key_at_its_own_endpoint(
    tmp_path: Path, provider_server: FakeProviderServer
) -> None:
    provider_server.reply("openai", "echoed", model="echo-1")
    env = {"ECHO_API_KEY": ECHO_KEY, "ECHO_BASE_URL": provider_server.openai_base_url}
    cases = [
        {"env": env, "options": {"seed": 7}},
        # Its option schema is enforced before any request, under its own name.
        {"env": env, "options": {"base_url": "http://x.example"}},
        # Without its key (and endpoint) the failure names its own variable.
        {"env": {}, "options": {}},
    ]
    done = _with_echo(tmp_path, "activity", json.dumps(cases), env={})
    assert done.returncode == 0, done.stderr
    reply, refused, unauthorised = json.loads(done.stdout)

    assert reply["text"] == "echoed" and reply["provider"] == "echo"
    # Priced from the entry's own table in the price file.
    assert reply["cost_usd"] is not None and reply["cost_usd"] > 0
    (call,) = provider_server.calls
    assert call.sent_key(ECHO_KEY) and call.model == "echo-1" and call.body["seed"] == 7

    assert refused["type"] == "ProviderRejected"
    assert refused["error"].startswith("echo/echo-1: invalid echo provider_options")

    assert unauthorised["type"] == "ProviderAuth"
    assert "set ECHO_API_KEY on the worker" in unauthorised["error"]


# --- the built-in entries are the only copy ------------------------------------------


def test_every_layer_lists_exactly_the_registry_in_its_order() -> None:
    assert PROVIDERS == provider_names() == ("anthropic", "openai", "gemini")
    assert list(ProviderSettings.from_env({}).describe()) == list(PROVIDERS)
    assert list(default_factories()) == list(PROVIDERS)
    assert ProviderPool().providers() == list(PROVIDERS)
    issues = list(
        find_issues(
            {"name": "x", "steps": [{"id": "a", "provider": "p", "model": "m", "prompt": "hi"}]}
        )
    )
    assert [i.message for i in issues] == [
        f"unknown provider 'p': use one of {', '.join(provider_names())}"
    ]
    ((_, message),) = provider_option_issues("p", {"seed": 1})
    assert message.endswith(f"use one of {', '.join(provider_names())}")


def test_settings_read_the_registrys_variables_and_nothing_else() -> None:
    for spec in PROVIDER_SPECS:
        for variable in spec.key_variables:
            environ = {variable: f"key-{variable}", spec.base_url_variable: "https://h.example/v"}
            settings = ProviderSettings.from_env(environ)
            assert settings.api_key(spec.name) == f"key-{variable}"
            assert settings.describe()[spec.name] == {
                "key_variable": variable,
                "key_set": True,
                "base_url": "https://h.example/v",
                "base_url_default": False,
            }
        unset = ProviderSettings.from_env({}).describe()[spec.name]
        assert unset["base_url"] == spec.default_base_url and unset["base_url_default"]
        assert KEY_VARIABLES[spec.name] == spec.key_variables[0]
        assert telemetry._PROVIDER_NAMES[spec.name] == spec.otel_name


def test_every_entry_resolves_and_every_price_table_belongs_to_an_entry() -> None:
    for spec in PROVIDER_SPECS:
        assert resolve(spec.adapter).provider == spec.name
        assert option_model(spec.name) is resolve(spec.options)
    text = resources.files("llmmixer.activities").joinpath("prices.toml").read_text("utf-8")
    # `written` (the table's date) is the one top-level value that is no price table
    tables = {name for name, value in tomllib.loads(text).items() if isinstance(value, dict)}
    assert tables == {spec.price_key for spec in PROVIDER_SPECS}
    for spec in PROVIDER_SPECS:
        example = tomllib.loads(text)[spec.price_key]
        assert spec.example_model in example, f"{spec.name}'s example model has no price"
    assert provider_spec("gemini").key_variables == ("GEMINI_API_KEY", "GOOGLE_API_KEY")


def test_validation_and_the_workflow_side_import_no_sdk() -> None:
    code = (
        "import sys\n"
        "import llmmixer.core.validation, llmmixer.core.plans\n"
        "import llmmixer.activities.providers.settings, llmmixer.activities.pricing\n"
        "sdks = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('openai', 'anthropic', 'google'))\n"
        "print(','.join(sdks))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == ""
