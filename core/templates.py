"""``{{inputs.NAME}}``, ``{{steps.ID.output}}`` and aggregation templates.

Aggregation joins a group's outputs: ``{{steps.ID.children}}`` (the outputs of
decompose step ID's sub-steps, each headed by its id, separated by a blank
line) and ``{{join(steps.PREFIX*, "SEP")}}`` (the outputs of the steps whose id
starts with PREFIX, in DAG order, joined with SEP; ``\\n`` and ``\\t`` escapes
are read in SEP).

Rendering is plain substitution: no expressions, no loops, no access to
anything but the spec's inputs and finished steps' outputs. That keeps it
deterministic for workflow replay and safe to apply to PTY argv elements (a
value substituted into one argv element stays that one argument).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_INPUT_REF = re.compile(r"^inputs\.([A-Za-z0-9_-]+)$")
_STEP_REF = re.compile(r"^steps\.([a-z0-9_-]+)\.output$")
_CHILDREN_REF = re.compile(r"^steps\.([a-z0-9_-]+)\.children$")
_JOIN_REF = re.compile(
    r'^join\(\s*steps\.([a-z0-9_-]*)\*\s*,\s*"((?:[^"\\]|\\.)*)"\s*\)$', re.DOTALL
)
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}


@dataclass(frozen=True)
class Reference:
    """One ``{{...}}`` occurrence.

    ``kind`` is "input", "step", "children" (``name`` is the decompose step),
    "join" (``name`` is the id prefix, ``separator`` the decoded SEP) or
    "invalid".
    """

    kind: str
    name: str
    raw: str
    separator: str = ""


def references(text: str) -> Iterator[Reference]:
    for match in _TEMPLATE.finditer(text):
        yield _parse(match.group(1).strip(), match.group(0))


def _parse(expression: str, raw: str) -> Reference:
    if found := _INPUT_REF.match(expression):
        return Reference("input", found.group(1), raw)
    if found := _STEP_REF.match(expression):
        return Reference("step", found.group(1), raw)
    if found := _CHILDREN_REF.match(expression):
        return Reference("children", found.group(1), raw)
    if found := _JOIN_REF.match(expression):
        separator = re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), found.group(2))
        return Reference("join", found.group(1), raw, separator)
    return Reference("invalid", expression, raw)


def render(
    text: str,
    inputs: Mapping[str, object],
    outputs: Mapping[str, str],
    children: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """Substitute every reference; validation has already refused unknown ones.

    ``outputs`` is read in its own order for ``join`` (the run passes it in DAG
    order); ``children`` maps a decompose step to its sub-steps' ids.
    """

    def substitute(match: re.Match[str]) -> str:
        ref = _parse(match.group(1).strip(), match.group(0))
        if ref.kind == "input":
            return _as_text(inputs.get(ref.name, ""))
        if ref.kind == "step":
            return outputs.get(ref.name, "")
        if ref.kind == "children":
            return "\n\n".join(
                f"## {child}\n{outputs.get(child, '')}"
                for child in (children or {}).get(ref.name, ())
            )
        if ref.kind == "join":
            return ref.separator.join(
                output for step_id, output in outputs.items() if step_id.startswith(ref.name)
            )
        return match.group(0)

    return _TEMPLATE.sub(substitute, text)


def _as_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
