"""The request and response bodies of ``llmmixer serve``'s API (and so of its OpenAPI document).

Errors are always ``{"errors": ["..."]}``, each message saying what to do.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ERROR_RESPONSES",
    "Cancelling",
    "Errors",
    "InterventionBody",
    "RerunRequest",
    "RunList",
    "RunSummary",
    "ScheduleChanged",
    "ScheduleList",
    "SchedulePauseBody",
    "ScheduleSummary",
    "ScheduleTriggered",
    "SpecOfRun",
    "StartRequest",
    "Started",
]


class StartRequest(BaseModel):
    """``POST /workflows``."""

    model_config = ConfigDict(extra="forbid")

    spec: dict[str, Any] | str = Field(
        description="The spec as a JSON object, or as YAML/JSON text (never a file path)."
    )
    inputs: dict[str, Any] = Field(
        default_factory=dict,
        description="Values for {{inputs.*}}, merged over the spec's own. A file input "
        'carries its bytes: {"file": {"name": "a.png", "media_type": "image/png", '
        '"data": BASE64}} (typed by its content; a path is refused, never read).',
    )
    workflow_id: str | None = Field(default=None, description="Default: NAME-<random>.")
    dry_run: bool = Field(default=False, description="Answer every provider call offline.")


class RerunRequest(BaseModel):
    """``POST /workflows/{id}/rerun``: a closed run again, reusing unchanged steps."""

    model_config = ConfigDict(extra="forbid")

    from_steps: list[str] = Field(
        default_factory=list,
        description="These steps and everything after them run again whatever their calls are.",
    )
    spec: dict[str, Any] | str | None = Field(
        default=None,
        description="An edited spec (JSON object or YAML/JSON text); default: the run's own.",
    )
    inputs: dict[str, Any] = Field(
        default_factory=dict, description="Inputs to change; the source run's are kept otherwise."
    )
    workflow_id: str | None = Field(default=None, description="Default: NAME-<random>.")


class Started(BaseModel):
    workflow_id: str
    run_id: str | None
    progress_url: str
    events_url: str


class RunSummary(BaseModel):
    workflow_id: str
    run_id: str
    status: str = Field(
        description="running, waiting (for a person), completed, failed or cancelled"
    )
    spec: str | None = Field(default=None, description="the spec's name (LlmmixerSpec)")
    start_time: datetime | None
    close_time: datetime | None


class RunList(BaseModel):
    runs: list[RunSummary]


class ScheduleSummary(BaseModel):
    schedule_id: str
    spec: str = Field(description="the name of the spec it runs")
    cron: list[str]
    next_run: datetime | None = Field(description="when it next starts a run (UTC)")
    paused: bool
    note: str = Field(default="", description="why it was paused, if it was")


class ScheduleList(BaseModel):
    schedules: list[ScheduleSummary]


class ScheduleTriggered(BaseModel):
    schedule_id: str
    message: str


class SchedulePauseBody(BaseModel):
    """``POST /schedules/{id}/pause`` and ``/unpause``: the body may be ``{}``."""

    model_config = ConfigDict(extra="forbid")

    note: str | None = Field(
        default=None, max_length=1000, description="why (shown with the schedule)"
    )


class ScheduleChanged(BaseModel):
    """The schedule as it is after a pause or unpause."""

    schedule_id: str
    paused: bool
    note: str
    message: str


class SpecOfRun(BaseModel):
    workflow_id: str
    spec: dict[str, Any]


class InterventionBody(BaseModel):
    """The optional text of an intervention; which field applies depends on the action."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(default=None, description="retry: a new prompt for an LLM step")
    reason: str | None = Field(default=None, description="skip, reject: why")
    output: str | None = Field(default=None, description="override: the step's output (required)")
    comment: str | None = Field(default=None, description="approve: a comment")


class Cancelling(BaseModel):
    workflow_id: str
    message: str


class Errors(BaseModel):
    errors: list[str]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": Errors, "description": "missing or wrong bearer token"},
    404: {"model": Errors, "description": "no such run"},
}
