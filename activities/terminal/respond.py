"""Respond rules: answer a command's prompts by matching its output with RE2.

RE2 matching is linear in the output, so no pattern can stall the event loop
(and every heartbeat of the worker). A rule only sees the output since it
last fired, within a bounded window of recent text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

from llmmixer.activities.terminal.errors import CommandRefusedError
from llmmixer.core.contracts import RespondRule

__all__ = ["Responder", "Rule", "compile_rules"]

# A respond rule only looks at this much recent text: prompts are short, and
# an unbounded window would make a chatty command quadratic.
_RESPOND_WINDOW_CHARS = 64 * 1024


@dataclass(slots=True)
class Rule:
    pattern: Any  # a compiled re2 pattern
    send: bytes
    remaining: int | None
    since: int = 0  # absolute offset in the cleaned output after the last match


def compile_rules(rules: Sequence[RespondRule]) -> list[Rule]:
    """RE2, not ``re``: a backtracking pattern like ``(a+)+$`` against a long
    line would freeze the worker's event loop, heartbeats included. RE2 has no
    backreferences or lookarounds; a rule that needs them is refused."""
    compiled = []
    options = re2.Options()
    options.log_errors = False  # the refusal says it; no stray line on stderr
    for index, rule in enumerate(rules):
        try:
            pattern = re2.compile(rule.expect, options=options)
        except re2.error as exc:
            reason = exc.args[0] if exc.args else exc
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            raise CommandRefusedError(
                f"respond[{index}].expect {rule.expect!r} is not a regular expression "
                f"this worker can run ({reason}); respond rules use RE2 syntax (no "
                "backreferences or lookarounds), fix the step's respond rule"
            ) from None
        compiled.append(Rule(pattern, rule.send.encode("utf-8"), rule.times))
    return compiled


class Responder:
    """Matches rules against the output seen since each rule last fired."""

    def __init__(self, rules: list[Rule]) -> None:
        self._rules = rules
        self._recent = ""
        self._recent_start = 0  # absolute offset of self._recent[0]

    def feed(self, text: str) -> list[bytes]:
        """Add cleaned output; return what to send, in the order rules matched."""
        if not self._rules:
            return []
        self._recent += text
        if len(self._recent) > 2 * _RESPOND_WINDOW_CHARS:
            drop = len(self._recent) - _RESPOND_WINDOW_CHARS
            self._recent = self._recent[drop:]
            self._recent_start += drop
        replies: list[bytes] = []
        for rule in self._rules:
            while rule.remaining is None or rule.remaining > 0:
                start = max(rule.since - self._recent_start, 0)
                match = rule.pattern.search(self._recent, start)
                # An empty match would fire forever without consuming output.
                if match is None or match.end() == match.start():
                    break
                rule.since = self._recent_start + match.end()
                if rule.remaining is not None:
                    rule.remaining -= 1
                replies.append(rule.send)
        return replies
