"""What a run reads from, and writes to, Temporal's search attributes.

The functions here are pure: ``MixerWorkflow`` calls them with what
``workflow.info()`` recorded at the run's start and with its own state, which
replay rebuilds unchanged, so they are deterministic. ``RunSearch`` is the
workflow's side of them: it asks once which attributes the namespace has (a
local activity, so history holds the answer) and upserts them when the run's
state changes, never on streamed text.

Runs set ``LlmmixerSpec``, ``LlmmixerState``, ``LlmmixerWaitingSteps``,
``LlmmixerProviders``, ``LlmmixerCostUsd``, ``LlmmixerTokens`` and
``LlmmixerForkOf`` (``core/search.py``), so ops teams can ask the Temporal
CLI or Web UI ``LlmmixerState="waiting"``.

A run started by a Temporal Schedule carries the time it was scheduled for in
the ``TemporalScheduledStartTime`` search attribute of its start event. A spec
that declares the input ``scheduled_time`` empty (``llmmixer schedule create``
declares it when the spec does not) gets that time there, as ISO 8601 in UTC,
so ``{{inputs.scheduled_time}}`` names the slot a nightly report covers even
when the run started late or was triggered by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import (
    RetryPolicy,
    SearchAttributeKey,
    SearchAttributeUpdate,
    TypedSearchAttributes,
)
from temporalio.exceptions import ActivityError

from llmmixer.core import search as names
from llmmixer.workflows.dag import RunState
from llmmixer.workflows.records import RunStatus, StepStatus

# workflow.patched() id, decided in MixerWorkflow.__init__: runs recorded
# before it neither ask for the attributes nor upsert them.
SEARCH_ATTRIBUTES_PATCH = "search-attributes"

SPEC = SearchAttributeKey.for_keyword(names.SPEC)
STATE = SearchAttributeKey.for_keyword(names.STATE)
WAITING_STEPS = SearchAttributeKey.for_keyword_list(names.WAITING_STEPS)
PROVIDERS = SearchAttributeKey.for_keyword_list(names.PROVIDERS)
COST_USD = SearchAttributeKey.for_float(names.COST_USD)
TOKENS = SearchAttributeKey.for_int(names.TOKENS)
FORK_OF = SearchAttributeKey.for_keyword(names.FORK_OF)

SCHEDULED_TIME_INPUT = "scheduled_time"
SCHEDULED_START = SearchAttributeKey.for_datetime("TemporalScheduledStartTime")


def iso_utc(moment: datetime) -> str:
    """``2026-11-30T09:00:00Z``: one spelling, whatever zone the SDK hands back."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def with_scheduled_time(spec: dict[str, Any], attributes: TypedSearchAttributes) -> dict[str, Any]:
    """``spec`` with an empty ``inputs.scheduled_time`` filled from a schedule's start time.

    Unchanged when the run was not started by a schedule, or the spec does not
    declare the input empty: a value the caller gave is never replaced.
    """
    scheduled = attributes.get(SCHEDULED_START)
    inputs = spec.get("inputs")
    if scheduled is None or not isinstance(inputs, dict) or inputs.get(SCHEDULED_TIME_INPUT) != "":
        return spec
    return {**spec, "inputs": {**inputs, SCHEDULED_TIME_INPUT: iso_utc(scheduled)}}


@dataclass(frozen=True)
class RunAttributes:
    """The values of llmmixer's search attributes for one moment of a run."""

    spec: str
    state: str
    waiting: tuple[str, ...]
    providers: tuple[str, ...]
    cost_usd: float
    tokens: int
    fork_of: str = ""


def run_attributes(state: RunState, fork_of: str = "") -> RunAttributes:
    """What the run's search attributes say now; ``state`` as ``progress`` reports it."""
    records = state.records
    waiting = tuple(i for i, r in records.items() if r.status == StepStatus.WAITING)
    status = state.status
    if status in (RunStatus.RUNNING, RunStatus.WAITING):
        status = RunStatus.WAITING if waiting else RunStatus.RUNNING
    providers = {r.provider for r in records.values() if r.provider}
    providers |= {c.provider for r in records.values() for c in r.candidates if c.provider}
    return RunAttributes(
        spec=state.name,
        state=status.value,
        waiting=waiting,
        providers=tuple(sorted(providers)),
        cost_usd=round(sum(r.cost_usd or 0.0 for r in records.values()), 6),
        tokens=sum(r.usage.input_tokens + r.usage.output_tokens for r in records.values()),
        fork_of=fork_of,
    )


def attribute_updates(
    before: RunAttributes | None, after: RunAttributes, registered: frozenset[str]
) -> list[SearchAttributeUpdate[Any]]:
    """The upserts that take the run from ``before`` to ``after``: changed values only.

    Only attributes the namespace has (``registered``) are set: an unknown one
    would fail the workflow task, and the run must go on without them.
    """
    pairs: list[tuple[SearchAttributeKey[Any], Any, Any]] = [
        (SPEC, before and before.spec, after.spec),
        (STATE, before and before.state, after.state),
        (WAITING_STEPS, before and before.waiting, after.waiting),
        (PROVIDERS, before and before.providers, after.providers),
        (COST_USD, before and before.cost_usd, after.cost_usd),
        (TOKENS, before and before.tokens, after.tokens),
        (FORK_OF, before and before.fork_of, after.fork_of),
    ]
    updates: list[SearchAttributeUpdate[Any]] = []
    for key, old, new in pairs:
        if key.name not in registered or (before is not None and old == new):
            continue
        if new in ("", ()):
            if before is not None:  # nothing to clear on a run's first upsert
                updates.append(key.value_unset())
            continue
        updates.append(key.value_set(list(new) if isinstance(new, tuple) else new))
    return updates


class RunSearch:
    """The workflow's search attributes: asked for once, upserted on changes of state."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.registered: frozenset[str] = frozenset()
        self.last: RunAttributes | None = None

    async def check(self) -> None:
        """Which of llmmixer's attributes the namespace has; none: the run goes on without."""
        if not self.enabled:
            return
        try:
            found = await workflow.execute_local_activity(
                names.SEARCH_ATTRIBUTES_ACTIVITY,
                result_type=list[str],
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=3),
                summary="which search attributes the namespace has",
            )
        except ActivityError as error:
            workflow.logger.warning(
                "search attributes unknown (%s): this run sets none", error.cause or error
            )
            return
        self.registered = frozenset(found) & frozenset(names.SEARCH_ATTRIBUTES)

    def update(self, state: RunState, fork_of: str = "") -> None:
        """Upsert what changed since the last call; a no-op when nothing did."""
        if not self.registered:
            return
        after = run_attributes(state, fork_of)
        updates = attribute_updates(self.last, after, self.registered)
        self.last = after
        if updates:
            workflow.upsert_search_attributes(updates)
