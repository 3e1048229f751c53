"""The workflow spec (docs/spec.md) as pydantic models.

These models are read by the client (to validate before starting) and by
``MixerWorkflow`` (to run), so this module imports nothing that does I/O.
Validation across fields and steps (the DAG, templates, secrets) lives in
``validation.py``; these models only describe the shape of one document.

Compatibility: specs of runs in flight are re-read on replay. New fields get
defaults; an existing field never changes meaning. Replay reads only this
shape, so a constraint here is never tightened: a new rule goes into
``validation.py``, whose verdict a run records once, at its start.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from llmmixer.core.contracts import Attachment, RespondRule
from llmmixer.core.tools import DEFAULT_MAX_TURNS, Tool

STEP_ID_PATTERN = r"^[a-z0-9_-]+$"
KINDS: tuple[str, ...] = ("llm", "pty", "approval", "decompose", "agent")

OnFailure = Literal["pause", "fail", "skip"]
# What a reply cut off by its token limit becomes (docs/spec.md, "Truncation").
OnTruncation = Literal["continue", "fail", "accept"]
CacheMode = Literal["auto", "off"]
# Failures that move a step to its next target only when `fallback_on` lists
# them; every other failure always does.
FallbackReason = Literal["refused"]
# Fields of a step that move a request or a command: where a provider call goes
# (`base_url`, `provider_options`) and what runs and how (`env`, `cwd`,
# `command`, `args`), and what a model may call (`tools`: commands, MCP servers,
# other specs). A plan is written by a model that may have read hostile text,
# so it sets them only where its decompose step's `allow_fields` lists them.
PlanField = Literal["base_url", "provider_options", "env", "cwd", "command", "args", "tools"]
PLAN_FIELDS: tuple[str, ...] = get_args(PlanField)


class _Strict(BaseModel):
    # Unknown fields are refused so a typo ("promt") is an error, not a silent no-op.
    model_config = ConfigDict(extra="forbid")


class RetrySpec(_Strict):
    """How often Temporal retries one provider or command before the step fails."""

    max_attempts: int = Field(default=3, ge=1, le=100)
    initial_interval_s: float = Field(default=1.0, gt=0)
    backoff: float = Field(default=2.0, ge=1.0)
    max_interval_s: float = Field(default=60.0, gt=0)


class FallbackTarget(_Strict):
    """Tried in order when the step's own provider fails for good."""

    provider: str
    model: str
    base_url: str | None = None


class Target(_Strict):
    """One provider and model: an entry of a route, a best_of candidate or a judge."""

    provider: str
    model: str
    base_url: str | None = None


class AllowRule(_Strict):
    """A provider (and optionally one model of it) that a decompose plan may name."""

    provider: str
    model: str | None = None


class Budget(_Strict):
    """Spending limits; a step that would start beyond them waits for a person."""

    max_tokens: int | None = Field(default=None, ge=1)
    max_cost_usd: float | None = Field(default=None, ge=0)


class Judge(_Strict):
    """The call that picks or merges best_of candidates."""

    provider: str
    model: str
    # Replaces the default instruction; the numbered candidates are appended.
    prompt: str | None = None


class BestOf(_Strict):
    """Run ``n`` candidates in parallel, then one judge call picks or merges."""

    n: int = Field(default=3, ge=2, le=10)
    # Candidate i uses targets[i % len(targets)]; empty: the step's own provider/model.
    targets: list[Target] = Field(default_factory=list)
    # None: the step's own provider/model judges.
    judge: Judge | None = None


class FileInput(_Strict):
    """An input that is a file: ``{file: PATH}`` in a spec, an ``Attachment`` once stored.

    A path is read by the client that starts the run (``llmmixer run``,
    ``MixerClient``), relative to the spec's file, and replaced by the stored
    file's description before the run starts; ``llmmixer serve`` never reads
    one. A step sends the file with ``attachments: [NAME]``.
    """

    file: str | Attachment

    def __str__(self) -> str:
        # What `{{inputs.NAME}}` of a file input renders to: a description, never bytes.
        if isinstance(self.file, Attachment):
            return f"[file {self.file.describe()}]"
        return f"[file {self.file}]"


InputValue = str | int | float | bool | FileInput


class TextPart(_Strict):
    """Text in a message's list of parts; templates are rendered in it."""

    type: Literal["text"]
    text: str


