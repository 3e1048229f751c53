"""The spec's JSON Schema: what `llmmixer schema` prints, what editors read.

`docs/spec.schema.json` is the file every example names on its first line; it
must equal the command's output, accept every example and refuse what
`llmmixer validate` refuses for its shape.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from llmmixer.core.validation import SpecError, validate_spec

REPO = Path(__file__).resolve().parent.parent
SCHEMA_FILE = REPO / "docs" / "spec.schema.json"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
SCHEMA_LINE = "# yaml-language-server: $schema=../docs/spec.schema.json"


def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())
    return loaded


def errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema())
    return [error.message for error in validator.iter_errors(document)]


def test_the_committed_schema_is_what_llmmixer_schema_prints() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llmmixer.client.cli", "schema"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == schema(), (
        "docs/spec.schema.json is stale: run `llmmixer schema > docs/spec.schema.json`"
    )


def test_the_schema_is_a_valid_2020_12_schema_with_an_id() -> None:
    document = schema()
    jsonschema.Draft202012Validator.check_schema(document)
    assert document["$id"].endswith("spec.schema.json")
    assert document["title"]
    assert document["$defs"]["DecomposeStep"]["description"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_names_the_schema_and_validates_against_it(path: Path) -> None:
    assert path.read_text().splitlines()[0] == SCHEMA_LINE
    assert errors(yaml.safe_load(path.read_text())) == []


def test_a_step_without_kind_is_an_llm_step() -> None:
    spec = {
        "defaults": {"provider": "openai", "model": "m"},
        "steps": [{"id": "a", "prompt": "hi"}],
    }
    assert errors(spec) == []
    assert validate_spec(spec).steps[0].kind == "llm"
    # `command` belongs to pty steps: without `kind: pty` it is an unknown llm field.
    assert errors({"steps": [{"id": "a", "command": ["ls"]}]})


@pytest.mark.parametrize(
    "document",
    [
        pytest.param({"steps": [{"id": "a", "promt": "typo"}]}, id="unknown-step-field"),
        pytest.param({"stpes": [], "steps": [{"id": "a"}]}, id="unknown-spec-field"),
        pytest.param({"steps": [{"id": "a", "kind": "shell"}]}, id="unknown-kind"),
        pytest.param({"steps": [{"id": "a", "kind": "pty"}]}, id="pty-without-command"),
        pytest.param({"steps": [{"id": "Bad Id", "prompt": "x"}]}, id="bad-id"),
        pytest.param({"steps": [{"id": "a" * 65, "prompt": "x"}]}, id="long-id"),
        pytest.param({"steps": []}, id="no-steps"),
        pytest.param(
            {"steps": [{"id": "a", "prompt": "x", "provider_options": [1]}]},
            id="options-not-a-mapping",
        ),
        pytest.param(
            {"steps": [{"id": "a", "prompt": "x", "best_of": {"n": 11}}]}, id="best-of-too-many"
        ),
        pytest.param(
            {"steps": [{"id": "p", "kind": "decompose", "prompt": "x", "allow_fields": ["api"]}]},
            id="allow-field-not-a-plan-field",
        ),
    ],
)
def test_invalid_documents_fail_the_schema_as_they_fail_validate(
    document: dict[str, Any],
) -> None:
    assert errors(document), "the schema accepted a spec that validate refuses"
    with pytest.raises(SpecError):
        validate_spec(document)
