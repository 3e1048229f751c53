"""Reading untrusted documents (specs, plans) so that no document can hurt the reader.

Specs come from files, the command line and the HTTP API; plans come from
model replies. Both are attacker-controlled text, and plain ``yaml.safe_load``
or ``json.loads`` lets a few hundred bytes do damage:

* YAML anchors and aliases let a 700-byte "billion laughs" document expand to
  billions of nodes, freezing whoever loads or validates it. Anchors and
  aliases are refused outright: a spec or plan never needs them.
* Deep nesting (``[[[[...]]]]``) makes recursive parsers and validators raise
  ``RecursionError``. Depth is checked while parsing, without recursion.
* Huge documents, integers with thousands of digits, NaN and infinities
  (which make budget comparisons always false) and non-text keys are refused.

Every problem raises one error type, :class:`DocumentError`, whose message
says what is wrong and what to do. Everything here is pure and deterministic
(no I/O, no clock), so workflow code may call it on replay.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import (
    AliasEvent,
    CollectionStartEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    Event,
    MappingEndEvent,
    MappingStartEvent,
    NodeEvent,
    ScalarEvent,
    SequenceEndEvent,
    StreamEndEvent,
    StreamStartEvent,
)
from yaml.nodes import ScalarNode
from yaml.resolver import Resolver

__all__ = [
    "DEFAULT_LIMITS",
    "DocumentError",
    "DocumentLimits",
    "check_document",
    "load_document",
    "load_json_document",
]


@dataclass(frozen=True)
class DocumentLimits:
    """How large an untrusted document may be.

    The defaults hold any real spec or plan many times over, and bound the
    work of reading a hostile one to well under a second.
    """

    # UTF-8 size of the text.
    max_bytes: int = 4 * 1024 * 1024
    # Mappings and lists inside each other; the top level counts as 1.
    max_depth: int = 64
    # Every mapping, list, key and value.
    max_nodes: int = 100_000


DEFAULT_LIMITS = DocumentLimits()

# Far more digits than any count, size or budget needs; Python itself refuses
# to read integers of more than 4300 digits (with a plain ValueError).
_MAX_INT_DIGITS = 100
_MAX_INT_BITS = 333  # 10**100 < 2**333


class DocumentError(ValueError):
    """A document that was refused; the message says what is wrong and what to do."""

    def __init__(self, message: str, *, source: str) -> None:
        self.source = source
        super().__init__(message)


def load_document(text: str, *, source: str, limits: DocumentLimits = DEFAULT_LIMITS) -> object:
    """A YAML or JSON document as plain data (dict, list, str, int, float, bool, None).

    ``source`` names the document in messages ("the spec", a file name).
    JSON-looking text is read as JSON, which is faster and exact; anything
    else, or JSON that does not parse, is read as YAML.
    """
    _check_size(text, source, limits)
    _check_text(text, source, "")
    if text.lstrip()[:1] in ("{", "[", '"'):
        # YAML flow style looks the same; a broken limit is refused even then,
        # since reading that much as YAML is the slow path a hostile document wants.
        if _json_shape(text, source, limits):
            try:
                return _json_loads(text, source, limits)
            except json.JSONDecodeError:
                pass  # e.g. YAML flow style `{steps: [a, b]}`
    return _load_yaml(text, source, limits)


def load_json_document(
    text: str, *, source: str, limits: DocumentLimits = DEFAULT_LIMITS
) -> object:
    """A JSON document (only JSON) as plain data, within ``limits``."""
    _check_size(text, source, limits)
    _check_text(text, source, "")
    _json_shape(text, source, limits)
    # Where the scan stopped early the text is not JSON, and json.loads fails
    # at or before that point, never deeper than the scan has checked.
    try:
        return _json_loads(text, source, limits)
    except json.JSONDecodeError as error:
        raise DocumentError(
            f"{source} is not JSON ({error.msg} at line {error.lineno})", source=source
        ) from None


def check_document(value: object, *, source: str, limits: DocumentLimits = DEFAULT_LIMITS) -> None:
    """Refuse data that no document may carry: the loaders' rules, for Python values.

    Only dicts with text keys, lists, text, integers, finite floats, booleans
    and None; nested at most ``limits.max_depth`` deep, ``limits.max_nodes``
    in all. Checked without recursion, so any depth (even a cycle) is refused.
    """
    nodes = 0
    stack: list[tuple[object, int, str]] = [(value, 1, "")]
    while stack:
        item, depth, path = stack.pop()
        nodes += 1
        where = f" at {path}" if path else ""
        if nodes > limits.max_nodes:
            raise _too_many(source, limits, where)
        if isinstance(item, Mapping | list | tuple) and depth > limits.max_depth:
            raise _too_deep(source, limits, where)
        if isinstance(item, Mapping):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise _refuse(
                        source,
                        f"has the key {key!r}{where}, which is not text",
                        "write every key as text (quoted in YAML)",
                    )
                _check_text(key, source, path)
                stack.append((child, depth + 1, f"{path}.{key}" if path else key))
        elif isinstance(item, list | tuple):
            stack.extend(
                (child, depth + 1, f"{path}.{index}" if path else str(index))
                for index, child in enumerate(item)
            )
        elif isinstance(item, str):
            _check_text(item, source, path)
        elif isinstance(item, bool) or item is None:
            pass
        elif isinstance(item, int):
            if item.bit_length() > _MAX_INT_BITS:
                raise _long_int(source, where)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise _not_finite(source, str(item), where)
        else:
            raise _refuse(
                source,
                f"has a value of type {type(item).__name__}{where}",
                "use only mappings, lists, text, numbers, true/false and null",
            )


# ---- refusals --------------------------------------------------------------------------


def _refuse(source: str, problem: str, remedy: str, where: str = "") -> DocumentError:
    """``<source> <problem><where>: <remedy>``; ``where`` is "(at line 2, column 4)" or so."""
    return DocumentError(f"{source} {problem}{where}: {remedy}", source=source)


def _too_deep(source: str, limits: DocumentLimits, where: str = "") -> DocumentError:
    return _refuse(
        source,
        f"nests mappings and lists more than {limits.max_depth} levels deep",
        "flatten it",
        where,
    )


def _too_many(source: str, limits: DocumentLimits, where: str = "") -> DocumentError:
    return _refuse(
        source,
        f"has more than {limits.max_nodes} keys and values",
        "split it up or move large data into inputs",
        where,
    )


def _long_int(source: str, where: str = "") -> DocumentError:
    return _refuse(
        source,
        f"has an integer of more than {_MAX_INT_DIGITS} digits",
        "write it as text (quoted) if it is an identifier",
        where,
    )


def _not_finite(source: str, number: str, where: str = "") -> DocumentError:
    # NaN compares false with everything, so a NaN budget would never stop a run.
    return _refuse(
        source, f"has the number {number}, which is not finite", "write a finite number", where
    )


def _duplicate(source: str, key: str, where: str = "") -> DocumentError:
    # Later keys silently win in plain YAML and JSON, so a reviewer could read
    # one value while another one runs.
    return _refuse(source, f"has the key {key!r} twice in one mapping", "keep only one", where)


def _position(text: str, offset: int) -> str:
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return f" (at line {line}, column {column})"


def _check_size(text: str, source: str, limits: DocumentLimits) -> None:
    # Characters never outnumber UTF-8 bytes, so a long text is refused
    # before it is encoded.
    if (
        len(text) > limits.max_bytes
        or len(text.encode("utf-8", "surrogatepass")) > limits.max_bytes
    ):
        raise _refuse(
            source,
            f"is larger than {limits.max_bytes} bytes",
            "split it up or move large text into inputs",
        )


def _check_text(text: str, source: str, path: str) -> None:
    # A lone surrogate (JSON "\ud800") cannot be encoded as UTF-8: it would
    # break storing the run in history long after validation said yes.
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _refuse(
                source,
                "has text with an invalid character (a lone UTF-16 surrogate)",
                "remove it",
                f" at {path}" if path else "",
            ) from None


# ---- JSON ----------------------------------------------------------------------------

# One JSON token after separators: a string, a bracket, or a bare word
# (number, true, false, null, or something that is not JSON). Matched only at
# the scan position, so every character is looked at once.
_JSON_TOKEN = re.compile(r'[\s,:]*(?:("[^"\\]*(?:\\.[^"\\]*)*")|([\[{])|([\]}])|([^\s,:\[\]{}"]+))')


def _json_shape(text: str, source: str, limits: DocumentLimits) -> bool:
    """Refuse JSON text too deep or too large, found without parsing (json.loads recurses).

    False: the scan met something that is not JSON, and stopped there.
    """
    depth = nodes = position = 0
    end = len(text.rstrip())
    match = _JSON_TOKEN.match
    while position < end:
        token = match(text, position)
        if token is None:
            return False
        if token.group(3) is not None:
            depth -= 1
        else:
            nodes += 1
            if nodes > limits.max_nodes:
                raise _too_many(source, limits, _position(text, token.start(token.lastindex or 0)))
            if token.group(2) is not None:
                depth += 1
                if depth > limits.max_depth:
                    raise _too_deep(source, limits, _position(text, token.start(2)))
        position = token.end()
    return True


def _json_loads(text: str, source: str, limits: DocumentLimits) -> object:
    """``json.loads`` on scanned text: depth and size are known to be within limits."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        mapping: dict[str, Any] = {}
        for key, value in items:
            if key in mapping:
                raise _duplicate(source, key)
            mapping[key] = value
        return mapping

    def integer(digits: str) -> int:
        if len(digits.lstrip("-")) > _MAX_INT_DIGITS:
            raise _long_int(source)
        return int(digits)

    def constant(name: str) -> float:
        raise _not_finite(source, name)

    def number(digits: str) -> float:
        value = float(digits)
        if not math.isfinite(value):
            raise _not_finite(source, digits)
        return value

    value = json.loads(
        text,
        object_pairs_hook=pairs,
        parse_int=integer,
        parse_float=number,
        parse_constant=constant,
    )
    if _SURROGATE_ESCAPE.search(text):
        check_document(value, source=source, limits=limits)
    return value