class FilePart(_Strict):
    """A file input placed in one message: ``{type: image, input: NAME}``.

    ``image`` takes an image input, ``document`` a PDF or a text file.
    """

    type: Literal["image", "document"]
    input: str


# A message's `content` is a string, or a list of these (docs/spec.md,
# "Files in a message").
MessagePart = Annotated[TextPart | FilePart, Field(discriminator="type")]
MessageContent = str | list[MessagePart]


def text_parts(content: MessageContent) -> list[str]:
    """A message's texts in order, templates unrendered: the content itself when it is text."""
    if isinstance(content, str):
        return [content]
    return [part.text for part in content if isinstance(part, TextPart)]


HedgePercentile = Literal["p50", "p90", "p95", "p99"]


class Hedge(_Strict):
    """Start a second call when the first has streamed no token after a while.

    ``after_s`` is a fixed delay; ``after`` learns it: that percentile of the
    worker's recent first-token latencies for the model. ``max`` calls may
    start beside the first, each when the latest has streamed nothing for
    its own delay. The first complete answer wins; the others are cancelled
    and all count toward budgets.
    """

    after_s: float | None = Field(default=None, gt=0, le=3600)
    after: HedgePercentile | None = None
    # "next": the next target of the step's chain (its fallback or route),
    # or the same target when the chain has no other; "same": always the same.
    target: Literal["next", "same"] = "next"
    # With `after`: the delay never goes below this, and is `default_s` while
    # the worker has seen fewer than `min_samples` first tokens of the model.
    min_s: float = Field(default=0.2, gt=0, le=3600)
    default_s: float = Field(default=5.0, gt=0, le=3600)
    min_samples: int = Field(default=20, ge=1, le=1000)
    # How many hedges one call may get: a further one starts when the latest
    # has streamed nothing for its delay. Bounded: each costs a prompt.
    max: int = Field(default=1, ge=1, le=4)

    @model_validator(mode="after")
    def _one_delay(self) -> Hedge:
        if (self.after_s is None) == (self.after is None):
            raise ValueError(
                "give exactly one of after_s (seconds, e.g. after_s: 2) or after "
                "(a learned percentile: p50, p90, p95 or p99)"
            )
        return self


class Defaults(_Strict):
    """Values every step uses unless it sets its own."""

    provider: str | None = None
    model: str | None = None
    on_failure: OnFailure = "pause"
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    retry: RetrySpec = Field(default_factory=RetrySpec)
    timeout_s: float = Field(default=600.0, gt=0)
    # How soon a silent activity counts as lost; docs/interventions.md promises a dead
    # worker's step runs again within 60 s, so this stays well under that.
    heartbeat_timeout_s: float = Field(default=20.0, gt=0, le=60)
    pause_timeout_s: float | None = Field(default=None, gt=0)
    # Tools every llm step offers its model unless it sets its own `tools`.
    tools: list[Tool] = Field(default_factory=list)
    # None: "fail" for `response_format: json` (a cut reply is not JSON), else "continue".
    on_truncation: OnTruncation | None = None
    max_continuations: int = Field(default=3, ge=0, le=20)
    cache: CacheMode = "auto"
    # Hedged calls for every llm step that sets no `hedge` of its own.
    hedge: Hedge | None = None


class _StepBase(_Strict):
    id: str = Field(pattern=STEP_ID_PATTERN, max_length=64)
    needs: list[str] = Field(default_factory=list)
    description: str | None = None
    on_failure: OnFailure | None = None
    retry: RetrySpec | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    pause_timeout_s: float | None = Field(default=None, gt=0)


