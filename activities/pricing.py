"""Token prices, from the one data file ``prices.toml`` beside this module.

``cost`` returns None for a model whose price is unknown: an unknown price is
not the same as free, and the result and the audit say so. Dated or
versioned model names (``claude-sonnet-4-5-20250929``, ``gpt-4o-2024-08-06``,
``gemini-2.0-flash-001``, ``models/gemini-2.5-pro``) match their base entry;
nothing looser than that is matched, because a wrong price is worse than none.

Each provider's models are the ``prices.toml`` table its registry entry names
(``price_key``); the tables are keyed by those, calls by provider name.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from llmmixer.core.contracts import Usage
from llmmixer.core.providers import provider_spec

__all__ = ["ModelPrice", "PriceTable"]

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

    def cost(self, usage: Usage) -> float:
        input_price, output_price = self.input, self.output
        if (
            self.long_context_threshold is not None
            and usage.input_tokens > self.long_context_threshold
        ):
            input_price = self.input_long if self.input_long is not None else input_price
            output_price = self.output_long if self.output_long is not None else output_price
        return (usage.input_tokens * input_price + usage.output_tokens * output_price) / _PER


def _normalise(model: str) -> str:
    model = model.strip().lower()
    if model.startswith("models/"):  # Gemini's resource form
        model = model[len("models/") :]
    return model


class PriceTable:
    """Prices per price table and model; build with :meth:`load` or :meth:`from_toml`."""

    def __init__(self, prices: Mapping[str, Mapping[str, ModelPrice]]) -> None:
        self._prices = {
            provider: {_normalise(m): p for m, p in models.items()}
            for provider, models in prices.items()
        }

    @classmethod
    def load(cls) -> PriceTable:
        """The table shipped with the package (``llmmixer/activities/prices.toml``)."""
        text = resources.files("llmmixer.activities").joinpath("prices.toml").read_text("utf-8")
        return cls.from_toml(text)

    @classmethod
    def from_toml(cls, text: str) -> PriceTable:
        data = tomllib.loads(text)
        prices: dict[str, dict[str, ModelPrice]] = {}
        for provider, models in data.items():
            if not isinstance(models, dict):
                raise ValueError(f"prices.toml: [{provider}] must be a table of models")
            prices[provider] = {
                model: cls._entry(provider, model, entry) for model, entry in models.items()
            }
        return cls(prices)

    @staticmethod
    def _entry(provider: str, model: str, entry: Any) -> ModelPrice:
        try:
            return ModelPrice(
                input=float(entry["input"]),
                output=float(entry["output"]),
                long_context_threshold=entry.get("long_context_threshold"),
                input_long=entry.get("input_long"),
                output_long=entry.get("output_long"),
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