# An escape that may decode to a lone surrogate; only then are strings checked.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


# ---- YAML ----------------------------------------------------------------------------

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {f"{_TAG}{name}" for name in ("str", "int", "float", "bool", "null")}
# Read as the text written: a date is not JSON, and nothing in a spec wants one.
_TEXT_TAGS = {f"{_TAG}timestamp", f"{_TAG}value"}
_REFUSED_REFERENCES = (
    "anchors and aliases are refused because a few of them can expand a tiny "
    "document beyond any memory"
)


def _new_parser(text: str) -> Any:
    """An event source: libyaml's parser when PyYAML has it (C, fast), else PyYAML's own.

    Only events are used: both parsers keep nesting on an explicit stack.
    """
    if yaml.__with_libyaml__:
        from yaml._yaml import CParser

        return CParser(text)
    return yaml.SafeLoader(text)


class _Collection:
    """A mapping or list being built, and the key waiting for its value."""

    __slots__ = ("key", "value")

    def __init__(self, value: dict[str, object] | list[object]) -> None:
        self.value = value
        self.key: str | None = None


def _load_yaml(text: str, source: str, limits: DocumentLimits) -> object:
    """One YAML document, built from parser events with the limits checked per event.

    PyYAML's composer would first build the whole node graph (aliases and
    all) and recurse once per level; this builds plain data directly.
    """
    parser = _new_parser(text)
    try:
        return _build(parser, source, limits)
    except yaml.MarkedYAMLError as error:
        if "nesting depth" in str(error.problem):
            # libyaml's own limit (1000 levels), met while it scans ahead.
            raise _too_deep(source, limits, _at(error.problem_mark)) from None
        problem = error.problem or "a syntax error"
        if error.context:
            started = error.context_mark
            problem += (
                f" ({error.context}{' from line ' + str(started.line + 1) if started else ''})"
            )
        raise _refuse(
            source,
            f"is not valid YAML or JSON{_at(error.problem_mark, 'at line')}",
            f"{problem}; fix the syntax there",
        ) from None
    except yaml.YAMLError as error:
        raise _refuse(source, "is not valid YAML or JSON", str(error)) from None
    finally:
        parser.dispose()