class LlmStep(_StepBase):
    """One model call (the kind when `kind` is omitted)."""

    kind: Literal["llm"] = "llm"
    provider: str | None = None
    model: str | None = None
    system: str | None = None
    prompt: str | None = None
    # `content` is text, or a list of parts (TextPart, FilePart).
    messages: list[dict[str, MessageContent]] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    response_format: Literal["text", "json"] = "text"
    json_schema: dict[str, Any] | None = None
    api: Literal["chat", "responses"] = "chat"
    base_url: str | None = None
    provider_options: dict[str, Any] = Field(default_factory=dict)
    fallback: list[FallbackTarget] = Field(default_factory=list)
    # A refusal moves to the next target only when listed here.
    fallback_on: list[FallbackReason] = Field(default_factory=list)
    on_truncation: OnTruncation | None = None
    max_continuations: int | None = Field(default=None, ge=0, le=20)
    cache: CacheMode | None = None
    # A name under the spec's `routes`: its first target answers, the rest are
    # its fallback chain. Excludes `provider`/`model` on the same step.
    role: str | None = None
    best_of: BestOf | None = None
    # What the model may call (core/tools.py); None: the defaults' tools, []: none.
    tools: list[Tool] | None = None
    # Most model turns of a tool loop; the step fails (on_failure applies) beyond it.
    max_turns: int | None = Field(default=None, ge=1, le=100)
    # Names of file inputs sent with the prompt, in each provider's native shape.
    attachments: list[str] = Field(default_factory=list)
    # A second call when the first is slow to start (docs/spec.md, "Hedged
    # calls"); None: the defaults' hedge.
    hedge: Hedge | None = None


class PtyStep(_StepBase):
    """A command in a pseudo-terminal; `respond` answers its prompts."""

    kind: Literal["pty"] = "pty"
    command: list[str] = Field(min_length=1)
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    respond: list[RespondRule] = Field(default_factory=list)
    stdin: str | None = None
    success_codes: list[int] = Field(default_factory=lambda: [0])
    max_output_bytes: int = Field(default=1024 * 1024, ge=1024)


class ApprovalStep(_StepBase):
    """Waits for a person to approve or reject."""

    kind: Literal["approval"] = "approval"
    prompt: str | None = None
    # After timeout_s with no decision, `default` applies (or the step fails).
    default: Literal["approve", "reject"] | None = None


class DecomposeStep(_StepBase):
    """A model writes a plan of sub-steps, checked against the limits listed here."""

    kind: Literal["decompose"] = "decompose"
    provider: str | None = None
    model: str | None = None
    system: str | None = None
    prompt: str
    max_steps: int = Field(default=8, ge=1, le=100)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    role: str | None = None
    # Levels of planning allowed from here: 1 means the plan may not contain
    # decompose steps; a nested decompose step never gets more than its parent.
    max_depth: int = Field(default=1, ge=1, le=5)
    # Kinds a plan may create besides `llm`; pty and agent only when listed.
    allow_kinds: list[Literal["llm", "approval", "decompose", "pty", "agent"]] = Field(
        default_factory=list
    )
    # Fields of PLAN_FIELDS a plan may set (a pty step needs `command`); none
    # by default. A nested decompose step never gets more than its parent.
    allow_fields: list[PlanField] = Field(default_factory=list)
    # Limits what this step's sub-steps (at any depth) may spend together.
    budget: Budget | None = None


class AgentStep(_StepBase):
    """A coding agent CLI run in a pseudo-terminal."""

    kind: Literal["agent"] = "agent"
    agent: Literal["claude-code", "codex", "gemini-cli"]
    prompt: str
    args: list[str] = Field(default_factory=list)
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    worktree: bool = False


def _kind_of(value: Any) -> str | None:
    # `kind` may be omitted in a spec and then means "llm".
    if isinstance(value, dict):
        return str(value.get("kind", "llm"))
    return getattr(value, "kind", None)


Step = Annotated[
    Annotated[LlmStep, Tag("llm")]
    | Annotated[PtyStep, Tag("pty")]
    | Annotated[ApprovalStep, Tag("approval")]
    | Annotated[DecomposeStep, Tag("decompose")]
    | Annotated[AgentStep, Tag("agent")],
    Discriminator(_kind_of),
]
STEP_MODELS: dict[str, type[_StepBase]] = {
    "llm": LlmStep,
    "pty": PtyStep,
    "approval": ApprovalStep,
    "decompose": DecomposeStep,
    "agent": AgentStep,
}


