"""Static validation of a spec: every problem at once, each naming step and field.

``validate_spec`` is the single gate used by ``llmmixer validate``, by
``llmmixer run`` before it starts anything, by the HTTP API, and by
``MixerWorkflow`` itself for specs that arrive through the plain Temporal CLI.

Rules here may be tightened in any release. ``MixerWorkflow`` runs them once,
at the start of a run, in a local activity (``activities/checks.py``) whose
verdict is recorded in history, so a replay never re-runs them; on replay the
workflow only reads the spec's shape (``parse_spec_shape``). Runs recorded
before that still run ``validate_spec`` in the workflow on replay.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError, create_model

from llmmixer.core.attachments import DOCUMENT_TYPES, IMAGE_TYPES, MEDIA_TYPES, TEXT_TYPE
from llmmixer.core.contracts import PROVIDERS, Attachment
from llmmixer.core.provider_options import model_name_issue, provider_option_issues
from llmmixer.core.providers import PROVIDER_SPECS, provider_spec
from llmmixer.core.secrets import is_secret_field, looks_like_secret
from llmmixer.core.spec import (
    KINDS,
    STEP_ID_PATTERN,
    STEP_MODELS,
    AgentStep,
    ApprovalStep,
    DecomposeStep,
    Defaults,
    FileInput,
    FilePart,
    LlmStep,
    PtyStep,
    Spec,
    TextPart,
)
from llmmixer.core.templates import references
from llmmixer.core.tools import (
    TOOL_KINDS,
    TOOL_NAME_PATTERN,
    CommandTool,
    McpTool,
    SpecTool,
    Tool,
    argv_placeholder,
)

SPEC_LOCATION = "spec"

# Field names and values that look like credentials: a spec is stored in
# workflow history in clear, so it must never carry one. What counts as a
# credential is defined once, in core/secrets.py. Changing it is safe for
# runs started since CHECKS_RECORDED_PATCH: their verdict is an activity's
# result, replayed from history. Older runs re-run validate_spec on replay; a
# change there only matters to one whose spec held a key-shaped value.

# Keys under which free text is expected and secret-looking *names* are harmless.
_TEXT_FIELDS = {"prompt", "system", "content", "description", "output", "stdin", "send"}


@dataclass(frozen=True)
class SpecIssue:
    """One problem: where (``step`` id or "spec"), which ``field``, and what to do."""

    step: str
    field: str
    message: str

    def __str__(self) -> str:
        if self.step == SPEC_LOCATION:
            return f"spec: {self.field}: {self.message}"
        return f"step {self.step}: {self.field}: {self.message}"


class SpecError(ValueError):
    """A spec that cannot run; ``issues`` lists every problem found."""

    def __init__(self, issues: list[SpecIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))


def validate_spec(raw: object) -> Spec:
    """Return the parsed spec, or raise ``SpecError`` with every issue found."""
    issues = list(find_issues(raw))
    if issues:
        raise SpecError(issues)
    return Spec.model_validate(raw)


def parse_spec_shape(raw: object) -> Spec:
    """The spec's shape only (its pydantic models), or ``SpecError`` naming step and field.

    What ``MixerWorkflow`` reads on every replay: it must accept every spec a
    released version accepted, so it checks no rule beyond the models.
    """
    if not isinstance(raw, Mapping):
        raise SpecError(
            [
                SpecIssue(
                    SPEC_LOCATION,
                    "(document)",
                    "the spec must be a mapping with `name` and `steps`",
                )
            ]
        )
    try:
        return Spec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(_shape_issues(raw, error)) from None


def _shape_issues(raw: Mapping[str, Any], error: ValidationError) -> list[SpecIssue]:
    steps = raw.get("steps") if isinstance(raw.get("steps"), list) else []
    assert isinstance(steps, list)
    issues: list[SpecIssue] = []
    for detail in error.errors():
        loc = detail["loc"]
        path: tuple[int | str, ...]
        if loc == ("steps",):
            where, path = SPEC_LOCATION, loc
            message = "a spec needs a non-empty list of steps under `steps`"
        elif len(loc) < 2 or loc[0] != "steps" or not isinstance(loc[1], int):
            where, path, message = SPEC_LOCATION, loc, _explain(detail)
        else:
            index = loc[1]
            step = steps[index] if index < len(steps) else None
            step_id = step.get("id") if isinstance(step, Mapping) else None
            valid_id = isinstance(step_id, str) and re.match(STEP_ID_PATTERN, step_id)
            where = step_id if valid_id and isinstance(step_id, str) else f"#{index + 1}"
            # The discriminated union puts the step's kind before the field.
            path = loc[3:] if len(loc) > 2 and loc[2] in KINDS else loc[2:]
            message = _explain(detail)
            if detail["type"] == "union_tag_invalid" and isinstance(step, Mapping):
                path = ("kind",)
                message = f"unknown kind {step.get('kind')!r}: use one of {', '.join(KINDS)}"
            elif detail["type"] == "union_tag_not_found":
                message = "each step must be a mapping with `id`"
        field = ".".join(str(part) for part in path) or "(step)"
        issues.append(SpecIssue(where, field, message))
    return issues


def find_issues(raw: object) -> Iterator[SpecIssue]:
    if not isinstance(raw, Mapping):
        yield SpecIssue(
            SPEC_LOCATION, "(document)", "the spec must be a mapping with `name` and `steps`"
        )
        return
    yield from _secret_issues(raw, SPEC_LOCATION, "")
    steps_raw = raw.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        yield SpecIssue(
            SPEC_LOCATION, "steps", "a spec needs a non-empty list of steps under `steps`"
        )
        steps_raw = []
    top = {key: value for key, value in raw.items() if key != "steps"}
    yield from _model_issues(_spec_without_steps(), top, SPEC_LOCATION, "")
    defaults = raw.get("defaults") if isinstance(raw.get("defaults"), Mapping) else {}
    assert isinstance(defaults, Mapping)
    yield from _default_tool_issues(defaults)
    routes = raw.get("routes") if isinstance(raw.get("routes"), Mapping) else {}
    assert isinstance(routes, Mapping)
    yield from _route_issues(raw)
    parsed: dict[str, BaseModel] = {}
    ids: list[str] = []
    for index, step_raw in enumerate(steps_raw):
        step_id, step_issues, model = _check_step(index, step_raw, defaults, routes)
        yield from step_issues
        if step_id is None:
            continue
        if step_id in ids:
            yield SpecIssue(
                step_id, "id", f"`{step_id}` is used by more than one step: give each a unique id"
            )
            continue
        ids.append(step_id)
        if model is not None:
            parsed[step_id] = model
    inputs = raw.get("inputs") if isinstance(raw.get("inputs"), Mapping) else {}
    assert isinstance(inputs, Mapping)
    yield from _graph_issues(parsed, ids, inputs, raw.get("output"))
    yield from _file_input_issues(inputs)
    for step_id, model in parsed.items():
        if isinstance(model, LlmStep):
            yield from _attachment_issues(step_id, model, inputs, defaults, routes)


# ---- files ---------------------------------------------------------------------------


def _file_input_issues(inputs: Mapping[str, Any]) -> Iterator[SpecIssue]:
    for name, value in inputs.items():
        if not isinstance(value, Mapping) or "file" not in value:
            continue
        try:
            parsed = FileInput.model_validate(value)
        except ValidationError:
            continue  # the shape check reports it
        if isinstance(parsed.file, Attachment) and parsed.file.media_type not in MEDIA_TYPES:
            yield SpecIssue(
                SPEC_LOCATION,
                f"inputs.{name}",
                f"{parsed.file.media_type} is not a file type llmmixer sends: use one of "
                f"{', '.join(MEDIA_TYPES)}",
            )


def _attachment_issues(
    step_id: str,
    step: LlmStep,
    inputs: Mapping[str, Any],
    defaults: Mapping[str, Any],
    routes: Mapping[str, Any],
) -> Iterator[SpecIssue]:
    """Each attachment and file part names a file input of its kind, in a user
    message, and every target of the step can take its type."""
    # (field, input name, part type or None for `attachments`)
    wanted: list[tuple[str, str, str | None]] = [
        (f"attachments.{number}", name, None) for number, name in enumerate(step.attachments)
    ]
    for number, message in enumerate(step.messages or []):
        content = message.get("content")
        for index, part in enumerate(content if isinstance(content, list) else []):
            if not isinstance(part, FilePart):
                continue
            field = f"messages[{number}].content[{index}]"
            if message.get("role") != "user":
                # No provider takes a file in the model's own turn.
                yield SpecIssue(
                    step_id,
                    field,
                    f"an {part.type} part can only be sent in a message with role: user: "
                    "move it to a user message",
                )
                continue
            wanted.append((field, part.input, part.type))
    files: list[tuple[str, str, str]] = []
    for field, name, part_type in wanted:
        value = inputs.get(name)
        if value is None:
            yield SpecIssue(
                step_id,
                field,
                f"{name!r} is not an input of this spec: add it under `inputs` as "
                f"{{file: PATH}} or pass --input {name}=@FILE",
            )
            continue
        if not isinstance(value, Mapping) or "file" not in value:
            yield SpecIssue(
                step_id,
                field,
                f"input {name!r} is text, not a file: pass it as --input {name}=@FILE "
                "(an image, a PDF) or {file: PATH} in `inputs`",
            )
            continue
        try:
            parsed = FileInput.model_validate(value).file
        except ValidationError:
            continue  # _file_input_issues reports it
        if not isinstance(parsed, Attachment):
            continue  # a path not read yet: its type is known once it is
        mismatch = _part_mismatch(part_type, name, parsed.media_type)
        if mismatch is not None:
            yield SpecIssue(step_id, field, mismatch)
            continue
        files.append(("attachments" if part_type is None else field, name, parsed.media_type))
    targets: list[tuple[str, bool]] = []
    if step.role is not None:
        route = routes.get(step.role)
        for target in route if isinstance(route, list) else []:
            if isinstance(target, Mapping):
                targets.append((str(target.get("provider")), bool(target.get("base_url"))))
    else:
        provider = step.provider or defaults.get("provider")
        targets.append((str(provider), step.base_url is not None))
    targets += [(t.provider, t.base_url is not None) for t in step.fallback]
    if step.best_of is not None:
        targets += [(t.provider, t.base_url is not None) for t in step.best_of.targets]
    refused: set[str] = set()
    for provider, own in targets:
        try:
            spec = provider_spec(provider)
        except ValueError:
            continue  # reported as an unknown provider
        for field, name, media_type in files:
            reason = spec.attachment_refusal(media_type, own_endpoint=own)
            if reason is not None and reason not in refused:
                refused.add(reason)
                yield SpecIssue(
                    step_id,
                    field,
                    f"input {name!r} is {media_type}, and {reason}: send it to another "
                    "provider, drop the step's base_url, or convert the file "
                    "(e.g. a PDF to images)",
                )


def _part_mismatch(part_type: str | None, name: str, media_type: str) -> str | None:
    """Why a file part cannot carry ``media_type``, or None (``attachments`` take any)."""
    if part_type == "image" and media_type not in IMAGE_TYPES:
        return (
            f"input {name!r} is {media_type}, not an image ({', '.join(IMAGE_TYPES)}): "
            f"use {{type: document, input: {name}}} or pass an image"
        )
    if part_type == "document" and media_type not in (*DOCUMENT_TYPES, TEXT_TYPE):
        return (
            f"input {name!r} is {media_type}, not a document (a PDF or text): "
            f"use {{type: image, input: {name}}} or pass a PDF"
        )
    return None


# The top-level fields, validated apart so step problems are reported per
# step. Derived from Spec so a new top-level field can never be refused here.
# Built on first use, not at import: this module loads afresh in the workflow
# sandbox for every run, where building this model was about a quarter of a
# run's start-up (bench/README.md), and runs never call it there.
@functools.cache
def _spec_without_steps() -> type[BaseModel]:
    return create_model(  # type: ignore[call-overload]
        "_SpecWithoutSteps",
        __config__=Spec.model_config,
        **{
            name: (field.annotation, field)
            for name, field in Spec.model_fields.items()
            if name != "steps"
        },
    )


def _route_issues(raw: Mapping[str, Any]) -> Iterator[SpecIssue]:
    """Providers under `routes` and `allow` must exist; a route needs a target."""
    routes = raw.get("routes")
    if isinstance(routes, Mapping):
        for role, targets in routes.items():
            if isinstance(targets, list) and not targets:
                yield SpecIssue(
                    SPEC_LOCATION, f"routes.{role}", "a route needs at least one provider/model"
                )
            for number, target in enumerate(targets if isinstance(targets, list) else []):
                provider = target.get("provider") if isinstance(target, Mapping) else None
                if isinstance(provider, str) and provider not in PROVIDERS:
                    yield SpecIssue(
                        SPEC_LOCATION,
                        f"routes.{role}.{number}.provider",
                        f"unknown provider {provider!r}: use one of {', '.join(PROVIDERS)}",
                    )
    allow = raw.get("allow")
    for number, rule in enumerate(allow if isinstance(allow, list) else []):
        provider = rule.get("provider") if isinstance(rule, Mapping) else None
        if isinstance(provider, str) and provider not in PROVIDERS:
            yield SpecIssue(
                SPEC_LOCATION,
                f"allow.{number}.provider",
                f"unknown provider {provider!r}: use one of {', '.join(PROVIDERS)}",
            )


def _check_step(
    index: int, step_raw: object, defaults: Mapping[str, Any], routes: Mapping[str, Any]
) -> tuple[str | None, list[SpecIssue], BaseModel | None]:
    where = f"#{index + 1}"
    if not isinstance(step_raw, Mapping):
        return None, [SpecIssue(where, "(step)", "each step must be a mapping with `id`")], None
    step_id = step_raw.get("id")
    issues: list[SpecIssue] = []
    if not isinstance(step_id, str) or not re.match(STEP_ID_PATTERN, step_id):
        issues.append(
            SpecIssue(
                where,
                "id",
                f"{step_id!r} is not a valid id: use lowercase letters, digits, `_` and `-`",
            )
        )
        return None, issues, None
    kind = step_raw.get("kind", "llm")
    if kind not in KINDS:
        issues.append(
            SpecIssue(step_id, "kind", f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
        )
        return step_id, issues, None
    model_type = STEP_MODELS[kind]
    body = {**step_raw, "kind": kind}
    issues.extend(_model_issues(model_type, body, step_id, ""))
    if issues:
        return step_id, issues, None
    model = model_type.model_validate(body)
    issues.extend(_provider_issues(step_id, model, defaults, routes))
    if isinstance(model, LlmStep):
        issues.extend(_provider_option_issues(step_id, model, defaults, routes))
        issues.extend(_step_tool_issues(step_id, model, defaults))
    return step_id, issues, model


def _model_issues(
    model_type: type[BaseModel], body: Mapping[str, Any], where: str, prefix: str
) -> Iterator[SpecIssue]:
    try:
        model_type.model_validate(body)
    except ValidationError as error:
        details = error.errors()
        # A message's content is text or a list of parts, and pydantic reports
        # both readings: a list keeps only its parts' errors, anything else
        # one error saying what content may be.
        listed = {
            d["loc"][1]
            for d in details
            if _content_reading(d["loc"]) == "list" and d["type"] != "list_type"
        }
        for detail in details:
            reading = _content_reading(detail["loc"])
            if reading == "list" and detail["type"] == "list_type":
                continue
            location = _field_path(detail["loc"]) or "(document)"
            if reading == "str":
                if detail["loc"][1] in listed:
                    continue
                yield SpecIssue(where, prefix + location, _CONTENT_SHAPE)
                continue
            yield SpecIssue(where, prefix + location, _explain(detail))


_PART_TYPES = ("text", "image", "document")
_CONTENT_SHAPE = (
    "use text, or a list of parts: {type: text, text: ...}, {type: image, input: NAME}, "
    "{type: document, input: NAME}"
)


def _content_reading(loc: tuple[int | str, ...]) -> str | None:
    """Which reading of a message's content an error is about: "str", "list" or neither."""
    if len(loc) < 4 or loc[0] != "messages" or loc[2] != "content":
        return None
    if loc[3] == "str":
        return "str"
    return "list" if str(loc[3]).startswith("list[") else None


