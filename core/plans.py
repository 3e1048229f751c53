"""Plans of ``decompose`` steps: what a planner may create, and whether its plan may run.

A plan is ``{"steps": [...]}`` in the spec's own step schema. It is checked
by the same validator as a whole spec (``find_issues``), run on a stand-in
spec made of the plan's steps plus the run's context (the spec's inputs,
defaults, routes, and the steps the decompose step waited for), and then by
the rules only plans have: ``max_steps``, the kinds the decompose step allows,
how deep plans may nest, the spec's ``allow`` list, and ids that must not
clash with the run's, and the fields that move a request or a command
(``base_url``, ``provider_options``, ``env``, ``cwd``, ``command``, ``args``),
which a plan sets only where the decompose step's ``allow_fields`` lists them.
Every problem is reported at once, worded for the planner, which gets them
back in its next prompt.

Pure and deterministic. Runs started by this version check plans in a local
activity (``activities/checks.py``), so the result is recorded in history and
a later change to these rules never changes what a replay decides;
``MixerWorkflow`` still calls ``check_plan`` itself in runs that older
versions recorded, which checked their plans in the workflow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmmixer.core.contracts import PROVIDERS, PlanRequest, PlanTarget
from llmmixer.core.documents import DocumentError, load_json_document, strip_code_fence
from llmmixer.core.providers import PROVIDER_SPECS
from llmmixer.core.spec import KINDS, PLAN_FIELDS, DecomposeStep, Spec
from llmmixer.core.validation import SPEC_LOCATION, SpecIssue, find_issues

__all__ = [
    "PLAN_LOCATION",
    "PlanContext",
    "PlanLimits",
    "check_plan",
    "limits_for",
    "plan_request",
    "planner_prompt",
]

PLAN_LOCATION = "plan"

# Only to describe "any model" to a planner and to the dry-run responder;
# a plan that names another model is just as valid.
_EXAMPLE_MODELS = {spec.name: spec.example_model for spec in PROVIDER_SPECS}


@dataclass(frozen=True)
class PlanLimits:
    """What one decompose step's plan may contain, after its parents' limits."""

    max_steps: int
    # Levels of planning left, counting this one: a plan may contain decompose
    # steps only while this is above 1.
    max_depth: int
    kinds: tuple[str, ...]
    # Of PLAN_FIELDS, those the plan's steps may set.
    fields: tuple[str, ...] = ()


def limits_for(step: DecomposeStep, parent: PlanLimits | None = None) -> PlanLimits:
    """``step``'s own limits, never looser than those of the plan that created it."""
    kinds = {"llm", *step.allow_kinds}
    fields = set(step.allow_fields)
    max_depth, max_steps = step.max_depth, step.max_steps
    if parent is not None:
        kinds &= set(parent.kinds)
        fields &= set(parent.fields)
        max_depth = max(1, min(max_depth, parent.max_depth - 1))
        max_steps = min(max_steps, parent.max_steps)
    return PlanLimits(
        max_steps,
        max_depth,
        tuple(kind for kind in KINDS if kind in kinds),
        tuple(field for field in PLAN_FIELDS if field in fields),
    )


@dataclass(frozen=True)
class PlanContext:
    """Where a plan lands: the decompose step, its limits and the run so far."""

    step_id: str
    limits: PlanLimits
    spec: Spec
    # Every id in the run (the plan's ids must be new).
    taken_ids: frozenset[str]
    # The steps the decompose step waited for: finished, so the plan's steps
    # may read their outputs and list them in `needs`.
    context_ids: tuple[str, ...] = ()


