"""Reading a spec from a file or text, and preparing it for a run.

YAML and JSON are both accepted (JSON is YAML). Caller inputs are merged over
the spec's own ``inputs`` before validation, so a reference to an input the
caller supplies is valid.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from llmmixer.activities.pricing import PriceTable
from llmmixer.client.files import File, describe_inputs, has_file_inputs, spec_dir
from llmmixer.core.attachments import TEXT_TYPE, sniff_media_type
from llmmixer.core.documents import DEFAULT_LIMITS, DocumentError, check_document, load_document
from llmmixer.core.providers import retirement_notice
from llmmixer.core.spec import DecomposeStep, LlmStep, Spec
from llmmixer.core.validation import SPEC_LOCATION, SpecError, SpecIssue, validate_spec


def read_spec(source: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """A spec as a plain dict: from a mapping, a file path, or YAML/JSON text.

    Every spec is untrusted: text goes through the safe document loader (no
    YAML aliases, bounded size and depth), and a mapping through the same
    rules, so no spec can stall or crash the validator behind it.
    """
    try:
        if isinstance(source, Mapping):
            check_document(source, source="the spec")
            return json.loads(json.dumps(source))  # a copy the caller cannot change
        if isinstance(source, Path) or ("\n" not in source and Path(source).suffix in _SUFFIXES):
            path = Path(source)
            data = load_document(_read_file(path), source=str(path))
        else:
            data = load_document(source, source="the spec")
    except DocumentError as error:
        raise _document_error(str(error)) from None
    if not isinstance(data, dict):
        raise _document_error("the spec must be a mapping with `steps`")
    return data


_SUFFIXES = {".yaml", ".yml", ".json"}
# How deep spec tools may nest files (a spec whose tool is a spec whose ...):
# a file naming itself must end in an error, not a loop.
MAX_SPEC_TOOL_DEPTH = 5


def _is_file(source: str | Path) -> bool:
    return isinstance(source, Path) or ("\n" not in source and Path(source).suffix in _SUFFIXES)


def inline_spec_tools(body: dict[str, Any], base: Path, depth: int = 0) -> dict[str, Any]:
    """``body`` with every ``kind: spec`` tool's file read into the tool (``spec: {...}``).

    The workflow does no I/O, so a child spec given as a path is read here,
    relative to ``base`` (the directory of the spec that names it), and its
    own spec tools relative to its file, up to MAX_SPEC_TOOL_DEPTH deep.
    """
    where: list[tuple[str, list[Any]]] = []
    defaults = body.get("defaults")
    if isinstance(defaults, dict) and isinstance(defaults.get("tools"), list):
        where.append((SPEC_LOCATION, defaults["tools"]))
    for step in body.get("steps") or []:
        if isinstance(step, dict) and isinstance(step.get("tools"), list):
            where.append((str(step.get("id", "?")), step["tools"]))
    issues: list[SpecIssue] = []
    for step_id, tools in where:
        for number, tool in enumerate(tools):
            if not (isinstance(tool, dict) and tool.get("kind") == "spec"):
                continue
            path = tool.get("spec")
            if not isinstance(path, str) or not path.strip():
                continue
            field = f"tools[{number}].spec"
            if depth >= MAX_SPEC_TOOL_DEPTH:
                issues.append(
                    SpecIssue(
                        step_id,
                        field,
                        f"spec tools nest more than {MAX_SPEC_TOOL_DEPTH} files deep "
                        f"(at {path}): does a spec name itself?",
                    )
                )
                continue
            file = base / path
            try:
                child = read_spec(file)
                tool["spec"] = inline_spec_tools(child, file.parent, depth + 1)
            except SpecError as error:
                issues.extend(
                    SpecIssue(step_id, field, f"{file}: {issue.message}") for issue in error.issues
                )
    if issues:
        raise SpecError(issues)
    return body


def _read_file(path: Path) -> str:
    # Read no more than a spec may hold: `validate /dev/zero` must not fill memory.
    limit = DEFAULT_LIMITS.max_bytes
    try:
        with path.open("rb") as stream:
            data = stream.read(limit + 1)
    except OSError as error:
        raise _document_error(f"cannot read {path}: {error.strerror}", "(file)") from None
    if len(data) > limit:
        raise _document_error(
            f"{path} is larger than {limit} bytes: split it up or move large text into inputs"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _document_error(
            f"{path} is not UTF-8 text (byte {error.start}): save it as UTF-8"
        ) from None


def _document_error(message: str, field: str = "(document)") -> SpecError:
    return SpecError([SpecIssue(SPEC_LOCATION, field, message)])


def parse_inputs(pairs: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` from the command line.

    ``key=@path`` reads the file: an image or a PDF (typed by its content)
    becomes a file input, anything else its UTF-8 text.
    """
    inputs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SpecError(
                [SpecIssue(SPEC_LOCATION, "inputs", f"--input {pair!r}: write it as key=value")]
            )
        inputs[key] = _read_input(key, Path(value[1:])) if value.startswith("@") else value
    return inputs