def _field_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic location as a field path: `tools[2].argv`, not `tools.2.command.argv`."""
    parts: list[str] = []
    index = 0
    while index < len(loc):
        part = loc[index]
        if part == "tools" and index + 1 < len(loc) and isinstance(loc[index + 1], int):
            parts.append(f"tools[{loc[index + 1]}]")
            index += 2
            # The discriminated union puts the tool's kind before its field.
            if index < len(loc) and loc[index] in TOOL_KINDS:
                index += 1
            continue
        if part == "messages" and index + 1 < len(loc) and isinstance(loc[index + 1], int):
            field = f"messages[{loc[index + 1]}]"
            index += 2
            if index < len(loc) and loc[index] == "content":
                field += ".content"
                index += 1
                reading = str(loc[index]) if index < len(loc) else ""
                if reading == "str":
                    index += 1
                elif reading.startswith("list["):
                    index += 1
                    if index < len(loc) and isinstance(loc[index], int):
                        field += f"[{loc[index]}]"
                        index += 1
                    # The tagged union puts the part's type before its field.
                    if index < len(loc) and loc[index] in _PART_TYPES:
                        index += 1
            parts.append(field)
            continue
        parts.append(str(part))
        index += 1
    return ".".join(parts)


def _explain(detail: Mapping[str, Any]) -> str:
    kind = detail["type"]
    if kind == "missing":
        return "is required: add it"
    if kind == "extra_forbidden":
        return "is not a known field: remove it or check its spelling"
    if kind == "string_pattern_mismatch":
        return "use lowercase letters, digits, `_` and `-` only"
    message = str(detail["msg"])
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        if detail["loc"][:1] == ("messages",):
            return f"each part needs `type`: one of {', '.join(_PART_TYPES)}"
        return f"each tool needs `kind`: one of {', '.join(TOOL_KINDS)}"
    if kind == "literal_error":
        return message.replace("Input should be", "use")
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    return message[:1].lower() + message[1:]


def _provider_issues(
    step_id: str, step: BaseModel, defaults: Mapping[str, Any], routes: Mapping[str, Any]
) -> Iterator[SpecIssue]:
    if not isinstance(step, LlmStep | DecomposeStep):
        return
    provider = step.provider or defaults.get("provider")
    model = step.model or defaults.get("model")
    if step.role is not None:
        # The route decides provider and model; naming them too is ambiguous.
        for name in ("provider", "model"):
            if getattr(step, name) is not None:
                yield SpecIssue(
                    step_id,
                    name,
                    f"a step with `role` gets its {name} from `routes`: remove `{name}` or `role`",
                )
        if step.role not in routes:
            known = ", ".join(sorted(routes)) or "(none: add `routes` to the spec)"
            yield SpecIssue(step_id, "role", f"unknown role {step.role!r}: use one of {known}")
    elif provider is None:
        yield SpecIssue(
            step_id, "provider", "no provider: set `provider` on the step or in `defaults`"
        )
    elif provider not in PROVIDERS:
        yield SpecIssue(
            step_id, "provider", f"unknown provider {provider!r}: use one of {', '.join(PROVIDERS)}"
        )
    if model is None and step.role is None:
        yield SpecIssue(step_id, "model", "no model: set `model` on the step or in `defaults`")
    if isinstance(step, LlmStep) and step.best_of is not None:
        named = [("best_of.targets", t.provider) for t in step.best_of.targets]
        if step.best_of.judge is not None:
            named.append(("best_of.judge", step.best_of.judge.provider))
        for number, (where, name) in enumerate(named):
            if name not in PROVIDERS:
                field = f"{where}.{number}" if where == "best_of.targets" else where
                yield SpecIssue(
                    step_id,
                    f"{field}.provider",
                    f"unknown provider {name!r}: use one of {', '.join(PROVIDERS)}",
                )
    if isinstance(step, LlmStep):
        if step.prompt is None and not step.messages:
            yield SpecIssue(step_id, "prompt", "an llm step needs `prompt` or `messages`")
        for number, message in enumerate(step.messages or []):
            if message.get("role") not in ("user", "assistant") or "content" not in message:
                yield SpecIssue(
                    step_id,
                    f"messages.{number}",
                    "each message needs `role` (user or assistant) and `content`",
                )
        for number, target in enumerate(step.fallback):
            if target.provider not in PROVIDERS:
                yield SpecIssue(
                    step_id,
                    f"fallback.{number}.provider",
                    f"unknown provider {target.provider!r}: use one of {', '.join(PROVIDERS)}",
                )
        if step.json_schema is not None and step.response_format != "json":
            yield SpecIssue(
                step_id, "json_schema", "set `response_format: json` to use a JSON schema"
            )


def _provider_option_issues(
    step_id: str, step: LlmStep, defaults: Mapping[str, Any], routes: Mapping[str, Any]
) -> Iterator[SpecIssue]:
    """``provider_options`` and model names against what each provider accepts.

    The single place for them: the per-provider schemas (the same ones the
    activity enforces on every call) run where every other rule runs
    (``llmmixer validate``, a run's start, each plan) and never on replay.
    The options go to every target of the step's chain, so each provider
    named there must accept them.
    """
    targets: list[tuple[str, Any, Any]] = []
    if step.role is None:
        targets.append(
            (
                "model",
                step.provider or defaults.get("provider"),
                step.model or defaults.get("model"),
            )
        )
    else:
        for number, target in enumerate(_list(routes.get(step.role))):
            targets.append(
                (f"routes.{step.role}.{number}.model", target.get("provider"), target.get("model"))
            )
    targets += [(f"fallback.{n}.model", t.provider, t.model) for n, t in enumerate(step.fallback)]
    if step.best_of is not None:
        targets += [
            (f"best_of.targets.{n}.model", t.provider, t.model)
            for n, t in enumerate(step.best_of.targets)
        ]
        if step.best_of.judge is not None:
            judge = step.best_of.judge
            targets.append(("best_of.judge.model", judge.provider, judge.model))
    seen: set[tuple[str, str]] = set()
    for field, provider, model in targets:
        if provider not in PROVIDERS:
            continue  # reported by _provider_issues
        problem = model_name_issue(provider, model) if isinstance(model, str) else None
        if problem is not None:
            yield SpecIssue(step_id, field, problem)
        for path, message in provider_option_issues(provider, step.provider_options):
            if (path, message) not in seen:
                seen.add((path, message))
                yield SpecIssue(step_id, path, f"{message} (the step's chain calls {provider})")


def _list(value: object) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _default_tool_issues(defaults: Mapping[str, Any]) -> Iterator[SpecIssue]:
    raw = defaults.get("tools")
    if not isinstance(raw, list) or not raw:
        return
    try:
        parsed = Defaults.model_validate(defaults)
    except ValidationError:
        return  # the shape issues are reported with the other top-level fields
    yield from _tool_issues(SPEC_LOCATION, "defaults.", parsed.tools)


def _step_tool_issues(
    step_id: str, step: LlmStep, defaults: Mapping[str, Any]
) -> Iterator[SpecIssue]:
    if step.tools is not None:
        yield from _tool_issues(step_id, "", step.tools)
    has_tools = bool(step.tools) or (step.tools is None and bool(defaults.get("tools")))
    if step.max_turns is not None and not has_tools:
        yield SpecIssue(
            step_id,
            "max_turns",
            "limits a tool loop, but the step has no tools: add `tools` or remove `max_turns`",
        )
    if has_tools and step.best_of is not None:
        yield SpecIssue(
            step_id,
            "best_of",
            "a step with tools runs one model loop, so it cannot use "
            "`best_of`: remove one of them (or set `tools: []`)",
        )


def _tool_issues(where: str, prefix: str, tools: list[Tool]) -> Iterator[SpecIssue]:
    """Names every provider accepts, once each; argvs without spliced arguments; schemas."""
    seen: set[str] = set()
    for number, tool in enumerate(tools):
        field = f"{prefix}tools[{number}]"
        if not re.match(TOOL_NAME_PATTERN, tool.name):
            yield SpecIssue(
                where,
                f"{field}.name",
                f"{tool.name!r} is not a valid tool name: use 1 to 64 "
                "letters, digits, `_` and `-` (the rule every provider applies)",
            )
        elif tool.name in seen:
            yield SpecIssue(
                where,
                f"{field}.name",
                f"`{tool.name}` names more than one tool of this step: "
                "give each tool a unique name",
            )
        seen.add(tool.name)
        if isinstance(tool, CommandTool):
            yield from _command_tool_issues(where, field, tool)
        elif isinstance(tool, McpTool):
            yield from _mcp_tool_issues(where, field, tool)
        else:
            yield from _spec_tool_issues(where, field, tool)


def _parameters_issue(parameters: dict[str, Any]) -> str | None:
    if parameters.get("type") != "object":
        return "must be a JSON Schema object: set `type: object` and list `properties`"
    if not isinstance(parameters.get("properties", {}), Mapping):
        return "`properties` must map each argument name to its JSON Schema"
    # Imported here: only specs with tools need it, and older runs re-run
    # these rules inside the workflow sandbox on replay.
    import jsonschema.exceptions
    import jsonschema.validators

    try:
        jsonschema.validators.validator_for(parameters).check_schema(parameters)
    except jsonschema.exceptions.SchemaError as error:
        return f"is not a valid JSON Schema ({error.message}); fix the schema"
    return None


def _command_tool_issues(where: str, field: str, tool: CommandTool) -> Iterator[SpecIssue]:
    problem = _parameters_issue(tool.parameters)
    if problem is not None:
        yield SpecIssue(where, f"{field}.parameters", problem)
    properties = tool.parameters.get("properties")
    declared = set(properties) if isinstance(properties, Mapping) else set()
    for position, element in enumerate(tool.argv):
        name = argv_placeholder(element)
        at = f"{field}.argv[{position}]"
        if name is None:
            if "{{" in element or "}}" in element:
                yield SpecIssue(
                    where,
                    at,
                    f"{element!r} puts a placeholder inside a longer string: an "
                    "argument fills a whole argv element, never part of one; write "
                    '`{{args.<name>}}` as an element of its own (e.g. `["--file", '
                    '"{{args.path}}"]`)',
                )
        elif position == 0:
            yield SpecIssue(
                where,
                at,
                "the program cannot come from the model's arguments: name the "
                "executable itself as argv[0]",
            )
        elif name not in declared:
            yield SpecIssue(
                where,
                at,
                f"`{{{{args.{name}}}}}` names no argument of the tool: add "
                f"`{name}` under `parameters.properties`, or fix the name",
            )
    for key in ("cwd",):
        value = getattr(tool, key)
        if value and "{{" in value:
            yield SpecIssue(where, f"{field}.{key}", "a tool's cwd takes no placeholders")
    for key, value in tool.env.items():
        if "{{" in value:
            yield SpecIssue(
                where,
                f"{field}.env.{key}",
                "a tool's env takes no placeholders: pass the argument as an argv element",
            )


def _mcp_tool_issues(where: str, field: str, tool: McpTool) -> Iterator[SpecIssue]:
    if (tool.command is None) == (tool.url is None):
        yield SpecIssue(
            where,
            field,
            "an mcp tool needs exactly one of `command` (a stdio server) and "
            "`url` (a streamable HTTP server)",
        )
    for position, element in enumerate(tool.command or []):
        if "{{" in element:
            yield SpecIssue(
                where,
                f"{field}.command[{position}]",
                "an MCP server's command takes no placeholders: write the argv as it runs",
            )
    if tool.url is not None and not re.match(r"^https?://[^\s/]+", tool.url):
        yield SpecIssue(
            where,
            f"{field}.url",
            f"{tool.url!r} is not an http(s) URL: use e.g. http://127.0.0.1:8000/mcp",
        )
    if tool.url is not None and (tool.env or tool.cwd):
        yield SpecIssue(
            where,
            f"{field}.env",
            "`env` and `cwd` apply to a stdio server only: remove them or use `command`",
        )
    for key, names in (("include", tool.include or []), ("exclude", tool.exclude)):
        for position, name in enumerate(names):
            if not re.match(TOOL_NAME_PATTERN, name):
                yield SpecIssue(
                    where,
                    f"{field}.{key}[{position}]",
                    f"{name!r} is not a valid tool name: use 1 to 64 letters, digits, `_` and `-`",
                )
    both = sorted(set(tool.include or []) & set(tool.exclude))
    if both:
        yield SpecIssue(
            where,
            f"{field}.exclude",
            f"{', '.join(both)} is in both `include` and `exclude`: keep it in one of them",
        )


def _spec_tool_issues(where: str, field: str, tool: SpecTool) -> Iterator[SpecIssue]:
    problem = _parameters_issue(tool.parameters)
    if problem is not None:
        yield SpecIssue(where, f"{field}.parameters", problem)
    if isinstance(tool.spec, str):
        if not tool.spec.strip():
            yield SpecIssue(
                where, f"{field}.spec", "give the child spec's file path or the spec itself"
            )
        return
    for issue in find_issues(tool.spec):
        yield SpecIssue(where, f"{field}.spec", f"the child spec: {issue}")


def _templated_fields(step: BaseModel) -> Iterator[tuple[str, str]]:
    """Every (field, text) of a step that templates are rendered into."""
    if isinstance(step, LlmStep):
        for name in ("system", "prompt"):
            value = getattr(step, name)
            if value:
                yield name, value
        for number, message in enumerate(step.messages or []):
            content = message.get("content", "")
            if isinstance(content, str):
                yield f"messages.{number}.content", content
                continue
            for index, piece in enumerate(content):
                if isinstance(piece, TextPart):
                    yield f"messages[{number}].content[{index}].text", piece.text
        if step.best_of is not None and step.best_of.judge and step.best_of.judge.prompt:
            yield "best_of.judge.prompt", step.best_of.judge.prompt
    elif isinstance(step, PtyStep):
        for number, part in enumerate(step.command):
            yield f"command.{number}", part
        if step.cwd:
            yield "cwd", step.cwd
        if step.stdin:
            yield "stdin", step.stdin
        for key, value in step.env.items():
            yield f"env.{key}", value
    elif isinstance(step, ApprovalStep | DecomposeStep | AgentStep):
        if step.prompt:
            yield "prompt", step.prompt
        if isinstance(step, DecomposeStep) and step.system:
            yield "system", step.system


def _graph_issues(
    steps: Mapping[str, BaseModel],
    ids: list[str],
    inputs: Mapping[str, Any],
    output: object,
) -> Iterator[SpecIssue]:
    known = set(ids)
    needs: dict[str, list[str]] = {}
    for step_id, step in steps.items():
        declared = list(getattr(step, "needs", []))
        for number, need in enumerate(declared):
            if need == step_id:
                yield SpecIssue(step_id, f"needs.{number}", "a step cannot need itself")
            elif need not in known:
                yield SpecIssue(
                    step_id,
                    f"needs.{number}",
                    f"unknown step {need!r}: use one of {', '.join(sorted(known)) or '(none)'}",
                )
        needs[step_id] = [need for need in declared if need in known and need != step_id]
    cycle = find_cycle(needs)
    if cycle:
        yield SpecIssue(
            cycle[0],
            "needs",
            f"cycle {' -> '.join([*cycle, cycle[0]])}: remove one of these `needs`",
        )
        return
    ancestors = {step_id: ancestors_of(step_id, needs) for step_id in needs}
    planners = {i for i, step in steps.items() if isinstance(step, DecomposeStep)}
    for step_id, step in steps.items():
        # A step after a decompose step may read ids that only its plan will
        # create, so an unknown id there is accepted (`open`), never elsewhere.
        scope = _Scope(ancestors[step_id], known, planners, bool(ancestors[step_id] & planners))
        for field, text in _templated_fields(step):
            yield from _reference_issues(step_id, field, text, scope, inputs)
    if isinstance(output, str):
        scope = _Scope(known, known, planners, bool(planners))
        yield from _reference_issues(SPEC_LOCATION, "output", output, scope, inputs)


@dataclass(frozen=True)
class _Scope:
    """What one template may read: its ancestors, all ids, decompose steps."""

    reachable: set[str]
    known: set[str]
    planners: set[str]
    open: bool


def _reference_issues(
    where: str,
    field: str,
    text: str,
    scope: _Scope,
    inputs: Mapping[str, Any],
) -> Iterator[SpecIssue]:
    reachable, known = scope.reachable, scope.known
    for ref in references(text):
        if ref.kind == "invalid":
            yield SpecIssue(
                where,
                field,
                f"unknown template {ref.raw}: use {{{{inputs.NAME}}}}, {{{{steps.ID.output}}}}, "
                f'{{{{steps.ID.children}}}} or {{{{join(steps.PREFIX*, "SEP")}}}}',
            )
        elif ref.kind == "children" and ref.name not in known and scope.open:
            continue  # a decompose step of a plan
        elif ref.kind == "children" and ref.name not in scope.planners:
            yield SpecIssue(
                where,
                field,
                f"{ref.raw} reads the sub-steps of {ref.name!r}, which is not a decompose step",
            )
        elif ref.kind == "join":
            if not scope.open and not any(i.startswith(ref.name) for i in reachable):
                yield SpecIssue(
                    where,
                    field,
                    f"{ref.raw} matches none of this step's `needs` (directly or "
                    f"transitively): add a step whose id starts with {ref.name!r} to `needs`",
                )
        elif ref.kind == "step" and ref.name not in known and scope.open:
            continue  # may be created by a plan this step waits for
        elif ref.kind == "input" and ref.name not in inputs:
            yield SpecIssue(
                where,
                field,
                f"{ref.raw} reads input {ref.name!r}, which `inputs` does not define: "
                f"add it to `inputs` or pass --input {ref.name}=...",
            )
        elif ref.kind in ("step", "children") and ref.name not in known:
            yield SpecIssue(where, field, f"{ref.raw} reads unknown step {ref.name!r}")
        elif ref.kind in ("step", "children") and ref.name not in reachable:
            yield SpecIssue(
                where,
                field,
                f"{ref.raw} reads step {ref.name!r}, which is not among this step's `needs` "
                f"(directly or transitively): add {ref.name!r} to `needs`",
            )


def find_cycle(needs: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A list of step ids forming a cycle, in dependency order, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in needs.get(node, ()):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in needs:
        if node not in state and (found := visit(node)):
            return list(reversed(found))
    return None


def ancestors_of(step_id: str, needs: Mapping[str, Iterable[str]]) -> set[str]:
    seen: set[str] = set()
    stack = list(needs.get(step_id, ()))
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(needs.get(node, ()))
    return seen


def _secret_issues(node: object, where: str, path: str) -> Iterator[SpecIssue]:
    if isinstance(node, Mapping):
        if path == "" and isinstance(node.get("steps"), list):
            for key, value in node.items():
                if key != "steps":
                    yield from _secret_field(key, value, where, key)
            for index, step in enumerate(node["steps"]):
                step_id = step.get("id") if isinstance(step, Mapping) else None
                step_where = step_id if isinstance(step_id, str) else f"#{index + 1}"
                yield from _secret_issues(step, step_where, "")
            return
        for key, value in node.items():
            if path.endswith(".file") and key in ("ref", "sha256"):
                # A stored file's digest and store reference: random-looking
                # by nature, written by the client, never a credential.
                continue
            yield from _secret_field(str(key), value, where, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _secret_issues(item, where, f"{path}.{index}")
    elif isinstance(node, str) and looks_like_secret(node):
        yield SpecIssue(
            where,
            path or "(value)",
            "looks like a credential: specs are stored in workflow history in clear; "
            "set provider keys on the worker (e.g. OPENAI_API_KEY) instead",
        )


def _secret_field(key: str, value: object, where: str, path: str) -> Iterator[SpecIssue]:
    last = key.rsplit(".", 1)[-1]
    if is_secret_field(last) and last not in _TEXT_FIELDS:
        yield SpecIssue(
            where,
            path,
            "secret-looking field: a spec never carries secrets (it is stored in history); "
            "set keys on the worker: "
            + ", ".join(spec.key_variables[0] for spec in PROVIDER_SPECS),
        )
        return
    yield from _secret_issues(value, where, path)
