"""What a run reads from, and writes to, Temporal's search attributes.

The functions here are pure: ``MixerWorkflow`` calls them with what
``workflow.info()`` recorded at the run's start and with its own state, which
replay rebuilds unchanged, so they are deterministic. ``RunSearch`` is the
workflow's side of them: it asks once which attributes the namespace has (a
local activity, so history holds the answer) and upserts them when the run's
state changes, never on streamed text.

Each upsert is a history event and a visibility write, so a run upserts when
what ops teams filter on changes: its state (running, waiting, ended) or its
waiting steps, and before it continues as new. Cost, tokens and providers ride
along with those; their own changes (after every step) are written only once
the last upsert is ``SEARCH_REFRESH`` old (``upsert_due``). Runs recorded
before ``SEARCH_ON_STATE_PATCH`` upserted at every change of any attribute.

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

# How stale a running run's cost, tokens and providers may get while steps
# keep finishing: a run of many short steps then writes about one upsert a
# minute instead of one per step, and a long, expensive run still turns up
# in `LlmmixerCostUsd > 5` within a minute of a step that crossed it.
# Replay depends on it (it decides which upserts a run issues): changing it
# needs a new workflow.patched() id.
SEARCH_REFRESH = timedelta(seconds=60)

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


def upsert_due(
    last: RunAttributes | None,
    last_at: datetime | None,
    now: RunAttributes,
    at: datetime,
    *,
    flush: bool = False,
) -> bool:
    """Whether a run whose search attributes say ``last`` (written at ``last_at``) upserts ``now``.

    Yes at the first upsert, when the state, the waiting steps, the spec or
    the fork changed, and (``flush``) before the run continues as new. Cost,
    tokens and providers alone: only once ``last_at`` is ``SEARCH_REFRESH`` old.
    """
    if last is None:
        return True
    if now == last:
        return False
    if flush or (now.state, now.waiting, now.spec, now.fork_of) != (
        last.state,
        last.waiting,
        last.spec,
        last.fork_of,
    ):
        return True
    return last_at is None or at - last_at >= SEARCH_REFRESH


def attributes_at_start(
    attributes: TypedSearchAttributes, registered: frozenset[str]
) -> RunAttributes | None:
    """What the run carries from its start event (a continuation inherits its parent's).

    None unless it carries every registered one a first upsert sets: then
    the run writes them all itself, as it always did.
    """
    values = {key.name: value for key, value in attributes}
    if not {names.SPEC, names.STATE, names.COST_USD, names.TOKENS} & registered <= values.keys():
        return None
    return RunAttributes(
        spec=str(values.get(names.SPEC, "")),
        state=str(values.get(names.STATE, "")),
        waiting=tuple(values.get(names.WAITING_STEPS, ())),
        providers=tuple(values.get(names.PROVIDERS, ())),
        cost_usd=float(values.get(names.COST_USD, 0.0)),
        tokens=int(values.get(names.TOKENS, 0)),
        fork_of=str(values.get(names.FORK_OF, "")),
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

    def __init__(self, enabled: bool, on_state_changes: bool = False) -> None:
        self.enabled = enabled
        # SEARCH_ON_STATE_PATCH: upsert by upsert_due, not at every change.
        self.on_state_changes = on_state_changes
        self.registered: frozenset[str] = frozenset()
        # What the run's search attributes say: the last values upserted.
        self.last: RunAttributes | None = None
        self.last_at: datetime | None = None

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
        if self.on_state_changes:
            # A continuation starts with what its parent upserted last: only
            # what changed since is written again.
            self.last = attributes_at_start(
                workflow.info().typed_search_attributes, self.registered
            )
            self.last_at = workflow.now() if self.last is not None else None

    def update(self, state: RunState, fork_of: str = "") -> None:
        """Upsert what changed since the last upsert, if it is due; a no-op when nothing did."""
        self._upsert(state, fork_of, flush=False)

    def before_continue_as_new(self, state: RunState, fork_of: str = "") -> None:
        """Write what changed, so the next run starts with current values.

        Runs recorded before SEARCH_ON_STATE_PATCH issued no upsert here.
        """
        if self.on_state_changes:
            self._upsert(state, fork_of, flush=True)

    def _upsert(self, state: RunState, fork_of: str, *, flush: bool) -> None:
        if not self.registered:
            return
        after = run_attributes(state, fork_of)
        if self.on_state_changes:
            at = workflow.now()
            if not upsert_due(self.last, self.last_at, after, at, flush=flush):
                return
            self.last_at = at
        updates = attribute_updates(self.last, after, self.registered)
        self.last = after
        if updates:
            workflow.upsert_search_attributes(updates)
