"""Models past (or near) their end of life: what `llmmixer validate` tells the owner.

An old spec naming a retiring model keeps validating and is still priced: a
run in flight replays the verdict it was given, and old audits price it.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import yaml

from llmmixer.activities.pricing import PriceTable
from llmmixer.client.cli import main
from llmmixer.client.specfile import model_retirements, spec_warnings
from llmmixer.core import providers
from llmmixer.core.contracts import Usage
from llmmixer.core.providers import ModelRetirement, retirement_notice
from llmmixer.core.validation import validate_spec

BEFORE_END = datetime.date(2026, 11, 1)
AFTER_END = datetime.date(2026, 12, 1)


def old_spec() -> dict[str, object]:
    """A spec written before claude-sonnet-4-5 was retired, naming it everywhere."""
    return {
        "name": "old",
        "defaults": {"provider": "anthropic", "model": "claude-sonnet-4-5"},
        "routes": {"review": [{"provider": "anthropic", "model": "claude-sonnet-4-5-20250929"}]},
        "steps": [
            {"id": "draft", "prompt": "hi"},
            {
                "id": "check",
                "model": "claude-haiku-4-5",
                "prompt": "hi",
                "fallback": [{"provider": "anthropic", "model": "claude-sonnet-4-5"}],
            },
            {"id": "judge", "role": "review", "prompt": "hi"},
        ],
    }


def test_an_old_spec_naming_claude_sonnet_4_5_still_validates_and_is_priced() -> None:
    spec = validate_spec(old_spec())
    assert ("anthropic", "claude-sonnet-4-5") in spec.models()
    table = PriceTable.load()
    usage = Usage(input_tokens=100_000, output_tokens=100_000)  # below its long-context tier
    assert table.cost("anthropic", "claude-sonnet-4-5", usage) == pytest.approx(0.3 + 1.5)
    assert table.cost("anthropic", "claude-sonnet-4-5-20250929", usage) == pytest.approx(1.8)


def test_before_the_end_of_life_each_field_gets_a_warning_naming_the_replacement() -> None:
    spec = validate_spec(old_spec())
    warnings = spec_warnings(spec, today=BEFORE_END)
    assert sorted(warnings) == sorted(
        [
            "spec: routes.review.0.model: anthropic retires claude-sonnet-4-5-20250929 on "
            "2026-11-30 (calls to it fail from then on): change it to claude-sonnet-5-5",
            "step check: fallback.0.model: anthropic retires claude-sonnet-4-5 on 2026-11-30 "
            "(calls to it fail from then on): change it to claude-sonnet-5-5",
            "spec: defaults.model: anthropic retires claude-sonnet-4-5 on 2026-11-30 "
            "(calls to it fail from then on): change it to claude-sonnet-5-5",
        ]
    )
    assert model_retirements(spec, retired=True, today=BEFORE_END) == []


def test_after_the_end_of_life_the_same_fields_are_errors() -> None:
    spec = validate_spec(old_spec())
    errors = [str(issue) for issue in model_retirements(spec, retired=True, today=AFTER_END)]
    assert (
        "spec: defaults.model: anthropic retired claude-sonnet-4-5 on 2026-11-30, so calls "
        "to it fail: change it to claude-sonnet-5-5"
    ) in errors
    assert len(errors) == 3
    assert not any("retires" in w for w in spec_warnings(spec, today=AFTER_END))


def test_current_models_and_other_providers_get_no_notice() -> None:
    for provider, model in [
        ("anthropic", "claude-sonnet-5-5"),
        ("anthropic", "claude-haiku-4-5"),
        ("anthropic", "claude-sonnet-4-50"),  # not a snapshot of claude-sonnet-4-5
        ("openai", "claude-sonnet-4-5"),  # a compatible server's own name
    ]:
        assert retirement_notice(provider, model, AFTER_END) is None


def test_every_replacement_is_priced_and_not_retiring_itself() -> None:
    table = PriceTable.load()
    for retirement in providers.MODEL_RETIREMENTS:
        assert table.price(retirement.provider, retirement.replacement) is not None
        assert providers.model_retirement(retirement.provider, retirement.replacement) is None
    # Kept in the table, so runs started on them and old runs' audits still price them.
    for retiring in ("claude-sonnet-4-5", "claude-opus-4-5"):
        assert table.price("anthropic", retiring) is not None


def _write(tmp_path: Path, spec: dict[str, object]) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_validate_warns_about_a_retired_model_naming_field_and_replacement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = {
        "name": "older",
        "steps": [
            {
                "id": "a",
                "provider": "anthropic",
                "model": "claude-3-7-sonnet-20250219",
                "prompt": "hi",
            }
        ],
    }
    # A warning, not a refusal: a gateway may still serve the name, and a
    # spec that was valid stays valid whatever the date.
    assert main(["validate", _write(tmp_path, spec)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "warning: step a: model: anthropic retired claude-3-7-sonnet-20250219 on 2026-02-19, "
        "so calls to it fail: change it to claude-sonnet-5-5"
    ]


def test_validate_warns_about_a_model_still_working_and_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    later = datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(days=30)
    monkeypatch.setattr(
        providers,
        "MODEL_RETIREMENTS",
        (ModelRetirement("anthropic", "claude-sonnet-4-5", later, "claude-sonnet-5-5"),),
    )
    assert main(["validate", _write(tmp_path, old_spec())]) == 0
    captured = capsys.readouterr()
    assert "valid (3 steps)" in captured.out
    assert (
        f"warning: spec: defaults.model: anthropic retires claude-sonnet-4-5 on {later} "
        "(calls to it fail from then on): change it to claude-sonnet-5-5"
    ) in captured.err.splitlines()