def check_plan(
    text: str, context: PlanContext, *, field_rule: bool = True
) -> tuple[list[dict[str, Any]], list[SpecIssue]]:
    """The plan's steps (``kind`` filled in), or every reason it cannot run.

    ``field_rule=False`` leaves out the ``allow_fields`` rule: only for runs
    recorded by a version without it, to replay the plans they accepted.
    """
    parsed, problem = _parse(text)
    if problem is not None:
        return [], [SpecIssue(PLAN_LOCATION, "(document)", problem)]
    assert parsed is not None
    issues = list(_plan_rules(parsed, context))
    if field_rule:
        for index, step in enumerate(parsed):
            issues.extend(_field_issues(_where(step, index), step, context))
    stand_in = _stand_in_spec(parsed, context)
    for issue in find_issues(stand_in):
        if issue.step == SPEC_LOCATION:
            issue = SpecIssue(PLAN_LOCATION, issue.field, issue.message)
        if issue not in issues:
            issues.append(issue)
    if issues:
        return [], issues
    return [{**step, "kind": step.get("kind", "llm")} for step in parsed], []


def _parse(text: str) -> tuple[list[dict[str, Any]] | None, str | None]:
    # The reply is the model's, so possibly an attacker's. The safe loader
    # bounds its size and depth: plain json.loads raises RecursionError on
    # deep nesting, failing the workflow task on every retry.
    try:
        value = load_json_document(strip_code_fence(text).strip(), source="the reply")
    except DocumentError as error:
        return None, str(error)
    if not isinstance(value, Mapping) or not isinstance(value.get("steps"), list):
        return None, 'reply with one JSON object: {"steps": [<step>, ...]}'
    steps = value["steps"]
    if not steps:
        return None, "the plan has no steps: give at least one"
    if not all(isinstance(step, Mapping) for step in steps):
        return None, "each entry of `steps` must be an object with `id`"
    extra = sorted(set(value) - {"steps"})
    if extra:
        return None, f"only `steps` belongs at the top of a plan; remove {', '.join(extra)}"
    return [dict(step) for step in steps], None


def _plan_rules(steps: Sequence[Mapping[str, Any]], context: PlanContext) -> Iterable[SpecIssue]:
    limits = context.limits
    if len(steps) > limits.max_steps:
        yield SpecIssue(
            PLAN_LOCATION,
            "steps",
            f"{len(steps)} steps is too many: this plan may have at most {limits.max_steps}",
        )
    for index, step in enumerate(steps):
        step_id = step.get("id")
        where = _where(step, index)
        if isinstance(step_id, str) and step_id in context.taken_ids:
            yield SpecIssue(
                where, "id", f"`{step_id}` is already a step of this run: choose another id"
            )
        kind = step.get("kind", "llm")
        if kind == "decompose" and "decompose" in limits.kinds and limits.max_depth <= 1:
            yield SpecIssue(
                where,
                "kind",
                "plans may not nest this deep (max_depth): do the work in llm steps instead",
            )
        elif isinstance(kind, str) and kind in KINDS and kind not in limits.kinds:
            yield SpecIssue(
                where,
                "kind",
                f"kind {kind!r} is not allowed in this plan: use {', '.join(limits.kinds)}",
            )
        yield from _allow_issues(where, step, context.spec)


def _where(step: Mapping[str, Any], index: int) -> str:
    step_id = step.get("id")
    return step_id if isinstance(step_id, str) else f"#{index + 1}"


def _field_issues(where: str, step: Mapping[str, Any], context: PlanContext) -> Iterable[SpecIssue]:
    """Fields that move a request or a command, unless ``allow_fields`` lists them.

    A plan is written by a model that may have read hostile text: a
    ``base_url`` (also inside ``provider_options``) would send the prompt, and
    the run's outputs in it, to another host; ``env``, ``cwd``, ``command`` and
    ``args`` decide what a command runs and where. Refused whatever the step's
    kind, so a field the kind does not have is named here too.
    """
    for path, field in _set_fields(step):
        if field in context.limits.fields:
            continue
        remedy = (
            f"leave it out of the plan, or add {field!r} to `allow_fields` of decompose "
            f"step {context.step_id!r} in the spec"
        )
        if field == "command" and step.get("kind") == "pty":
            message = (
                "a pty step runs `command`, which this plan may not set unless decompose step "
                f"{context.step_id!r} lists 'command' in `allow_fields` (`allow_kinds: [pty]` "
                "alone is not enough): add 'command' to its `allow_fields` in the spec"
            )
        else:
            message = (
                f"plans may not set `{field}` unless decompose step {context.step_id!r} lists "
                f"it in `allow_fields`: {remedy}"
            )
        yield SpecIssue(where, path, message)


