"""The spec format as one JSON Schema document, generated from ``spec.py``.

``llmmixer schema`` prints it and ``docs/spec.schema.json`` is a committed copy
(a test keeps them equal), so editors can validate and complete a spec as it is
typed. The pydantic models stay the authority: this schema describes the same
shape, and ``llmmixer validate`` adds the rules across fields and steps (the
DAG, templates, secrets) that no schema can express.
"""

from __future__ import annotations

from typing import Any

from llmmixer.core.spec import STEP_MODELS, Spec

# A name, not an address: nothing is published at a URL, so editors use the
# file path that each example names on its first line.
SCHEMA_ID = "urn:llmmixer:spec.schema.json"
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def spec_json_schema() -> dict[str, Any]:
    """The spec's JSON Schema: ``$schema``, ``$id`` and ``title`` first."""
    body = Spec.model_json_schema()
    definitions: dict[str, Any] = body.get("$defs", {})
    for kind, model in STEP_MODELS.items():
        # A step without `kind` is an `llm` step; every other kind must say so,
        # or a bare `{id, prompt}` would match both `llm` and `approval`.
        if kind == "llm":
            continue
        definition = definitions[model.__name__]
        required: list[str] = definition.setdefault("required", [])
        if "kind" not in required:
            required.insert(0, "kind")
    head = {
        "$schema": SCHEMA_DIALECT,
        "$id": SCHEMA_ID,
        "title": "llmmixer workflow spec",
        "description": body.pop("description", ""),
    }
    body.pop("title", None)
    return {**head, **body}
