"""`llmmixer audit` puts the cost forecast (``llmmixer estimate``) next to what a run spent.

A real run against the fake providers: one step answers with exactly the
tokens the forecast expects, one with far more than its worst case. The audit,
rebuilt from history alone, must show both forecasts and both actuals, and
mark the one outside its bounds.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from fakes.provider_server import FakeProviderServer, Reply

from llmmixer.client.audit import audit_from_client, render_markdown
from llmmixer.client.estimate import estimate_spec
from llmmixer.client.mixer import MixerClient
from llmmixer.client.specfile import prepare_spec
from llmmixer.workflows.records import RunStatus


@pytest.fixture
def worker_env(provider_server: FakeProviderServer) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), **provider_server.env()}


SPEC: dict[str, Any] = {
    "name": "forecast",
    "inputs": {"topic": "cost forecasts"},
    "defaults": {"max_tokens": 100, "retry": {"max_attempts": 1}},
    "steps": [
        {
            "id": "draft",
            "provider": "openai",
            "model": "gpt-4.1-mini",
            "prompt": "Write one line about {{inputs.topic}}.",
        },
        {
            "id": "review",
            "provider": "openai",
            "model": "gpt-4.1-mini",
            "needs": ["draft"],
            "prompt": "Review: {{steps.draft.output}}",
        },
        {"id": "free", "kind": "pty", "command": ["true"]},
    ],
}


async def test_audit_shows_the_forecast_next_to_the_actual_cost(
    mixer: MixerClient, provider_server: FakeProviderServer
) -> None:
    forecast = estimate_spec(prepare_spec(SPEC)[1])
    draft = next(step for step in forecast.steps if step.step == "draft")
    expected_in, expected_out = int(draft.input_tokens.expected), int(draft.output_tokens.expected)
    # draft spends exactly what the forecast expects; review far beyond its worst case.
    provider_server.script(
        "openai",
        Reply(text="forecasts are ranges", usage=(expected_in, expected_out)),
        Reply(text="fine", usage=(200_000, 100)),
    )
    handle = await mixer.start(SPEC, workflow_id=f"forecast-{os.urandom(4).hex()}")
    assert (await handle.result()).status == RunStatus.COMPLETED

    audit = await audit_from_client(mixer.temporal, handle.id)
    section = audit["forecast"]
    assert set(section["steps"]) == {"draft", "review", "free"}
    for step in forecast.steps:
        row = section["steps"][step.step]
        assert row["cost_usd"]["min"] == pytest.approx(step.cost_usd.low)
        assert row["cost_usd"]["expected"] == pytest.approx(step.cost_usd.expected)
        assert row["cost_usd"]["max"] == pytest.approx(step.cost_usd.high)
        # The actual side is the audit's own per-step record.
        assert row["actual_cost_usd"] == pytest.approx(audit["steps"][step.step]["cost_usd"])
        usage = audit["steps"][step.step]["usage"]
        assert row["actual_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    drafted = section["steps"]["draft"]
    assert drafted["actual_tokens"] == expected_in + expected_out
    assert drafted["actual_cost_usd"] == pytest.approx(drafted["cost_usd"]["expected"])
    assert drafted["actual_cost_usd"] > 0
    reviewed = section["steps"]["review"]
    assert reviewed["actual_cost_usd"] > reviewed["cost_usd"]["max"]
    assert section["steps"]["free"]["cost_usd"] == {"min": 0, "expected": 0, "max": 0}
    total = section["total"]
    assert total["cost_usd"]["expected"] == pytest.approx(forecast.cost_usd.expected)
    assert total["actual_cost_usd"] == pytest.approx(audit["usage"]["cost_usd"])
    assert (
        total["actual_tokens"] == audit["usage"]["input_tokens"] + audit["usage"]["output_tokens"]
    )
    assert section["unforecast_steps"] == [] and section["dry_run"] is False

    markdown = render_markdown(audit)
    assert "## Forecast against actual" in markdown
    lines = {line.split(" | ")[0]: line for line in markdown.splitlines() if line.startswith("| ")}
    assert "(outside)" not in lines["| draft"]
    assert "(outside)" in lines["| review"]
    assert f"| {expected_in + expected_out} |" in lines["| draft"]
    assert "| **total** |" in markdown
