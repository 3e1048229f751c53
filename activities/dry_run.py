"""The offline responder behind ``--dry-run``: deterministic, free, labelled.

It lets a user check a DAG's wiring, templates and gates without a key or a
token spent. The same call always gets the same reply, so a dry run is
repeatable and its output can be asserted on.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from llmmixer.core.contracts import LlmCall, PlanRequest, Usage

DRY_RUN_LABEL = "[dry-run]"


def dry_run_reply(call: LlmCall) -> tuple[str, Usage]:
    """The reply text and an estimated usage for ``call``."""
    prompt = call.messages[-1].content if call.messages else ""
    digest = hashlib.sha256(
        json.dumps([call.system, [m.model_dump() for m in call.messages]]).encode()
    ).hexdigest()[:8]
    if call.plan is not None:
        text = json.dumps(_sample_plan(call.plan, prompt), indent=2)
    elif call.response_format == "json":
        text = json.dumps(_sample(call.json_schema) if call.json_schema else {"dry_run": True})
    else:
        first_line = " ".join(prompt.split())[:160]
        text = (
            f"{DRY_RUN_LABEL} {call.provider}/{call.model} answered step {call.step_id} "
            f"(#{digest}); prompt was: {first_line}"
        )
        files = [f.describe() for m in call.messages for f in m.attachments]
        if files:
            # What a real run would send; the bytes are not read for a dry run.
            text += f"; would attach {', '.join(files)}"
    usage = Usage(
        input_tokens=_estimate_tokens(
            (call.system or "") + "".join(m.content for m in call.messages)
        ),
        output_tokens=_estimate_tokens(text),
    )
    return text, usage


def _sample_plan(request: PlanRequest, prompt: str) -> dict[str, Any]:
    """A plan that passes validation: up to three parallel llm steps.

    They take the spec's roles in turn when it has routes, else the providers
    the spec allows, so a dry run shows the fan-out across several providers.
    They set none of the fields a plan may set only when allowed
    (``request.fields``: base_url, provider_options, env, cwd, command, args),
    so the plan passes whatever the decompose step's ``allow_fields`` says.
    """
    # The task is the prompt's first line, without template braces: a brace
    # pair copied into a sub-step's prompt would be read as a template.
    task = " ".join(prompt.split("\n---\n", 1)[0].split())[:120]
    task = task.replace("{{", "{ {").replace("}}", "} }")
    count = min(3, request.max_steps)
    taken = set(request.taken_ids)
    steps: list[dict[str, Any]] = []
    number = 0
    while len(steps) < count:
        number += 1
        step_id = f"{request.id_prefix}{number}"
        if step_id in taken:
            continue
        step: dict[str, Any] = {
            "id": step_id,
            "kind": "llm",
            "prompt": f"Part {len(steps) + 1} of {count}: {task}",
        }
        if request.roles:
            step["role"] = request.roles[len(steps) % len(request.roles)]
        elif request.targets:
            target = request.targets[len(steps) % len(request.targets)]
            step["provider"], step["model"] = target.provider, target.model
        steps.append(step)
    return {"steps": steps}


def _estimate_tokens(text: str) -> int:
    # About four characters a token for English text: good enough for a rehearsal.
    return max(1, len(text) // 4)


def _sample(schema: dict[str, Any]) -> Any:
    """A minimal value that satisfies a simple JSON schema."""
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: _sample(sub) for name, sub in properties.items()}
    if kind == "array":
        items = schema.get("items", {})
        return [_sample(items)] * max(1, int(schema.get("minItems", 1)))
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "dry-run"
