"""Reading a spec from a file or text, and preparing it for a run.

YAML and JSON are both accepted (JSON is YAML). Caller inputs are merged over
the spec's own ``inputs`` before validation, so a reference to an input the
caller supplies is valid.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from llmmixer.activities.pricing import PriceTable
from llmmixer.workflows.spec import Spec
from llmmixer.workflows.validation import SPEC_LOCATION, SpecError, SpecIssue, validate_spec


def read_spec(source: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """A spec as a plain dict: from a mapping, a file path, or YAML/JSON text."""
    if isinstance(source, Mapping):
        return json.loads(json.dumps(source))
    text: str
    if isinstance(source, Path) or ("\n" not in source and Path(source).suffix in _SUFFIXES):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise SpecError(
                [SpecIssue(SPEC_LOCATION, "(file)", f"cannot read {path}: {error.strerror}")]
            ) from None
    else:
        text = source
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(
            [SpecIssue(SPEC_LOCATION, "(document)", f"not valid YAML or JSON{where}: {error}")]
        ) from None
    if not isinstance(data, dict):
        raise SpecError(
            [SpecIssue(SPEC_LOCATION, "(document)", "the spec must be a mapping with `steps`")]
        )
    return data


_SUFFIXES = {".yaml", ".yml", ".json"}


def parse_inputs(pairs: list[str]) -> dict[str, str]:
    """``["key=value", ...]`` from the command line."""
    inputs: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SpecError(
                [SpecIssue(SPEC_LOCATION, "inputs", f"--input {pair!r}: write it as key=value")]
            )
        if value.startswith("@"):
            value = Path(value[1:]).read_text(encoding="utf-8")
        inputs[key] = value
    return inputs


def prepare_spec(
    source: Mapping[str, Any] | str | Path,
    *,
    inputs: Mapping[str, Any] | None = None,
    dry_run: bool = False,
) -> tuple[dict[str, Any], Spec]:
    """The JSON body to start a run with, and its validated model."""
    body = read_spec(source)
    if inputs:
        merged = dict(body.get("inputs") or {})
        merged.update(inputs)
        body["inputs"] = merged
    if dry_run:
        body["dry_run"] = True
    return body, validate_spec(body)


def spec_warnings(spec: Spec, prices: PriceTable | None = None) -> list[str]:
    """What may surprise the spec's owner at run time, though the spec is valid.

    A model missing from the price table costs "unknown", which a
    ``max_cost_usd`` budget cannot count: the run would spend on it unchecked.
    """
    if spec.dry_run or not spec.has_cost_limit():
        return []
    table = prices or PriceTable.load()
    return [
        f"{provider}/{model} has no price in llmmixer's price table "
        "(llmmixer/activities/prices.toml), so max_cost_usd does not limit what it spends: "
        "add its price there, or set a max_tokens budget as well"
        for provider, model in sorted(spec.models())
        if table.price(provider, model) is None
    ]
