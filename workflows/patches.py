"""The ``workflow.patched()`` ids of ``MixerWorkflow``.

Each marks a change in which commands a run issues, so histories recorded
before it still replay. Never rename or reuse one, and never move the point
where one is decided.

A run recorded with CHECKS_RECORDED_PATCH (every run started since) calls no
other patch: every change below is on for it, and any later change must be
decided in ``MixerWorkflow.__init__`` too. A patch called later could follow
a local activity, and replay may resolve a local activity one workflow task
earlier than the run did (when a query arrived meanwhile), before the marker
that task wrote is known: the patch would then read as absent and the replay
fail.
"""

from __future__ import annotations

# Agent steps wait while their budget is spent (steps/agent.py).
AGENT_BUDGET_GATE_PATCH = "agent-steps-budget-gated"
# A run checks its spec once, in a local activity at its start, and each plan
# in an activity: history records every verdict, so a replay never re-runs
# rules that a release tightened; __init__ then reads only the spec's shape.
# Histories recorded before keep validating in the workflow.
CHECKS_RECORDED_PATCH = "checks-recorded"
# Histories recorded before CHECKS_RECORDED_PATCH check plans in the workflow;
# from their first plan check after this marker on, plans there may not set
# the fields `allow_fields` guards either (steps/decompose.py).
PLAN_FIELDS_PATCH = "plans-refuse-unlisted-fields"
# An unexpected error while running a step fails that step (its on_failure
# applies) instead of ending its task and leaving it `running` for ever
# (steps/runner.py).
STEP_ERRORS_PATCH = "step-errors-fail-the-step"
# Runs write memo entries a later re-run and the audit read from history:
# an approval a person gave, and a step that took a source run's output
# (workflows/reuse.py). Decided in __init__ like every patch after
# CHECKS_RECORDED_PATCH.
REUSE_MARKERS_PATCH = "reuse-markers-in-memo"
# An llm step with `tools` runs its tool loop: model turns, tool calls
# (activities and child workflows) and approvals. Decided in
# MixerWorkflow.__init__; runs recorded before asked such a step once,
# without tools, and their replays do the same.
TOOL_LOOP_PATCH = "llm-tool-loop"
# Search attributes are upserted when the run's state (running, waiting,
# ended) or its set of waiting steps changes, and before it continues as new;
# cost, tokens and providers ride along, and change alone only once the last
# upsert is SEARCH_REFRESH old (workflows/search.py). Runs recorded before
# upserted at every change of any attribute, one history event per step.
# Decided in MixerWorkflow.__init__.
SEARCH_ON_STATE_PATCH = "search-attributes-on-state-changes"
# Every change above, and the ones of this release, in one marker: a run
# recorded with it has all of them on and asks for no other patch. Each
# `workflow.patched()` a new run calls costs it two history events (the
# marker and the SDK's TemporalChangeVersion search attribute), so a run
# asked five of them at its start. Histories recorded before it ask the
# older patches one by one, in their order, exactly as they did. From it on:
# a run that only waits for people, on a history long enough that waking it
# would replay much of it, continues as new first (carry.py,
# WAITING_HANDOVER_EVENTS). The next change gets its own patch, decided in
# MixerWorkflow.__init__ after this one, until the next release folds it in.
RELEASE_2026_11_PATCH = "release-2026-11"
