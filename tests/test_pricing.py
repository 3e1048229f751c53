"""The price table shipped as package data, and model-name matching."""

from __future__ import annotations

import pytest

from llmmixer.activities.pricing import PriceTable
from llmmixer.core.contracts import Usage

# Below every long-context threshold, so list prices apply.
TENTH = Usage(input_tokens=100_000, output_tokens=100_000)


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable.load()


@pytest.mark.parametrize(
    ("provider", "model", "expected"),
    [
        ("anthropic", "claude-sonnet-4-5", 3.0 + 15.0),
        ("anthropic", "claude-sonnet-4-5-20250929", 3.0 + 15.0),
        ("anthropic", "claude-haiku-4-5-20251001", 1.0 + 5.0),
        ("openai", "gpt-4.1", 2.0 + 8.0),
        ("openai", "gpt-4o-2024-08-06", 2.5 + 10.0),
        ("openai", "gpt-4o-mini-2024-07-18", 0.15 + 0.6),
        ("openai", "gpt-5", 1.25 + 10.0),
        ("gemini", "gemini-2.5-flash", 0.3 + 2.5),
        ("gemini", "models/gemini-2.0-flash-001", 0.1 + 0.4),
    ],
)
def test_known_models_and_dated_names(
    table: PriceTable, provider: str, model: str, expected: float
) -> None:
    assert table.cost(provider, model, TENTH) == pytest.approx(expected / 10)


def test_cost_scales_with_tokens(table: PriceTable) -> None:
    usage = Usage(input_tokens=1200, output_tokens=300)
    assert table.cost("openai", "gpt-4.1", usage) == pytest.approx((1200 * 2 + 300 * 8) / 1e6)


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("openai", "gpt-unknown-9"),
        ("openai", "claude-sonnet-4-5"),  # right model, wrong provider
        ("mistral", "mistral-large"),
        ("openai", "gpt-4o-ultra"),  # not a dated suffix of gpt-4o
    ],
)
def test_unknown_is_none_not_zero(table: PriceTable, provider: str, model: str) -> None:
    assert table.cost(provider, model, TENTH) is None


def test_zero_usage_of_a_known_model_is_zero(table: PriceTable) -> None:
    assert table.cost("openai", "gpt-4.1", Usage()) == 0.0


def test_long_context_tier(table: PriceTable) -> None:
    short = Usage(input_tokens=200_000, output_tokens=0)
    long = Usage(input_tokens=200_001, output_tokens=0)
    assert table.cost("gemini", "gemini-2.5-pro", short) == pytest.approx(0.25)
    assert table.cost("gemini", "gemini-2.5-pro", long) == pytest.approx(200_001 * 2.5 / 1e6)


def test_every_entry_has_input_and_output_prices(table: PriceTable) -> None:
    for provider, model in [
        ("anthropic", "claude-opus-4-1"),
        ("openai", "o3"),
        ("openai", "o4-mini"),
    ]:
        price = table.price(provider, model)
        assert price is not None and price.input > 0 and price.output > 0


def test_from_toml_reports_bad_entries() -> None:
    with pytest.raises(ValueError, match=r'\[openai\."x"\] needs numeric input and output'):
        PriceTable.from_toml('[openai."x"]\ninput = 1.0\n')
