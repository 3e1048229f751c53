"""Re-running a closed run: which steps may take a source run's output unchanged.

A step is reused when the call it would make now is the call the source run
made: the same activity input (kind, provider, model, parameters, rendered
prompt and messages, tools, command argv/env/cwd) apart from the run it
belongs to. ``call_hash`` is that comparison, as a digest the step's record
keeps and ``llmmixer rerun`` computes from the source run's history. A step
whose upstream output changed renders a different prompt, so its hash
differs and it runs again without any rule saying so.

Pure: the workflow calls it inside the sandbox, the client outside it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

from pydantic import BaseModel

from llmmixer.workflows.records import ReusedStep, ReuseTable

__all__ = ["call_hash", "downstream", "reused_output"]

# What differs between two runs making the same call: never part of the hash.
# A hedged call carries a signal name drawn per call.
_PER_RUN_FIELDS = frozenset({"workflow_id", "hedge"})


def call_hash(call: BaseModel) -> str:
    """``sha256:<hex>`` of an activity input, without the fields that name its run."""
    body = call.model_dump(mode="json", exclude=set(_PER_RUN_FIELDS))
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


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
