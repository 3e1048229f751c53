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
        ("anthropic", "claude-sonnet-5-5", 2.0 + 10.0),
        ("anthropic", "claude-opus-5-5", 4.0 + 20.0),
        # Retiring: still priced, for runs started on it and the audits of old runs.
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
        ("openai", "claude-sonnet-5-5"),  # right model, wrong provider
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


def test_cache_reads_and_writes_are_priced_as_anthropic_bills_them(table: PriceTable) -> None:
    # claude-sonnet-5-5: input 2, a cache write 1.25x (2.5), a cache read 0.05x (0.1)
    usage = Usage(
        input_tokens=100_000, cache_write_tokens=60_000, cache_read_tokens=30_000, output_tokens=0
    )
    expected = (10_000 * 2.0 + 60_000 * 2.5 + 30_000 * 0.1) / 1e6
    assert table.cost("anthropic", "claude-sonnet-5-5", usage) == pytest.approx(expected)
    uncached = table.cost("anthropic", "claude-sonnet-5-5", Usage(input_tokens=100_000))
    read_all = Usage(input_tokens=100_000, cache_read_tokens=100_000)
    assert table.cost("anthropic", "claude-sonnet-5-5", read_all) == pytest.approx(
        0.05 * (uncached or 0)
    )
    # claude-sonnet-4-5 (retiring) keeps its own rates: 0.1x reads, the 200k long tier.
    old = table.cost("anthropic", "claude-sonnet-4-5", usage)
    assert old == pytest.approx((10_000 * 3.0 + 60_000 * 3.75 + 30_000 * 0.3) / 1e6)


def test_openai_and_gemini_cached_input_rates(table: PriceTable) -> None:
    usage = Usage(input_tokens=10_000, cache_read_tokens=8_000)
    assert table.cost("openai", "gpt-4.1", usage) == pytest.approx(
        (2_000 * 2.0 + 8_000 * 0.5) / 1e6
    )
    assert table.cost("gemini", "gemini-2.5-flash", usage) == pytest.approx(
        (2_000 * 0.3 + 8_000 * 0.03) / 1e6
    )


def test_cached_tokens_without_a_cached_rate_cost_the_input_rate(table: PriceTable) -> None:
    usage = Usage(input_tokens=10_000, cache_read_tokens=8_000)
    assert table.cost("openai", "o3-pro", usage) == table.cost(
        "openai", "o3-pro", Usage(input_tokens=10_000)
    )


def test_reasoning_tokens_are_priced_and_never_more_than_the_output() -> None:
    table = PriceTable.from_toml(
        '[openai."m"]\ninput = 1.0\noutput = 10.0\nreasoning = 20.0\ncached_input = 0.5\n'
    )
    usage = Usage(output_tokens=1_000, reasoning_tokens=400)
    assert table.cost("openai", "m", usage) == pytest.approx((600 * 10 + 400 * 20) / 1e6)
    # a provider reporting more cached or reasoning tokens than the whole is capped
    odd = Usage(input_tokens=10, cache_read_tokens=50, output_tokens=10, reasoning_tokens=90)
    assert table.cost("openai", "m", odd) == pytest.approx((10 * 0.5 + 10 * 20) / 1e6)


def test_the_long_context_tier_has_its_own_cached_rate(table: PriceTable) -> None:
    usage = Usage(input_tokens=300_000, cache_read_tokens=300_000)
    assert table.cost("gemini", "gemini-2.5-pro", usage) == pytest.approx(300_000 * 0.25 / 1e6)


def test_the_table_says_when_it_was_written_and_lists_every_rate(table: PriceTable) -> None:
    from llmmixer.activities.pricing import price_listing

    assert table.written is not None and table.written.year >= 2025
    listing = price_listing(table)
    assert f"written {table.written.isoformat()}" in listing.splitlines()[0]
    sonnet = next(line for line in listing.splitlines() if " claude-sonnet-5-5 " in line)
    assert sonnet.split()[2:7] == ["2", "10", "0.1", "2.5", "10"]
    for current in ("claude-opus-5-5", "gpt-5.1", "gemini-3-pro-preview"):
        assert table.price(_provider(current), current) is not None


def _provider(model: str) -> str:
    return (
        "anthropic"
        if model.startswith("claude")
        else ("gemini" if model.startswith("gemini") else "openai")
    )


def test_a_written_date_that_is_no_date_is_refused() -> None:
    with pytest.raises(ValueError, match="written"):
        PriceTable.from_toml('written = "last week"\n')
