"""What a run reads from, and writes to, Temporal's search attributes.

Pure functions of their arguments: ``MixerWorkflow`` calls them with what
``workflow.info()`` recorded at the run's start, which replay reads back from
history unchanged, so they are deterministic.

A run started by a Temporal Schedule carries the time it was scheduled for in
the ``TemporalScheduledStartTime`` search attribute of its start event. A spec
that declares the input ``scheduled_time`` empty (``llmmixer schedule create``
declares it when the spec does not) gets that time there, as ISO 8601 in UTC,
so ``{{inputs.scheduled_time}}`` names the slot a nightly report covers even
when the run started late or was triggered by hand.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from temporalio.common import SearchAttributeKey, TypedSearchAttributes

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