def _at(mark: yaml.Mark | None, word: str = "(at line") -> str:
    if mark is None:
        return ""
    where = f" {word} {mark.line + 1}, column {mark.column + 1}"
    return where + ")" if word.startswith("(") else where


def _build(parser: Any, source: str, limits: DocumentLimits) -> object:
    resolver = Resolver()
    scalars = SafeConstructor()
    _expect(parser, StreamStartEvent)
    if parser.check_event(StreamEndEvent):
        return None
    _expect(parser, DocumentStartEvent)
    stack: list[_Collection] = []
    nodes = 0
    while True:
        event = parser.get_event()
        where = _at(event.start_mark)
        if isinstance(event, SequenceEndEvent | MappingEndEvent):
            value: object = stack.pop().value
        else:
            if not isinstance(event, NodeEvent):
                raise _refuse(source, f"has an unexpected {type(event).__name__}{where}", "fix it")
            nodes += 1
            if nodes > limits.max_nodes:
                raise _too_many(source, limits, where)
            _refuse_references(event, source, where)
            if isinstance(event, CollectionStartEvent):
                if len(stack) >= limits.max_depth:
                    raise _too_deep(source, limits, where)
                if stack and isinstance(stack[-1].value, dict) and stack[-1].key is None:
                    raise _refuse(
                        source, f"uses a mapping or list as a key{where}", "use text keys"
                    )
                _check_collection_tag(event, source, where)
                stack.append(_Collection({} if isinstance(event, MappingStartEvent) else []))
                continue
            assert isinstance(event, ScalarEvent)
            value = _scalar(event, resolver, scalars, source, where)
        if not stack:
            break
        parent = stack[-1]
        if isinstance(parent.value, list):
            parent.value.append(value)
        elif parent.key is None:
            if not isinstance(value, str):
                raise _refuse(
                    source,
                    f"has the key {event.value!r}{where}, which YAML reads as "
                    f"{_yaml_type(value)}, not as text",
                    "quote it",
                )
            if value in parent.value:
                raise _duplicate(source, value, where)
            parent.key = value
        else:
            parent.value[parent.key] = value
            parent.key = None
    _expect(parser, DocumentEndEvent)
    if not parser.check_event(StreamEndEvent):
        extra = _at(parser.peek_event().start_mark)
        raise _refuse(source, f"holds more than one YAML document (`---`){extra}", "keep one")
    return value


