"""The safe document loader: what a spec or plan document may and may not contain."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml

from llmmixer.core.documents import (
    DEFAULT_LIMITS,
    DocumentError,
    DocumentLimits,
    check_document,
    load_document,
    load_json_document,
)


def refusal(text: str, **limits: int) -> str:
    with pytest.raises(DocumentError) as caught:
        load_document(text, source="the spec", limits=DocumentLimits(**limits))
    assert caught.value.source == "the spec"
    return str(caught.value)


def test_defaults_are_documented_and_frozen() -> None:
    assert DEFAULT_LIMITS == DocumentLimits(
        max_bytes=4 * 1024 * 1024, max_depth=64, max_nodes=100_000
    )
    with pytest.raises(AttributeError):
        DEFAULT_LIMITS.max_depth = 1000  # type: ignore[misc]


def test_yaml_and_json_load_to_the_same_plain_data() -> None:
    data = {
        "name": "x",
        "inputs": {"n": 3, "ratio": 0.5, "on": True, "none": None, "text": "a: b"},
        "steps": [{"id": "a", "needs": [], "prompt": "hi"}],
    }
    assert load_document(yaml.safe_dump(data), source="s") == data
    assert load_document(json.dumps(data), source="s") == data
    assert load_document(json.dumps(data, indent="\t"), source="s") == data
    # JSON-looking text that is YAML flow style falls back to YAML.
    assert load_document("{name: x, steps: [a, b]}", source="s") == {
        "name": "x",
        "steps": ["a", "b"],
    }
    assert load_document("", source="s") is None
    assert load_document("# only a comment\n", source="s") is None


def test_every_anchor_and_alias_is_refused_even_a_harmless_one() -> None:
    assert refusal("a: &x 1\nb: *x\n") == (
        "the spec uses the YAML anchor &x (at line 1, column 4): anchors and aliases are "
        "refused because a few of them can expand a tiny document beyond any memory; "
        "remove it and write repeated values out in full"
    )
    assert refusal("a: *x\n").startswith("the spec uses the YAML alias *x (at line 1, column 4)")
    assert "YAML merge key (<<)" in refusal("a:\n  <<: {b: 1}\n")


def test_an_alias_bomb_is_refused_before_any_expansion() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n"
        for p, n in zip("abcdefghijklmnopqrstuvwxy", "bcdefghijklmnopqrstuvwxyz", strict=True)
    )
    started = time.monotonic()
    assert "YAML anchor &a" in refusal(bomb)
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize(
    "text",
    [
        "a: " + "[" * 5000 + "]" * 5000,
        "[" * 5000 + "]" * 5000,
        '{"a": ' + "[" * 5000 + "]" * 5000 + "}",
        "".join("  " * level + f"k{level}:\n" for level in range(70)),
        "".join("  " * level + "-\n" for level in range(70)),
    ],
)
def test_depth_is_checked_while_parsing_without_recursion(text: str) -> None:
    started = time.monotonic()
    assert "nests mappings and lists more than 64 levels deep" in refusal(text)
    assert time.monotonic() - started < 0.5


def test_limits_can_be_tightened() -> None:
    assert refusal("a: {b: {c: 1}}", max_depth=2) == (
        "the spec nests mappings and lists more than 2 levels deep (at line 1, column 8): "
        "flatten it"
    )
    assert load_document("a: {b: 1}", source="s", limits=DocumentLimits(max_depth=2))
    assert "more than 5 keys and values" in refusal("[1, 2, 3, 4, 5, 6]", max_nodes=5)
    assert "more than 5 keys and values" in refusal("- 1\n- 2\n- 3\n- 4\n- 5\n- 6\n", max_nodes=5)
    # Bytes, not characters: "é" is two bytes in UTF-8.
    assert refusal("a: " + "é" * 4, max_bytes=10) == (
        "the spec is larger than 10 bytes: split it up or move large text into inputs"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: .nan", "has the number .nan, which is not finite (at line 1, column 4)"),
        ("a: -.inf", "has the number -.inf, which is not finite"),
        ('{"a": NaN}', "has the number NaN, which is not finite"),
        ('{"a": -Infinity}', "has the number -Infinity, which is not finite"),
        ('{"a": 1e999}', "has the number 1e999, which is not finite"),
        ("a: " + "9" * 101, "has an integer of more than 100 digits"),
        ('{"a": ' + "9" * 5000 + "}", "has an integer of more than 100 digits"),
        ("a: 1\na: 2", "has the key 'a' twice in one mapping (at line 2, column 1): keep only one"),
        ('{"a": 1, "a": 2}', "has the key 'a' twice in one mapping: keep only one"),
        ("on: push", "has the key 'on' (at line 1, column 1), which YAML reads as true/false"),
        ("1: x", "has the key '1' (at line 1, column 1), which YAML reads as a number"),
        ("? [a, b]\n: x", "uses a mapping or list as a key"),
        ("a: !!python/object/apply:os.system [ls]", "uses the YAML tag !!python/object/apply"),
        ("a: !!binary aGk=", "uses the YAML tag !!binary"),
        ("a: !!set {x}", "uses the YAML tag !!set"),
        ("a: !custom x", "uses the YAML tag !custom"),
        ("a: !!int abc", "has 'abc' tagged !!int (at line 1, column 4), which it is not"),
        ("a: 1\n---\nb: 2", "holds more than one YAML document (`---`) (at line 2, column 1)"),
        ('{"a": "\\ud800"}', "has text with an invalid character (a lone UTF-16 surrogate) at a"),
        ("a: [1, 2\nb: 3", "is not valid YAML or JSON at line 2, column 2: "),
    ],
)
def test_what_no_spec_needs_is_refused_with_what_to_do(text: str, expected: str) -> None:
    message = refusal(text)
    assert message.startswith("the spec ")
    assert expected in message
    assert "\n" not in message  # `validate` prints one error per line


def test_dates_stay_text_and_explicit_plain_tags_work() -> None:
    assert load_document("a: 2024-01-01\nb: !!str 12\nc: !!float 1\n", source="s") == {
        "a": "2024-01-01",
        "b": "12",
        "c": 1.0,
    }


def test_json_only_loader_for_model_replies() -> None:
    assert load_json_document('{"steps": []}', source="the reply") == {"steps": []}
    for text, expected in [
        ("steps: []", "the reply is not JSON (Expecting value at line 1)"),
        ('{"steps": [}', "the reply is not JSON (Expecting value at line 1)"),
        ('["\\', "the reply is not JSON (Unterminated string starting at at line 1)"),
        (
            "[" * 5000,
            "the reply nests mappings and lists more than 64 levels deep "
            "(at line 1, column 65): flatten it",
        ),
        ("[" * 5000 + '"', "the reply nests mappings and lists more than 64 levels deep"),
    ]:
        with pytest.raises(DocumentError) as caught:
            load_json_document(text, source="the reply")
        assert str(caught.value).startswith(expected)


def test_python_values_follow_the_same_rules() -> None:
    nested: Any = {}
    nested["self"] = nested  # a cycle: refused, not an endless walk
    cases: list[tuple[object, str]] = [
        (nested, "more than 64 levels deep"),
        ({"a": {1: "x"}}, "the spec has the key 1 at a, which is not text"),
        ({"a": [float("nan")]}, "the spec has the number nan, which is not finite at a.0"),
        ({"a": object()}, "the spec has a value of type object at a"),
        ({"a": 10**200}, "more than 100 digits at a"),
        ({"a": "\ud800"}, "lone UTF-16 surrogate) at a"),
    ]
    for value, expected in cases:
        with pytest.raises(DocumentError) as caught:
            check_document(value, source="the spec")
        assert expected in str(caught.value)
    check_document({"a": [1, 2.5, "x", None, True, (1, 2)]}, source="the spec")
