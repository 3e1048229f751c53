"""`{{steps.ID.children}}` and `{{join(steps.PREFIX*, "SEP")}}`."""

from __future__ import annotations

from llmmixer.core.templates import references, render

OUTPUTS = {"split": "{plan}", "split-1": "one", "other": "x", "split-2": "two"}


def test_children_are_headed_by_their_ids_and_separated_by_a_blank_line() -> None:
    text = render("{{ steps.split.children }}", {}, OUTPUTS, {"split": ["split-1", "split-2"]})
    assert text == "## split-1\none\n\n## split-2\ntwo"


def test_children_of_a_step_without_a_plan_read_empty() -> None:
    assert render("[{{steps.split.children}}]", {}, OUTPUTS) == "[]"


def test_join_takes_the_prefix_in_dag_order_with_escapes_in_the_separator() -> None:
    assert render('{{join(steps.split-*, "\\n---\\n")}}', {}, OUTPUTS) == "one\n---\ntwo"
    assert render('{{ join( steps.split-* , ", " ) }}', {}, OUTPUTS) == "one, two"
    assert render('{{join(steps.*, "|")}}', {}, OUTPUTS) == "{plan}|one|x|two"
    assert render('{{join(steps.split*, "\\"")}}', {}, OUTPUTS) == '{plan}"one"two'


def test_aggregated_values_are_not_rendered_again() -> None:
    outputs = {"a-1": "{{inputs.x}}"}
    assert render('{{join(steps.a-*, "")}}', {"x": "X"}, outputs) == "{{inputs.x}}"


def test_references_classify_aggregations() -> None:
    found = list(references('{{steps.d.children}} {{join(steps.q*, " ")}} {{join(q*, ",")}}'))
    assert [(r.kind, r.name, r.separator) for r in found] == [
        ("children", "d", ""),
        ("join", "q", " "),
        ("invalid", 'join(q*, ",")', ""),
    ]