def _set_fields(step: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    """(path, field of PLAN_FIELDS) for each one the step sets to something."""
    for field in PLAN_FIELDS:
        if _is_set(step.get(field)):
            yield field, field
    for number, target in enumerate(_list(step.get("fallback"))):
        if _is_set(target.get("base_url")):
            yield f"fallback.{number}.base_url", "base_url"
    best_of = step.get("best_of")
    if isinstance(best_of, Mapping):
        for number, target in enumerate(_list(best_of.get("targets"))):
            if _is_set(target.get("base_url")):
                yield f"best_of.targets.{number}.base_url", "base_url"


def _is_set(value: object) -> bool:
    # `null`, "" and empty collections change nothing the step does.
    return value is not None and value != "" and value != [] and value != {}


def _allow_issues(where: str, step: Mapping[str, Any], spec: Spec) -> Iterable[SpecIssue]:
    """Providers and models named in the plan must be on the spec's `allow` list."""
    if spec.allow is None:
        return
    named: list[tuple[str, Any, Any]] = []
    if "provider" in step or "model" in step:
        named.append(
            (
                "provider",
                step.get("provider", spec.defaults.provider),
                step.get("model", spec.defaults.model),
            )
        )
    for number, target in enumerate(_list(step.get("fallback"))):
        named.append((f"fallback.{number}", target.get("provider"), target.get("model")))
    best_of = step.get("best_of")
    if isinstance(best_of, Mapping):
        for number, target in enumerate(_list(best_of.get("targets"))):
            named.append((f"best_of.targets.{number}", target.get("provider"), target.get("model")))
        judge = best_of.get("judge")
        if isinstance(judge, Mapping):
            named.append(("best_of.judge", judge.get("provider"), judge.get("model")))
    for field, provider, model in named:
        if not any(
            rule.provider == provider and rule.model in (None, model) for rule in spec.allow
        ):
            yield SpecIssue(
                where,
                field,
                f"{provider}/{model} is not allowed by this spec: use {_describe_allowed(spec)}",
            )


def _list(value: object) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _stand_in_spec(steps: Sequence[Mapping[str, Any]], context: PlanContext) -> dict[str, Any]:
    """The plan as a spec: its steps after stand-ins for the steps it may read."""
    spec = context.spec
    ancestors = [i for i in context.context_ids if i != context.step_id]
    stand_ins: list[dict[str, Any]] = [{"id": step_id, "kind": "approval"} for step_id in ancestors]
    stand_ins.append({"id": context.step_id, "kind": "approval", "needs": ancestors})
    plan_steps = []
    for step in steps:
        needs = step.get("needs", [])
        if isinstance(needs, list) and context.step_id not in needs:
            # Appended, so the plan's own `needs.N` positions stay as it wrote them.
            step = {**step, "needs": [*needs, context.step_id]}
        plan_steps.append(step)
    return {
        "name": spec.name,
        "inputs": dict(spec.inputs),
        "defaults": spec.defaults.model_dump(mode="json", exclude_none=True),
        "routes": {
            role: [target.model_dump(mode="json", exclude_none=True) for target in targets]
            for role, targets in spec.routes.items()
        },
        "steps": [*stand_ins, *plan_steps],
    }


# ---- what the planner is told ------------------------------------------------


def plan_request(context: PlanContext) -> PlanRequest:
    """The limits as data, on the planner's ``LlmCall`` (read by the dry-run responder)."""
    return PlanRequest(
        max_steps=context.limits.max_steps,
        kinds=[
            kind
            for kind in context.limits.kinds
            if kind != "decompose" or context.limits.max_depth > 1
        ],
        targets=_allowed_targets(context.spec),
        roles=sorted(context.spec.routes),
        taken_ids=sorted(context.taken_ids),
        id_prefix=f"{context.step_id}-",
        fields=list(context.limits.fields),
    )


def _allowed_targets(spec: Spec) -> list[PlanTarget]:
    if spec.allow is None:
        return [PlanTarget(provider=p, model=m) for p, m in _EXAMPLE_MODELS.items()]
    return [
        PlanTarget(provider=rule.provider, model=rule.model or _EXAMPLE_MODELS[rule.provider])
        for rule in spec.allow
        if rule.provider in PROVIDERS
    ]


def _describe_allowed(spec: Spec) -> str:
    if spec.allow is None:
        return f"any model of {', '.join(PROVIDERS)}"
    return ", ".join(
        f"{rule.provider}/{rule.model}" if rule.model else f"{rule.provider} (any model)"
        for rule in spec.allow
    )


def planner_prompt(task: str, context: PlanContext, feedback: str | None = None) -> str:
    """The planner's prompt: the task, the schema and limits, and last time's problems."""
    request = plan_request(context)
    lines = [
        task.strip(),
        "",
        "---",
        "Plan this work as steps that other models will carry out. Reply with JSON only, "
        'one object: {"steps": [<step>, ...]}.',
        f"At most {request.max_steps} steps. Steps without `needs` run in parallel.",
        "An llm step:",
        '  {"id": "<unique: lowercase letters, digits, _ and ->", "kind": "llm", '
        '"prompt": "<the whole instruction for this step>", "needs": ["<ids it waits for>"], '
        '"system": "<optional>"}',
    ]
    if request.roles:
        lines.append(
            'Give each llm step a "role" (one of: '
            + ", ".join(request.roles)
            + ") and no provider or model; the spec decides which model plays each role."
        )
        lines.append(
            f"Or name a provider and model directly, only from: {_describe_allowed(context.spec)}."
        )
    else:
        lines.append(
            'Optionally name "provider" and "model": ' + _describe_allowed(context.spec) + "."
        )
    extra = [kind for kind in request.kinds if kind != "llm"]
    if "approval" in extra:
        lines.append(
            'An approval step (a person decides): {"id": ..., "kind": "approval", "prompt": ...}'
        )
    if "decompose" in extra:
        lines.append(
            'A decompose step (plans further): {"id": ..., "kind": "decompose", "prompt": ..., '
            '"max_steps": N}'
        )
    for kind in ("pty", "agent"):
        if kind in extra:
            lines.append(f"Steps of kind {kind!r} are allowed too.")
    if "pty" in extra and "command" in request.fields:
        lines.append(
            'A pty step runs a command (no shell): {"id": ..., "kind": "pty", '
            '"command": ["<program>", "<argument>", ...]}'
        )
    refused = [field for field in PLAN_FIELDS if field not in request.fields]
    if refused:
        lines.append(
            "Do not set "
            + ", ".join(refused)
            + ": this plan may not"
            + (f" (it may set {', '.join(request.fields)})." if request.fields else ".")
        )
    else:
        lines.append("It may set " + ", ".join(request.fields) + ".")
    lines.append(
        "A step may read an earlier step's output with {{steps.ID.output}} only if it lists that "
        "step in `needs` (directly or through other steps)."
    )
    if context.spec.inputs:
        lines.append(
            "Inputs it may read with {{inputs.NAME}}: " + ", ".join(sorted(context.spec.inputs))
        )
    readable = [i for i in context.context_ids if i != context.step_id]
    if readable:
        lines.append("Finished steps it may read the same way: " + ", ".join(readable))
    lines.append(
        f"Name the steps {request.id_prefix}1, {request.id_prefix}2, ...; "
        "these ids are taken: " + ", ".join(request.taken_ids)
    )
    if feedback:
        lines += [
            "",
            "Your previous plan was refused:",
            feedback,
            "Fix every problem and reply with the whole plan again.",
        ]
    return "\n".join(lines)
