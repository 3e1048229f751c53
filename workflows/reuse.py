"""Re-running a closed run: which steps may take a source run's output unchanged.

A step is reused when the call it would make now is the call the source run
made: its *effective call*, compared by ``sha256`` digest. Per kind:

- ``llm``: every call of its target chain (the primary, then each fallback,
  as the workflow would send them), so a step that a fallback answered is
  reused as long as the whole chain is unchanged, whichever target answered.
- ``llm`` with ``best_of``: every candidate's call, and the judge's call
  without the candidates (its target and instruction; the candidates'
  answers follow from the rest).
- ``decompose``: the planner's first call (the task, the limits, the ids
  taken). A reused decompose step re-adds the plan it accepted, so the
  planned steps can be reused in turn.
- ``pty`` and ``agent``: the command (argv, env, cwd, stdin...).
- ``approval``: the question as rendered, the gate's settings, the run's
  inputs and every upstream output. Only a gate a person approved is reused
  (never a rejected one, nor one approved by its ``default`` after
  ``timeout_s``); the re-run records who approved it.

Fields that name the run (``workflow_id``) are never part of a digest. A
step whose upstream output changed renders a different call, so its digest
differs and it runs again without any rule saying so.

Pure: the workflow calls it inside the sandbox, the client outside it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from llmmixer.core.contracts import ChatMessage, LlmCall, PlanRequest
from llmmixer.core.spec import ApprovalStep, DecomposeStep, FallbackTarget, LlmStep, Spec
from llmmixer.workflows.calls import llm_call, target_chain
from llmmixer.workflows.records import ReusedStep, ReuseTable

__all__ = [
    "APPROVED_MEMO",
    "DEFAULT_JUDGE_INSTRUCTION",
    "REUSED_MEMO",
    "approval_hash",
    "best_of_hash",
    "best_of_targets",
    "call_hash",
    "calls_hash",
    "chain_hash",
    "downstream",
    "judge_target",
    "planner_call",
    "planner_hash",
    "reused_output",
]

# What differs between two runs making the same call: never part of the hash.
# A hedged call carries a signal name drawn per call.
_PER_RUN_FIELDS = frozenset({"workflow_id", "hedge"})

# Memo keys a run writes (behind ``patches.REUSE_MARKERS_PATCH``) so that a
# later re-run, and the audit of a run that never returned a result, can read
# from history what no activity shows: "<prefix><step id>".
APPROVED_MEMO = "llmmixer.approved."
REUSED_MEMO = "llmmixer.reused."

DEFAULT_JUDGE_INSTRUCTION = (
    "Several answers to the same task follow. Pick the best one, or merge the best "
    "parts of them into one answer. Reply with the final answer only."
)


def _body(call: BaseModel) -> Any:
    return call.model_dump(mode="json", exclude=set(_PER_RUN_FIELDS))


def _digest(body: Any) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def call_hash(call: BaseModel) -> str:
    """``sha256:<hex>`` of an activity input, without the fields that name its run."""
    return _digest(_body(call))


def calls_hash(kind: str, calls: Sequence[BaseModel], **extra: Any) -> str:
    """The digest of a step that makes several calls (a chain, best_of candidates)."""
    return _digest({"kind": kind, "calls": [_body(call) for call in calls], **extra})


def chain_hash(spec: Spec, step: LlmStep, messages: list[ChatMessage], system: str | None) -> str:
    """An llm step's effective call: each target of its chain as it would be asked."""
    chain = target_chain(spec, step)
    calls = [
        llm_call(
            spec,
            step,
            target,
            messages,
            system,
            workflow_id="",
            has_fallback=index < len(chain) - 1,
        )
        for index, target in enumerate(chain)
    ]
    # The tools it may call (their commands, servers, env) and how many turns
    # it may take decide its answer as much as the prompt does.
    tools = [tool.model_dump(mode="json") for tool in spec.tools(step)]
    return calls_hash("llm", calls, tools=tools, max_turns=step.max_turns)


def best_of_targets(spec: Spec, step: LlmStep) -> list[FallbackTarget]:
    """Who each ``best_of`` candidate asks: ``targets`` in turn, else the step's own."""
    assert step.best_of is not None
    best = step.best_of
    own = target_chain(spec, step)
    return [
        FallbackTarget.model_validate(best.targets[i % len(best.targets)].model_dump())
        if best.targets
        else own[0]
        for i in range(best.n)
    ]


def judge_target(spec: Spec, step: LlmStep) -> FallbackTarget:
    assert step.best_of is not None
    judge = step.best_of.judge
    if judge is not None:
        return FallbackTarget(provider=judge.provider, model=judge.model)
    return target_chain(spec, step)[0]


def best_of_hash(
    spec: Spec,
    step: LlmStep,
    messages: list[ChatMessage],
    system: str | None,
    instruction: str,
) -> str:
    """A ``best_of`` step's effective call: its candidates, and its judge's instruction."""
    candidates = [
        llm_call(spec, step, target, messages, system, workflow_id="", has_fallback=False)
        for target in best_of_targets(spec, step)
    ]
    judge = llm_call(
        spec,
        step,
        judge_target(spec, step),
        [ChatMessage(role="user", content=instruction)],
        None,
        workflow_id="",
        has_fallback=False,
    )
    return calls_hash("best_of", [*candidates, judge])


def planner_hash(first: LlmCall) -> str:
    """A decompose step's effective call: its planner's first call (no feedback yet)."""
    return calls_hash("decompose", [first])


def planner_call(
    spec: Spec,
    step: DecomposeStep,
    prompt: str,
    system: str | None,
    plan: PlanRequest,
) -> LlmCall:
    """The planner's call as ``run_decompose`` first sends it."""
    return llm_call(
        spec,
        step,
        target_chain(spec, step)[0],
        [ChatMessage(role="user", content=prompt)],
        system,
        workflow_id="",
        has_fallback=False,
        plan=plan,
    )


def approval_hash(
    step: ApprovalStep, question: str, inputs: Mapping[str, Any], upstream: Mapping[str, str]
) -> str:
    """An approval gate's effective call: what the person was asked, and on what.

    ``upstream``: the output of every step the gate waits for, directly or
    not. A gate whose question names nothing upstream ("Deploy?") is still
    asked again when what it guards changed.
    """
    return _digest(
        {
            "kind": "approval",
            "question": question,
            "default": step.default,
            "timeout_s": step.timeout_s,
            "inputs": dict(inputs),
            "upstream": dict(upstream),
        }
    )


def reused_output(table: ReuseTable | None, step_id: str, digest: str) -> ReusedStep | None:
    """The source run's output for ``step_id`` when its call was exactly this one."""
    if table is None:
        return None
    entry = table.steps.get(step_id)
    if entry is None or entry.call_hash != digest:
        return None
    return entry


def downstream(needs: Mapping[str, Sequence[str]], roots: Sequence[str]) -> set[str]:
    """``roots`` and every step that needs one of them, directly or transitively."""
    found = set(roots)
    changed = True
    while changed:
        changed = False
        for step_id, wanted in needs.items():
            if step_id not in found and any(need in found for need in wanted):
                found.add(step_id)
                changed = True
    return found
