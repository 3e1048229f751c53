"""``{{inputs.NAME}}`` and ``{{steps.ID.output}}`` templates.

Rendering is plain substitution: no expressions, no loops, no access to
anything but the spec's inputs and finished steps' outputs. That keeps it
deterministic for workflow replay and safe to apply to PTY argv elements (a
value substituted into one argv element stays that one argument).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_INPUT_REF = re.compile(r"^inputs\.([A-Za-z0-9_-]+)$")
_STEP_REF = re.compile(r"^steps\.([a-z0-9_-]+)\.output$")


@dataclass(frozen=True)
class Reference:
    """One ``{{...}}`` occurrence: ``kind`` is "input", "step" or "invalid"."""

    kind: str
    name: str
    raw: str


def references(text: str) -> Iterator[Reference]:
    for match in _TEMPLATE.finditer(text):
        expression = match.group(1).strip()
        if found := _INPUT_REF.match(expression):
            yield Reference("input", found.group(1), match.group(0))
        elif found := _STEP_REF.match(expression):
            yield Reference("step", found.group(1), match.group(0))
        else:
            yield Reference("invalid", expression, match.group(0))


def render(text: str, inputs: Mapping[str, object], outputs: Mapping[str, str]) -> str:
    """Substitute every reference; validation has already refused unknown ones."""

    def substitute(match: re.Match[str]) -> str:
        expression = match.group(1).strip()
        if found := _INPUT_REF.match(expression):
            value = inputs.get(found.group(1), "")
            return _as_text(value)
        if found := _STEP_REF.match(expression):
            return outputs.get(found.group(1), "")
        return match.group(0)

    return _TEMPLATE.sub(substitute, text)


def _as_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