def _read_input(key: str, path: Path) -> str | File:
    try:
        with path.open("rb") as stream:
            head = stream.read(16)
        if sniff_media_type(head) not in (None, TEXT_TYPE):
            return File.read(path)
        return path.read_text(encoding="utf-8")
    except OSError as error:
        message = f"--input {key}=@{path}: cannot read it: {error.strerror}"
    except UnicodeDecodeError as error:
        message = f"--input {key}=@{path}: not UTF-8 text (byte {error.start}): save it as UTF-8"
    raise SpecError([SpecIssue(SPEC_LOCATION, "inputs", message)])


def prepare_spec(
    source: Mapping[str, Any] | str | Path,
    *,
    inputs: Mapping[str, Any] | None = None,
    dry_run: bool = False,
    read_paths: bool = True,
) -> tuple[dict[str, Any], Spec]:
    """The JSON body to start a run with, and its validated model.

    ``read_paths=False`` (``llmmixer serve``): a file input naming a path is
    refused, never read.
    """
    body = read_spec(source)
    if not isinstance(source, Mapping) and _is_file(source):
        # Only a spec read from a file names files relative to it; a mapping
        # (the HTTP API, a program) must inline its child specs itself: a
        # request must never make the server read its own files.
        body = inline_spec_tools(body, Path(source).parent)
    merged = dict(body.get("inputs") or {})
    merged.update(inputs or {})
    if has_file_inputs(merged):
        # Described (typed, sized, hashed), not stored: enough to validate.
        # MixerClient.start stores them; llmmixer serve never reads a path.
        merged = describe_inputs(merged, base_dir=spec_dir(source), read_paths=read_paths)
        inputs = merged
    if inputs:
        body["inputs"] = merged
        try:
            check_document(body, source="the spec with its inputs")
        except DocumentError as error:
            raise _document_error(str(error)) from None
    if dry_run:
        body["dry_run"] = True
    return body, validate_spec(body)


def spec_warnings(
    spec: Spec, prices: PriceTable | None = None, *, today: datetime.date | None = None
) -> list[str]:
    """What may surprise the spec's owner at run time, though the spec is valid.

    A model its provider has announced the end of life of works until that
    day: the warning names the field and the model to change it to.

    A model missing from the price table costs "unknown", which a
    ``max_cost_usd`` budget cannot count: the run would spend on it unchecked.
    """
    warnings = [str(issue) for issue in model_retirements(spec, retired=False, today=today)]
    if spec.dry_run or not spec.has_cost_limit():
        return warnings
    table = prices or PriceTable.load()
    return warnings + [
        f"{provider}/{model} has no price in llmmixer's price table "
        "(llmmixer/activities/prices.toml), so max_cost_usd does not limit what it spends: "
        "add its price there, or set a max_tokens budget as well"
        for provider, model in sorted(spec.models())
        if table.price(provider, model) is None
    ]


def model_retirements(
    spec: Spec, *, retired: bool, today: datetime.date | None = None
) -> list[SpecIssue]:
    """Each field naming a model its provider retires (core/providers.py), with the replacement.

    ``retired`` picks the models already past their end of life (calls to
    them fail: ``llmmixer validate`` refuses them) or those still working
    until an announced date (a warning). Never part of ``validate_spec``: a
    rule that depends on the date would turn a spec that ran into an invalid
    one, and a run in flight must replay the verdict it was given.
    """
    day = today or datetime.datetime.now(datetime.UTC).date()
    issues: list[SpecIssue] = []
    for where, field, provider, model in _named_models(spec):
        notice = retirement_notice(provider, model, day)
        if notice is not None and notice.retired == retired:
            issues.append(SpecIssue(where, field, notice.message))
    return issues


def _named_models(spec: Spec) -> Iterator[tuple[str, str, str, str]]:
    """(step or "spec", field, provider, model) for every model the spec names."""
    for role, targets in spec.routes.items():
        for number, target in enumerate(targets):
            yield SPEC_LOCATION, f"routes.{role}.{number}.model", target.provider, target.model
    for number, rule in enumerate(spec.allow or []):
        if rule.provider and rule.model:
            yield SPEC_LOCATION, f"allow.{number}.model", rule.provider, rule.model
    defaulted: set[str] = set()
    for step in spec.steps:
        if isinstance(step, LlmStep | DecomposeStep) and step.role is None:
            provider = step.provider or spec.defaults.provider
            if step.model is not None and provider:
                yield step.id, "model", provider, step.model
            elif spec.defaults.model is not None and provider:
                defaulted.add(provider)
        if isinstance(step, LlmStep):
            for number, fallback in enumerate(step.fallback):
                yield step.id, f"fallback.{number}.model", fallback.provider, fallback.model
            if step.best_of is not None:
                for number, target in enumerate(step.best_of.targets):
                    field = f"best_of.targets.{number}.model"
                    yield step.id, field, target.provider, target.model
                judge = step.best_of.judge
                if judge is not None:
                    yield step.id, "best_of.judge.model", judge.provider, judge.model
    # A model the steps take from `defaults` is changed there, once.
    for provider in sorted(defaulted):
        assert spec.defaults.model is not None
        yield SPEC_LOCATION, "defaults.model", provider, spec.defaults.model
