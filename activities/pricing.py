"""Token prices, from the one data file ``prices.toml`` beside this module.

``cost`` returns None for a model whose price is unknown: an unknown price is
not the same as free, and the result and the audit say so. Dated or
versioned model names (``claude-sonnet-4-5-20250929``, ``gpt-4o-2024-08-06``,
``gemini-2.0-flash-001``, ``models/gemini-2.5-pro``) match their base entry;
nothing looser than that is matched, because a wrong price is worse than none.

Each provider's models are the ``prices.toml`` table its registry entry names
(``price_key``); the tables are keyed by those, calls by provider name.

Cached prompt tokens are priced at their own rates (``cached_input`` for a
cache read, ``cache_write`` for a write; without them, the input rate), and
reasoning tokens at ``reasoning`` (without it, the output rate, which is how
every provider bills them today).
"""

from __future__ import annotations

import datetime
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from llmmixer.core.contracts import Usage
from llmmixer.core.providers import provider_spec

__all__ = ["ModelPrice", "PriceTable", "price_listing"]

_PER = 1_000_000
# Suffixes that name a snapshot of a base model, stripped one at a time.
_SNAPSHOT_SUFFIXES = (
    re.compile(r"-\d{8}$"),  # claude-sonnet-4-5-20250929
    re.compile(r"@\d{8}$"),  # Vertex: claude-sonnet-4-5@20250929
    re.compile(r"-\d{4}-\d{2}-\d{2}$"),  # gpt-4o-2024-08-06
    re.compile(r"-\d{3}$"),  # gemini-2.0-flash-001
    re.compile(r"-latest$"),  # claude-3-5-sonnet-latest
    re.compile(r"-v\d+(:\d+)?$"),  # Bedrock: ...-v1:0
)


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens."""

    input: float
    output: float
    long_context_threshold: int | None = None
    input_long: float | None = None
    output_long: float | None = None
    #: A prompt token read from the provider's cache.
    cached_input: float | None = None
    cached_input_long: float | None = None
    #: A prompt token written to the provider's cache (Anthropic: 1.25x input).
    cache_write: float | None = None
    cache_write_long: float | None = None
    #: A reasoning (thinking) token; None: the output rate.
    reasoning: float | None = None

    def cost(self, usage: Usage) -> float:
        long = (
            self.long_context_threshold is not None
            and usage.input_tokens > self.long_context_threshold
        )
        input_price = _pick(long, self.input, self.input_long) or 0.0
        output_price = _pick(long, self.output, self.output_long) or 0.0
        read_price = _pick(long, self.cached_input, self.cached_input_long)
        write_price = _pick(long, self.cache_write, self.cache_write_long)
        # Cached and reasoning tokens are parts of input_tokens / output_tokens;
        # a provider that reports more of them than the whole is not trusted
        # beyond the whole.
        read = min(usage.cache_read_tokens, usage.input_tokens)
        written = min(usage.cache_write_tokens, usage.input_tokens - read)
        fresh = usage.input_tokens - read - written
        reasoning = min(usage.reasoning_tokens, usage.output_tokens)
        return (
            fresh * input_price
            + read * (input_price if read_price is None else read_price)
            + written * (input_price if write_price is None else write_price)
            + (usage.output_tokens - reasoning) * output_price
            + reasoning * (output_price if self.reasoning is None else self.reasoning)
        ) / _PER


def _pick(long: bool, base: float | None, long_price: float | None) -> float | None:
    """The long-context rate when the call is long and the model has one, else the base."""
    return long_price if long and long_price is not None else base


def _normalise(model: str) -> str:
    model = model.strip().lower()
    if model.startswith("models/"):  # Gemini's resource form
        model = model[len("models/") :]
    return model


class PriceTable:
    """Prices per price table and model; build with :meth:`load` or :meth:`from_toml`."""

    def __init__(
        self,
        prices: Mapping[str, Mapping[str, ModelPrice]],
        *,
        written: datetime.date | None = None,
    ) -> None:
        self._prices = {
            provider: {_normalise(m): p for m, p in models.items()}
            for provider, models in prices.items()
        }
        #: When the table was last checked against the providers' price lists.
        self.written = written

    def entries(self) -> Iterator[tuple[str, str, ModelPrice]]:
        """Every (price table, model, price), in table and model order."""
        for provider in sorted(self._prices):
            for model in sorted(self._prices[provider]):
                yield provider, model, self._prices[provider][model]

    @classmethod
    def load(cls) -> PriceTable:
        """The table shipped with the package (``llmmixer/activities/prices.toml``)."""
        text = resources.files("llmmixer.activities").joinpath("prices.toml").read_text("utf-8")
        return cls.from_toml(text)

    @classmethod
    def from_toml(cls, text: str) -> PriceTable:
        data = tomllib.loads(text)
        written = data.pop("written", None)
        if written is not None and not isinstance(written, datetime.date):
            raise ValueError("prices.toml: `written` must be a date (YYYY-MM-DD)")
        prices: dict[str, dict[str, ModelPrice]] = {}
        for provider, models in data.items():
            if not isinstance(models, dict):
                raise ValueError(f"prices.toml: [{provider}] must be a table of models")
            prices[provider] = {
                model: cls._entry(provider, model, entry) for model, entry in models.items()
            }
        return cls(prices, written=written)

    @staticmethod
    def _entry(provider: str, model: str, entry: Any) -> ModelPrice:
        try:
            return ModelPrice(
                input=float(entry["input"]),
                output=float(entry["output"]),
                long_context_threshold=entry.get("long_context_threshold"),
                input_long=_rate(entry, "input_long"),
                output_long=_rate(entry, "output_long"),
                cached_input=_rate(entry, "cached_input"),
                cached_input_long=_rate(entry, "cached_input_long"),
                cache_write=_rate(entry, "cache_write"),
                cache_write_long=_rate(entry, "cache_write_long"),
                reasoning=_rate(entry, "reasoning"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f'prices.toml: [{provider}."{model}"] needs numeric input and output '
                f"(USD per million tokens): {exc}"
            ) from None

    def price(self, provider: str, model: str) -> ModelPrice | None:
        """The entry for ``model`` or its base name, or None when unknown."""
        try:
            price_key = provider_spec(provider).price_key
        except ValueError:
            return None
        models = self._prices.get(price_key)
        if not models:
            return None
        name = _normalise(model)
        while True:
            found = models.get(name)
            if found is not None:
                return found
            for suffix in _SNAPSHOT_SUFFIXES:
                stripped = suffix.sub("", name)
                if stripped != name:
                    name = stripped
                    break
            else:
                return None

    def cost(self, provider: str, model: str, usage: Usage) -> float | None:
        """USD for ``usage`` on ``provider``/``model``; None when the price is unknown."""
        price = self.price(provider, model)
        return None if price is None else price.cost(usage)


def _rate(entry: Mapping[str, Any], name: str) -> float | None:
    value = entry.get(name)
    return None if value is None else float(value)


def price_listing(table: PriceTable) -> str:
    """The table as ``llmmixer prices`` prints it: one model a line, with its date."""
    when = table.written.isoformat() if table.written is not None else "unknown"
    columns = ("input", "output", "cached_input", "cache_write", "reasoning")
    lines = [
        f"USD per million tokens; table written {when} "
        "(llmmixer/activities/prices.toml; check the providers' pages before relying on it)",
        f"{'provider':<10} {'model':<24} " + " ".join(f"{c:>12}" for c in columns),
    ]

    def rate(value: float | None, fallback: float) -> str:
        return f"{(fallback if value is None else value):>12g}"

    for provider, model, price in table.entries():
        cells = (
            f"{price.input:>12g}",
            f"{price.output:>12g}",
            rate(price.cached_input, price.input),
            rate(price.cache_write, price.input),
            rate(price.reasoning, price.output),
        )
        long = (
            f"  (over {price.long_context_threshold} input tokens: "
            f"{price.input_long:g}/{price.output_long:g})"
            if price.long_context_threshold is not None
            and price.input_long is not None
            and price.output_long is not None
            else ""
        )
        lines.append(f"{provider:<10} {model:<24} " + " ".join(cells) + long)
    return "\n".join(lines)
