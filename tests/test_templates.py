from __future__ import annotations

from llmmixer.core.templates import references, render


def test_inputs_and_step_outputs_are_substituted() -> None:
    text = "Review {{ inputs.diff }} given {{steps.plan.output}}."
    assert render(text, {"diff": "D"}, {"plan": "P"}) == "Review D given P."


def test_values_are_not_rendered_again() -> None:
    # An output that itself contains a template must come through literally.
    assert render("{{steps.a.output}}", {"x": "X"}, {"a": "{{inputs.x}}"}) == "{{inputs.x}}"


def test_missing_step_output_reads_empty_and_scalars_read_as_text() -> None:
    assert render("[{{steps.skipped.output}}]", {}, {}) == "[]"
    assert render("{{inputs.n}} {{inputs.flag}}", {"n": 3, "flag": True}, {}) == "3 true"


def test_references_classify_each_occurrence() -> None:
    found = list(references("{{inputs.a}} {{steps.b.output}} {{steps.c}} {{x}}"))
    assert [(r.kind, r.name) for r in found] == [
        ("input", "a"),
        ("step", "b"),
        ("invalid", "steps.c"),
        ("invalid", "x"),
    ]
