"""What a run reports: the ``progress`` query answer and the result, a public
interface (docs/interventions.md).

Plain JSON through the pydantic converter, so ``temporal workflow query`` and
``temporal workflow result`` read them without a codec. Fields are only ever
added (with defaults), so clients and runs in flight stay compatible.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field

from llmmixer.core.contracts import Usage


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"


DONE_STATES = frozenset({StepStatus.COMPLETED, StepStatus.SKIPPED})


class RunStatus(StrEnum):
    RUNNING = "running"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


InterventionType = Literal["retry", "skip", "override", "approve", "reject"]


class Intervention(BaseModel):
    """A person's action on a step, as recorded in the step's record."""

    type: InterventionType
    argument: dict[str, Any] = Field(default_factory=dict)
    time: datetime | None = None
    accepted: bool = True
    reason: str | None = None


class FallbackNote(BaseModel):
    """Why a step moved from one provider/model to the next in its chain."""

    provider: str
    model: str
    error: str
    error_type: str | None = None


class HedgeNote(BaseModel):
    """A hedged call: a call was slow to start, so another call raced it.

    One note per hedge started: ``number`` 1 is the first hedge (it raced the
    step's call, ``provider``/``model``), 2 the one started when the first
    hedge was slow too (``provider``/``model`` are then the first hedge's),
    and so on. ``winner`` is "primary" (the step's first call answered),
    "hedge" (this note's call did), "other_hedge" (another note's call did)
    or None (all failed). Each call that lost is charged on one note: this
    note's call when it lost, else the step's first call. ``loser_usage``/
    ``loser_cost_usd`` are that call's whole reply when it ended anyway,
    else its prompt (the winner's input tokens, priced for the loser's
    model; ``loser_estimated``), since a provider bills the prompt of a
    request it started. Output tokens a cancelled call streamed before the
    cancellation reached it are not known.
    """

    provider: str
    model: str
    hedge_provider: str
    hedge_model: str
    after_s: float
    reason: str
    winner: Literal["primary", "hedge", "other_hedge"] | None = None
    loser_usage: Usage = Field(default_factory=Usage)
    loser_cost_usd: float | None = 0.0
    loser_estimated: bool = False
    number: int = 1


class Candidate(BaseModel):
    """One ``best_of`` candidate: who answered what, or why it did not."""

    provider: str
    model: str
    output: str | None = None
    error: str | None = None
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float | None = 0.0


class ToolCallNote(BaseModel):
    """One tool call of an llm step's loop, as its record shows it."""

    id: str
    name: str
    # The model's arguments; cut (under "(cut)") when their JSON is long.
    arguments: dict[str, Any] = Field(default_factory=dict)
    # running, waiting (for a person's approval), completed, failed, rejected.
    status: Literal["running", "waiting", "completed", "failed", "rejected"] = "running"
    # How long the result sent back to the model is, in characters.
    result_chars: int | None = None
    is_error: bool = False
    duration_ms: float | None = None
    # `approve: true` tools: "approved" or "rejected", and the person's comment or reason.
    decision: str | None = None
    decision_note: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None


class ToolTurn(BaseModel):
    """One model turn of an llm step's tool loop and the calls it asked for."""

    number: int
    provider: str
    model: str
    usage: Usage = Field(default_factory=Usage)
    finish_reason: str | None = None
    # Length of the text the model wrote this turn (the final answer's on the last turn).
    text_chars: int = 0
    calls: list[ToolCallNote] = Field(default_factory=list)


class ToolApproval(BaseModel):
    """The tool call an llm step waits on: approve runs it, reject tells the model why."""

    turn: int
    call_id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class BudgetLimits(BaseModel):
    """A budget as it stands in a run (raised by the ``raise_budget`` update)."""

    max_tokens: int | None = None
    max_cost_usd: float | None = None


class BudgetRaise(BaseModel):
    """The argument of ``raise_budget``: new, higher limits.

    ``step`` names the decompose step whose budget to raise; empty means the
    spec's own ``budget``.
    """

    step: str = ""
    max_tokens: int | None = None
    max_cost_usd: float | None = None


class BudgetHold(BaseModel):
    """The spent budget that holds a waiting step: what ``raise_budget`` needs.

    ``step`` is the budget's scope as ``BudgetRaise`` takes it: empty for the
    spec's budget, else the decompose step whose budget it is.
    """

    step: str = ""
    limit: Literal["max_tokens", "max_cost_usd"]
    spent: float
    current: float

    def reason(self) -> str:
        where = f"the budget of {self.step}" if self.step else "the spec's budget"
        if self.limit == "max_tokens":
            spent = f"{int(self.spent)} tokens spent of max_tokens {int(self.current)}"
        else:
            spent = f"${self.spent:g} spent of max_cost_usd {self.current:g}"
        return (
            f"budget: {spent} ({where}); raise it with the raise_budget update, or skip this step"
        )


class StepRecord(BaseModel):
    kind: str = "llm"
    status: StepStatus = StepStatus.PENDING
    attempts: int = 0
    output: str | None = None
    error: str | None = None
    overridden: bool = False
    skipped_reason: str | None = None
    provider: str | None = None
    model: str | None = None
    usage: Usage = Field(default_factory=Usage)
    # None: the price of the model that answered is unknown (not free).
    cost_usd: float | None = 0.0
    latency_ms: float | None = None
    # LLM steps: why the (last) reply ended, as the provider says it, and
    # whether it stopped at the token limit and was accepted as it is.
    finish_reason: str | None = None
    truncated: bool = False
    started_at: datetime | None = None
    ended_at: datetime | None = None
    dry_run: bool = False
    fallbacks: list[FallbackNote] = Field(default_factory=list)
    interventions: list[Intervention] = Field(default_factory=list)
    waiting_reason: str | None = None
    # Set while a spent budget holds the step (waiting_reason says the same in words).
    budget_hold: BudgetHold | None = None
    # PTY steps: which mode ran (pty or pipe) and the exit code.
    mode: str | None = None
    exit_code: int | None = None
    # The prompt as rendered and sent (LLM, approval and decompose steps).
    prompt: str | None = None
    # The decompose step whose plan created this step (None: from the spec).
    parent: str | None = None
    # `best_of` steps: every candidate; the output is the judge's answer.
    candidates: list[Candidate] = Field(default_factory=list)
    # Set when `output` above was cut to keep the answer small: the whole
    # output's length (the whole text is in the run's history).
    output_chars: int | None = None
    # The digest of the call the step made (workflows/reuse.py), and, when it
    # took a source run's output instead of running: "<run>/<step>".
    call_hash: str | None = None
    reused_from: str | None = None
    # LLM steps with tools: every model turn of the loop and its tool calls,
    # and the call that waits for a person's approval (the step is waiting).
    turns: list[ToolTurn] = Field(default_factory=list)
    tool_approval: ToolApproval | None = None
    # Steps with `hedge`: each second call started, who won and why it started.
    hedges: list[HedgeNote] = Field(default_factory=list)


class TotalUsage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    # False when some step's model has no known price: the total is a lower bound.
    cost_complete: bool = True


class RunProgress(BaseModel):
    """The ``progress`` query answer, and the workflow's result."""

    name: str = ""
    status: RunStatus = RunStatus.RUNNING
    output: str | None = None
    steps: dict[str, StepRecord] = Field(default_factory=dict)
    usage: TotalUsage = Field(default_factory=TotalUsage)
    dry_run: bool = False
    error: str | None = None
    # Steps that wait for a person, and those running now: what `run` and
    # `status` need to say "nothing moves until you act".
    waiting: list[str] = Field(default_factory=list)
    running: list[str] = Field(default_factory=list)

    @property
    def needs_person(self) -> bool:
        return self.status == RunStatus.WAITING and not self.running


class ReusedStep(BaseModel):
    """A source run's output for one step, taken when the step's call is unchanged."""

    call_hash: str
    output: str
    source: str  # "<workflow id>/<step id>"
    # An approval gate: who approved it in the source run (the client's
    # identity on the signal or update), and when.
    approved_by: str | None = None
    approved_at: datetime | None = None


class ReuseTable(BaseModel):
    """What ``llmmixer rerun`` hands a new run: the source run and its reusable outputs.

    Steps at or after a ``--from`` step are left out by the client, so they run again.
    """

    source: str = ""  # the source run's workflow id (LlmmixerForkOf)
    steps: dict[str, ReusedStep] = Field(default_factory=dict)


class InterventionRequest(BaseModel):
    """The JSON argument of every signal and update (docs/interventions.md).

    Unknown fields are ignored rather than refused: a signal whose argument
    cannot be decoded would be dropped by the SDK without a trace, and a
    person's intent must at least be recorded.
    """

    step: str = ""
    prompt: str | None = None
    reason: str | None = None
    output: str | None = None
    comment: str | None = None


class InterventionOutcome(BaseModel):
    """What an update reports back: the step's state after the intervention."""

    step: str
    action: InterventionType
    status: StepStatus
    message: str


@dataclass(frozen=True)
class StepNode:
    """A step's place in the run's DAG."""

    id: str
    kind: str
    needs: tuple[str, ...]
    # Steps created by a decompose step's plan: that step, and the plan's JSON
    # of this step (steps from the spec are defined by the spec). Kept in the
    # node so a continue-as-new that carries ``nodes`` carries them too.
    parent: str | None = None
    definition: dict[str, Any] | None = None


class RunSnapshot(BaseModel):
    """Everything a run's state holds that is not in its spec, as plain JSON.

    For continue-as-new: ``RunState.restore(snapshot)`` rebuilds the state,
    steps added by plans and raised budgets included. A model like the
    others here, so it passes through the workflow sandbox with ``Carried``.
    """

    nodes: list[StepNode] = Field(default_factory=list)
    records: dict[str, StepRecord] = Field(default_factory=dict)
    budgets: dict[str, BudgetLimits] = Field(default_factory=dict)