class Spec(_Strict):
    """A workflow: a DAG of steps run by the `MixerWorkflow` workflow."""

    name: str = Field(default="workflow", min_length=1, max_length=200)
    description: str | None = None
    inputs: dict[str, InputValue] = Field(default_factory=dict)
    defaults: Defaults = Field(default_factory=Defaults)
    steps: list[Step] = Field(min_length=1)
    output: str | None = None
    max_parallel: int | None = Field(default=None, ge=1)
    # Set by `llmmixer run --dry-run`: every provider call is answered offline.
    dry_run: bool = False
    # Continue as new once the run's history has this many events (default
    # 10,000, or sooner when Temporal suggests it); mostly for tests.
    continue_as_new_after_events: int | None = Field(default=None, ge=20)
    # The task queue PTY and agent steps run on, so command-heavy hosts can be
    # isolated (workers with LLMMIXER_WORKER_ROLES=pty polling it). None: the
    # run's own queue. MixerClient fills it from LLMMIXER_PTY_TASK_QUEUE. It
    # travels in the spec, not in a worker's environment, so replay always
    # schedules on the same queue.
    pty_task_queue: str | None = Field(default=None, min_length=1, max_length=200)
    # role -> [primary, fallback, ...]: plans name roles, the spec's owner picks models.
    routes: dict[str, list[Target]] = Field(default_factory=dict)
    # What a plan may name directly as provider/model; None: anything.
    allow: list[AllowRule] | None = None
    budget: Budget | None = None

    def step(self, step_id: str) -> LlmStep | PtyStep | ApprovalStep | DecomposeStep | AgentStep:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    def has_cost_limit(self) -> bool:
        """Whether any budget here (the spec's or a decompose step's) limits dollars."""
        budgets = [self.budget] + [s.budget for s in self.steps if isinstance(s, DecomposeStep)]
        return any(b is not None and b.max_cost_usd is not None for b in budgets)

    def models(self) -> set[tuple[str, str]]:
        """Every (provider, model) this spec names; a plan may add others at run time."""
        named: set[tuple[str | None, str | None]] = {
            (target.provider, target.model)
            for targets in self.routes.values()
            for target in targets
        }
        named |= {(rule.provider, rule.model) for rule in self.allow or []}
        for step in self.steps:
            if isinstance(step, (LlmStep, DecomposeStep)) and step.role is None:
                named.add(
                    (step.provider or self.defaults.provider, step.model or self.defaults.model)
                )
            if isinstance(step, LlmStep):
                named |= {(f.provider, f.model) for f in step.fallback}
                if step.best_of is not None:
                    named |= {(t.provider, t.model) for t in step.best_of.targets}
                    if step.best_of.judge is not None:
                        named.add((step.best_of.judge.provider, step.best_of.judge.model))
        return {(p, m) for p, m in named if p and m}

    def attachments(self, step: LlmStep) -> list[Attachment]:
        """The stored files ``step`` sends; validation has refused any other name."""
        return self._stored_files(step.attachments)

    def part_files(self, content: MessageContent) -> list[Attachment]:
        """The stored files a message's parts place in it, in their order."""
        if isinstance(content, str):
            return []
        return self._stored_files([p.input for p in content if isinstance(p, FilePart)])

    def _stored_files(self, names: list[str]) -> list[Attachment]:
        found = []
        for name in names:
            value = self.inputs.get(name)
            if isinstance(value, FileInput) and isinstance(value.file, Attachment):
                found.append(value.file)
        return found

    def tools(self, step: LlmStep) -> list[Tool]:
        return self.defaults.tools if step.tools is None else step.tools

    def max_turns(self, step: LlmStep) -> int:
        return step.max_turns or DEFAULT_MAX_TURNS

    def on_failure(self, step: _StepBase) -> OnFailure:
        return step.on_failure or self.defaults.on_failure

    def retry(self, step: _StepBase) -> RetrySpec:
        return step.retry or self.defaults.retry

    def timeout_s(self, step: _StepBase) -> float:
        return step.timeout_s or self.defaults.timeout_s

    def pause_timeout_s(self, step: _StepBase) -> float | None:
        return step.pause_timeout_s or self.defaults.pause_timeout_s

    def on_truncation(self, step: _StepBase) -> OnTruncation | None:
        own: OnTruncation | None = getattr(step, "on_truncation", None)
        return own or self.defaults.on_truncation

    def max_continuations(self, step: _StepBase) -> int:
        own: int | None = getattr(step, "max_continuations", None)
        return self.defaults.max_continuations if own is None else own

    def hedge(self, step: _StepBase) -> Hedge | None:
        """The step's hedge: its own, else the defaults'.

        Only an llm step's own answer is hedged: best_of candidates already
        run side by side, and a decompose step's planner is one call a run.
        """
        if not isinstance(step, LlmStep) or step.best_of is not None:
            return None
        return step.hedge or self.defaults.hedge

    def cache(self, step: _StepBase) -> CacheMode:
        own: CacheMode | None = getattr(step, "cache", None)
        return own or self.defaults.cache
