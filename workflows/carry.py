"""What a long run hands to its continuation (continue-as-new).

A run's history grows with every step, retry and intervention; past a
threshold ``MixerWorkflow`` continues as a new run of the same workflow id,
carrying this. Queries, updates, signals and the event stream follow the
workflow id, so readers and people see one run. Fields are only ever added,
with defaults, so a continuation started by an older worker still loads.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from llmmixer.workflows.records import Intervention, ReuseTable, RunSnapshot

# Temporal suggests continuing as new well before its hard limits; this
# bound also keeps replay of one run quick after a worker restart.
DEFAULT_HISTORY_EVENTS = 10_000
DEFAULT_HISTORY_BYTES = 32 * 1024 * 1024
# A run whose steps all wait for a person continues as new once its history
# has this many events (WAIT_HANDOVER_PATCH): waking it then replays the
# continuation's few events instead of every finished step (about 8 events a
# step). Below it, a replay is already quick and the run keeps one id chain.
WAITING_HANDOVER_EVENTS = 100
# How much of the event stream's newest events a continuation carries; the
# whole input must stay well below Temporal's 2 MB payload limit.
CARRIED_EVENT_BYTES = 1024 * 1024


class Carried(BaseModel):
    state: RunSnapshot = Field(default_factory=RunSnapshot)
    prompt_overrides: dict[str, str] = Field(default_factory=dict)
    # Decisions that arrived but were not yet acted on when the run handed over.
    decisions: dict[str, Intervention] = Field(default_factory=dict)
    continuations: int = 0
    # A re-run's source outputs (llmmixer rerun), carried to every continuation.
    reuse: ReuseTable | None = None