def _expect(parser: Any, kind: type[Event]) -> None:
    event = parser.get_event()
    assert isinstance(event, kind), event


def _refuse_references(event: NodeEvent, source: str, where: str) -> None:
    if isinstance(event, AliasEvent):
        raise _refuse(
            source,
            f"uses the YAML alias *{event.anchor}{where}",
            f"{_REFUSED_REFERENCES}; write the repeated value out in full",
        )
    if event.anchor is not None:
        raise _refuse(
            source,
            f"uses the YAML anchor &{event.anchor}{where}",
            f"{_REFUSED_REFERENCES}; remove it and write repeated values out in full",
        )


def _check_collection_tag(event: CollectionStartEvent, source: str, where: str) -> None:
    plain = f"{_TAG}map" if isinstance(event, MappingStartEvent) else f"{_TAG}seq"
    if event.tag not in (None, "!", plain):
        raise _unknown_tag(source, str(event.tag), where)


def _scalar(
    event: ScalarEvent, resolver: Resolver, scalars: SafeConstructor, source: str, where: str
) -> object:
    tag = event.tag
    if tag is None or tag == "!":
        tag = resolver.resolve(ScalarNode, event.value, event.implicit)
    if tag in _TEXT_TAGS:
        return event.value
    if tag == f"{_TAG}merge":
        raise _refuse(source, f"uses a YAML merge key (<<){where}", "write the keys out in full")
    if tag not in _SCALAR_TAGS:
        raise _unknown_tag(source, tag, where)
    if tag == f"{_TAG}int" and len(event.value) > _MAX_INT_DIGITS:
        raise _long_int(source, where)
    node = ScalarNode(tag, event.value, None, None)
    try:
        value: object = scalars.yaml_constructors[tag](scalars, node)
    except ValueError:
        raise _refuse(
            source,
            f"has {event.value[:40]!r} tagged !!{tag.removeprefix(_TAG)}{where}, which it is not",
            "remove the tag or fix the value",
        ) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise _not_finite(source, event.value, where)
    return value


def _unknown_tag(source: str, tag: str, where: str) -> DocumentError:
    shown = "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag
    return _refuse(
        source,
        f"uses the YAML tag {shown}{where}, which is not accepted",
        "remove it (a document holds only mappings, lists, text, numbers, true/false and null)",
    )


def _yaml_type(value: object) -> str:
    if isinstance(value, bool):
        return "true/false"
    if value is None:
        return "null"
    return "a number"


def strip_code_fence(text: str) -> str:
    """``text`` without one surrounding Markdown code fence (```` ``` ```` or ```` ```json ````).

    Models often fence the JSON they are asked for. Cut by hand: a regular
    expression that did this took minutes on a reply of a few thousand newlines.
    """
    body = text.strip()
    if len(body) >= 6 and body.startswith("```") and body.endswith("```"):
        header, newline, inside = body[3:-3].partition("\n")
        if newline and header.strip() in ("", "json", "JSON"):
            return inside.strip()
    return text
