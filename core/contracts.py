"""What crosses the boundary between ``MixerWorkflow`` and its activities.

Activity names, their single input object and their output object, and the
``ApplicationError`` types an activity may raise. The workflow imports this
module (and nothing else from ``activities``), so it must stay free of I/O and
of heavy SDK imports.

Compatibility: runs in flight replay against these shapes. Add fields with
defaults; never rename or remove one, and never rename an activity.

Error types (``ApplicationError.type``) raised by activities::

    ProviderError                  any provider failure (subtypes below)
    ├── ProviderRetryable          408/409/429/5xx, connection, timeout, cut stream
    ├── ProviderRejected           other 4xx: bad request, unknown model
    ├── ProviderRefused            the model or its filters declined (safety, content policy)
    ├── ProviderTruncated          the reply hit the token limit (on_truncation decides)
    ├── ProviderAuth               401/403 or a missing key: set the named variable
    ├── CircuitOpen                the worker's breaker for provider/model is open
    └── InvalidOutput              reply failed JSON / JSON-schema validation
    CommandRefused                 PTY policy refused the executable or cwd
    CommandFailed                  exit code outside ``success_codes``
    CommandTimeout                 the command ran past ``timeout_s``
    McpRefused                     the worker does not allow this MCP server
                                   (its command or LLMMIXER_ALLOWED_MCP_URLS)
    McpUnavailable                 the MCP server could not be reached or died;
                                   retryable (the worker starts it again)
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, field_validator

from llmmixer.core.providers import provider_names
from llmmixer.core.tools import TOOL_NAME_PATTERN, CommandTool, McpTool, empty_parameters

LLM_ACTIVITY = "llmmixer.call_llm"
PTY_ACTIVITY = "llmmixer.run_command"
AGENT_ACTIVITY = "llmmixer.run_agent"
# Checks whose verdict history records, so replay never re-runs rules that a
# release tightened: the spec's (a local activity, at a run's start) and each
# plan's (an activity on the run's task queue).
CHECK_SPEC_ACTIVITY = "llmmixer.check_spec"
CHECK_PLAN_ACTIVITY = "llmmixer.check_plan"
# Tool calls of an llm step's loop, each its own activity (activities/tools).
# They start programs and servers, so they run where commands run: the PTY
# task queue when the run has one.
TOOL_COMMAND_ACTIVITY = "llmmixer.run_tool_command"
MCP_LIST_ACTIVITY = "llmmixer.list_mcp_tools"
MCP_CALL_ACTIVITY = "llmmixer.call_mcp_tool"
# Hedged calls (docs/spec.md, "Hedged calls"): the price of a cancelled
# call's prompt, on the run's task queue (a worker with the llm role keeps
# the price table).
HEDGE_COST_ACTIVITY = "llmmixer.hedge_cost"

Provider = Literal["anthropic", "openai", "gemini"]
# Declared in the provider registry (pure: no SDK, no I/O, so the workflow
# sandbox may import it); kept here because workflows and committed histories
# import it from this module.
PROVIDERS: tuple[str, ...] = provider_names()


class ErrorType:
    """``ApplicationError.type`` values; the workflow decides fallback from these."""

    RETRYABLE = "ProviderRetryable"
    REJECTED = "ProviderRejected"
    AUTH = "ProviderAuth"
    CIRCUIT_OPEN = "CircuitOpen"
    INVALID_OUTPUT = "InvalidOutput"
    # Anthropic `stop_reason: refusal`, OpenAI `content_filter`, Gemini safety
    # blocks: one type, never retried (the same prompt is refused again); a
    # step's `fallback_on: [refused]` is what moves it to another target.
    REFUSED = "ProviderRefused"
    # The reply hit the token limit and `on_truncation` says it may not pass.
    TRUNCATED = "ProviderTruncated"
    COMMAND_REFUSED = "CommandRefused"
    COMMAND_FAILED = "CommandFailed"
    COMMAND_TIMEOUT = "CommandTimeout"
    MCP_REFUSED = "McpRefused"
    MCP_UNAVAILABLE = "McpUnavailable"


class Usage(BaseModel):
    """Tokens of one call or a sum of calls.

    ``input_tokens`` counts every prompt token, cached or not;
    ``cache_read_tokens`` and ``cache_write_tokens`` are the parts of it that
    were read from or written to the provider's prompt cache (priced at their
    own rates). ``output_tokens`` counts every generated token;
    ``reasoning_tokens`` is the part spent thinking rather than answering.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_read_tokens=self.cache_read_tokens + other.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
        )


class ToolCall(BaseModel):
    """One call the model asked for: the provider's call id, the tool's name, its arguments."""

    id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    # The model's arguments were not a JSON object (``arguments`` is then
    # empty): the call must not run; send this back as an error result so
    # the model can try again.
    error: str | None = None
    # An opaque token the provider wants back with this call on the next
    # turn (Gemini's thought signature, base64).
    signature: str | None = None


class ToolDeclaration(BaseModel):
    """A tool as the model is told about it: name, description, JSON-Schema parameters."""

    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=empty_parameters)

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Every provider takes a tool's arguments as one JSON object.
        if value.get("type") != "object":
            raise ValueError(
                'parameters must be a JSON Schema with "type": "object" '
                '(e.g. {"type": "object", "properties": {...}})'
            )
        properties = value.get("properties", {})
        if not isinstance(properties, dict):
            raise ValueError("parameters.properties must be a mapping of argument names to schemas")
        return value


# ---- files a turn carries (core/attachments.py reads and types them) -----


class Attachment(BaseModel):
    """A stored file: what it is, and where its bytes are kept. Clients write it, not people.

    The bytes never travel in a run's inputs or history: the client that
    starts the run puts them in the payload store (``LLMMIXER_PAYLOAD_*``)
    and ``ref`` is the store's reference to them. The worker reads them back
    before the call and checks them against ``sha256``. ``ref`` is empty
    where only a description is needed (``llmmixer validate``).
    """

    name: str
    #: Typed by the file's content, never its name: image/png, image/jpeg,
    #: image/gif, image/webp, application/pdf or text/plain.
    media_type: str
    size: int
    sha256: str
    ref: str = ""
    # Filled in on the worker only (``loaded``), never serialized.
    _data: bytes | None = PrivateAttr(default=None)

    def loaded(self, data: bytes) -> Attachment:
        """A copy that carries its bytes, for the provider adapter."""
        copy = self.model_copy()
        copy._data = data
        return copy

    @property
    def data(self) -> bytes:
        if self._data is None:
            raise ValueError(
                f"attachment {self.name!r} was not loaded from the payload store: "
                "the LLM activity loads every attachment before the call"
            )
        return self._data

    def describe(self) -> str:
        """How a prompt, a dry run and the estimate name the file."""
        return f"{self.name} ({self.media_type}, {_size_text(self.size)})"


def _size_text(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MB"
    if size >= 1024:
        return f"{size / 1024:.1f} KB"
    return f"{size} bytes"


class ChatMessage(BaseModel):
    """One turn of a conversation.

    Plain turns have ``role`` user or assistant and ``content``. A tool loop
    adds two kinds (defaults keep recorded plain turns as they were): an
    assistant turn whose ``tool_calls`` the model asked for (``content`` is
    the text it wrote before them, often empty), and a ``tool`` turn carrying
    one call's result (``tool_call_id``, ``tool_name``, ``is_error``).
    Consecutive tool turns answer one assistant turn together.
    """

    role: Literal["user", "assistant", "tool"]
    content: str
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    tool_name: str | None = None
    is_error: bool = False
    # Files sent with this turn (a user turn), before its text: each adapter
    # places them first, as the providers advise for images.
    attachments: list[Attachment] = Field(default_factory=list)

    @classmethod
    def tool_request(cls, text: str, calls: list[ToolCall]) -> ChatMessage:
        """The assistant turn that asked for ``calls`` (an ``LlmReply``'s text and tool_calls)."""
        return cls(role="assistant", content=text, tool_calls=list(calls))

    @classmethod
    def tool_result(cls, result: ToolResult) -> ChatMessage:
        """The turn that answers one ``ToolCall`` with its result."""
        return cls(
            role="tool",
            content=result.content,
            tool_call_id=result.call_id,
            tool_name=result.name,
            is_error=result.is_error,
        )


class PlanTarget(BaseModel):
    provider: str
    model: str


class PlanRequest(BaseModel):
    """What a decompose step's planner may create; set on its ``LlmCall``.

    The real provider only sees it as prose in the prompt; the dry-run
    responder reads it to return a plan that passes validation.
    """

    max_steps: int = 8
    kinds: list[str] = Field(default_factory=lambda: ["llm"])
    # Providers and models the plan may name directly (empty: use `roles`).
    targets: list[PlanTarget] = Field(default_factory=list)
    # Roles under the spec's `routes`: a plan step names one instead of a model.
    roles: list[str] = Field(default_factory=list)
    # Ids already used in the run; the plan's ids must differ.
    taken_ids: list[str] = Field(default_factory=list)
    # Suggested id prefix, so `{{join(steps.PREFIX*, ...)}}` can find the sub-steps.
    id_prefix: str = ""
    # Fields that move a request or a command (base_url, provider_options, env,
    # cwd, command, args) the plan may set: its decompose step's `allow_fields`.
    fields: list[str] = Field(default_factory=list)


class HedgeTrigger(BaseModel):
    """When a hedged call asks for a second call: no first token after a delay.

    The activity watches its own first token, so only a call that is
    actually slow costs the run a signal; ``after`` is learned from the
    first-token latencies of the worker that runs the call.
    """

    # The workflow signal to send, with a ``HedgeStart``; a name per call.
    signal: str
    after_s: float | None = None
    after: Literal["p50", "p90", "p95", "p99"] | None = None
    min_s: float = 0.2
    default_s: float = 5.0
    min_samples: int = 20
    # Set when further hedges may follow (``hedge.max`` above 1): a call that
    # asked for a hedge says so again when its first token comes after all,
    # so the workflow starts no further hedge while it streams.
    report_first_token: bool = False


class HedgeStart(BaseModel):
    """The signal of a call with no first token yet: start the second call now.

    With ``streaming``, the same call's later word that its first token came
    (``HedgeTrigger.report_first_token``): start no further hedge for it.
    """

    delay_s: float
    # How the delay was found: a fixed after_s, or a learned percentile of
    # ``samples`` recent first tokens (below min_samples: the default_s).
    after: str | None = None
    samples: int = 0
    learned: bool = False
    streaming: bool = False

    def reason(self, provider: str, model: str) -> str:
        """Why the second call started, for the step's record."""
        head = f"no first token from {provider}/{model} after {self.delay_s:.3g} s"
        if self.after is None:
            return f"{head} (after_s)"
        if self.learned:
            return (
                f"{head} ({self.after} of the last {self.samples} first tokens of that model "
                "on the worker)"
            )
        return (
            f"{head} (default_s: the worker had seen {self.samples} first tokens of that "
            f"model, too few for {self.after})"
        )


class LlmCall(BaseModel):
    """One provider call, fully rendered by the workflow (no templates left)."""

    workflow_id: str
    step_id: str
    provider: str
    model: str
    messages: list[ChatMessage]
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = Field(default_factory=list)
    # "json": the reply must parse as JSON (and match json_schema when given).
    response_format: Literal["text", "json"] = "text"
    json_schema: dict[str, Any] | None = None
    # OpenAI only: which API to use.
    api: Literal["chat", "responses"] = "chat"
    # A per-step endpoint override (e.g. an Ollama server); keys stay on the worker.
    base_url: str | None = None
    # Provider-specific passthrough (Gemini safety_settings, generation_config, ...).
    provider_options: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float = 600.0
    dry_run: bool = False
    # True when the workflow has another provider to fall back to: an open
    # circuit then fails at once instead of waiting out its cool-down.
    has_fallback: bool = False
    # Set on a decompose step's planner call. Defaults to None so calls
    # recorded in the history of runs in flight still decode.
    plan: PlanRequest | None = None
    # What a reply cut off by the token limit becomes: "continue" asks the
    # model to go on and joins the parts (up to max_continuations times),
    # "fail" fails the attempt (retryable), "accept" keeps it, marked
    # truncated. None: "fail" for JSON replies, "continue" for text.
    on_truncation: Literal["continue", "fail", "accept"] | None = None
    max_continuations: int = 3
    # "auto": mark the stable prefix (system prompt, shared context) for the
    # provider's prompt cache; "off": send nothing cache-related.
    cache: Literal["auto", "off"] = "auto"
    # Tools the model may call this turn; its calls come back in
    # ``LlmReply.tool_calls`` (the workflow runs them, never the activity).
    tools: list[ToolDeclaration] = Field(default_factory=list)
    # Hedged calls only: when to ask the workflow for a second call.
    hedge: HedgeTrigger | None = None

    def truncation_policy(self) -> Literal["continue", "fail", "accept"]:
        """``on_truncation`` with its default applied."""
        if self.on_truncation is not None:
            return self.on_truncation
        return "fail" if self.response_format == "json" else "continue"


class LlmReply(BaseModel):
    text: str
    provider: str
    model: str
    response_model: str | None = None
    usage: Usage = Field(default_factory=Usage)
    # None means the price of this model is unknown, which is not the same as free.
    cost_usd: float | None = None
    latency_ms: float = 0.0
    # Temporal attempt number of the activity execution that produced this reply.
    attempt: int = 1
    dry_run: bool = False
    finish_reason: str | None = None
    # The reply stopped at the token limit and on_truncation accepted it as it is.
    truncated: bool = False
    # How many times the model was asked to go on after a cut-off reply.
    continuations: int = 0
    # Streamed text that watchers have not been sent yet; the workflow
    # publishes it as the step's last step_delta. Empty when that text is the
    # end of ``text``: then ``unsent_from`` says where in ``text`` it starts,
    # so a reply shorter than one delta interval is not in history twice.
    # Replies recorded before ``unsent_from`` existed carry it here.
    unsent_text: str = ""
    unsent_from: int | None = None
    # The tools the model asked to call, in its order; empty for a final answer.
    tool_calls: list[ToolCall] = Field(default_factory=list)


class HedgeCostRequest(BaseModel):
    """A cancelled call's estimated usage, to price for its model (``HEDGE_COST_ACTIVITY``)."""

    provider: str
    model: str
    usage: Usage = Field(default_factory=Usage)


class HedgeCost(BaseModel):
    # None: the model's price is unknown (not free).
    cost_usd: float | None = None


class RespondRule(BaseModel):
    expect: str
    send: str
    times: int | None = None


class CommandCall(BaseModel):
    """One command to run in a pseudo-terminal (or pipes), rendered argv."""

    workflow_id: str
    step_id: str
    argv: list[str]
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = 600.0
    respond: list[RespondRule] = Field(default_factory=list)
    stdin: str | None = None
    success_codes: list[int] = Field(default_factory=lambda: [0])
    max_output_bytes: int = 1024 * 1024


class AgentCall(BaseModel):
    """One CLI coding agent run (Claude Code, Codex, Gemini CLI) over the PTY runner.

    The worker turns it into argv and respond rules, so the install check and
    the git worktree happen where the agent runs.
    """

    workflow_id: str
    step_id: str
    agent: Literal["claude-code", "codex", "gemini-cli"]
    prompt: str
    args: list[str] = Field(default_factory=list)
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    worktree: bool = False
    timeout_s: float = 1800.0
    max_output_bytes: int = 1024 * 1024


class CommandResult(BaseModel):
    output: str
    exit_code: int | None
    mode: Literal["pty", "pipe"]
    truncated: bool = False
    duration_ms: float = 0.0
    attempt: int = 1
    # Agent steps in a worktree: the changes they made, as a git diff.
    diff: str | None = None


class ToolResult(BaseModel):
    """What goes back to the model for one ``ToolCall``."""

    call_id: str
    name: str
    content: str
    # The tool failed (exit code, refused arguments, server error, a person's
    # rejection); the model sees ``content`` as the reason.
    is_error: bool = False


class ToolRunRequest(BaseModel):
    """A command tool to run for one call (``TOOL_COMMAND_ACTIVITY``)."""

    workflow_id: str
    step_id: str
    tool: CommandTool
    call: ToolCall


class ToolRunResult(BaseModel):
    """A tool call's outcome (``TOOL_COMMAND_ACTIVITY`` and ``MCP_CALL_ACTIVITY``).

    ``content`` is redacted and bounded; ``is_error`` results are still
    results (the model reads them), only refusals of the worker raise.
    """

    call_id: str
    name: str
    content: str
    is_error: bool = False
    exit_code: int | None = None
    truncated: bool = False
    duration_ms: float = 0.0
    attempt: int = 1

    def as_result(self) -> ToolResult:
        return ToolResult(
            call_id=self.call_id, name=self.name, content=self.content, is_error=self.is_error
        )


class McpListRequest(BaseModel):
    """Which tools an MCP server offers, after its include/exclude (``MCP_LIST_ACTIVITY``)."""

    workflow_id: str
    step_id: str
    server: McpTool


class McpToolInfo(BaseModel):
    """One tool of an MCP server, as the model is told about it."""

    name: str
    description: str = ""
    # The tool's input JSON Schema.
    parameters: dict[str, Any] = Field(default_factory=dict)


class McpListResult(BaseModel):
    tools: list[McpToolInfo] = Field(default_factory=list)


class McpCallRequest(BaseModel):
    """One call of an MCP server's tool (``MCP_CALL_ACTIVITY``)."""

    workflow_id: str
    step_id: str
    server: McpTool
    call: ToolCall


class FailureDetails(BaseModel):
    """Carried as the first detail of every ``ApplicationError`` an activity raises."""

    attempt: int = 1
    provider: str | None = None
    model: str | None = None
    status_code: int | None = None
    # Output produced before the failure (a PTY timeout keeps what it printed).
    partial_output: str | None = None
    # A refusal: the provider's own reason (finish reason, block reason).
    reason: str | None = None


# ---- the run's event stream (public types: docs/interventions.md) -------
#
# Published by the workflow and, for streamed text (step_delta), by activities,
# on ``temporalio.contrib.workflow_streams``: an event's offset is its position
# in the run's log, so readers resume from any offset and see each event once.

EVENTS_TOPIC = "events"


class EventType(StrEnum):
    WORKFLOW_STARTED = "workflow_started"
    STEP_STARTED = "step_started"
    STEP_DELTA = "step_delta"
    STEP_COMPLETED = "step_completed"
    STEP_FAILED = "step_failed"
    STEP_WAITING = "step_waiting"
    STEP_SKIPPED = "step_skipped"
    STEP_OVERRIDDEN = "step_overridden"
    INTERVENTION_ACCEPTED = "intervention_accepted"
    INTERVENTION_REJECTED = "intervention_rejected"
    WORKFLOW_ENDED = "workflow_ended"
    # A tool call of an llm step's loop starts and ends (data: turn, call id,
    # tool name; at the end its result's size, whether it is an error, duration).
    TOOL_STARTED = "tool_started"
    TOOL_ENDED = "tool_ended"


class MixerEvent(BaseModel):
    """One event; ``offset`` is filled in by the reader from the stream position."""

    type: EventType
    step: str | None = None
    attempt: int | None = None
    time: datetime | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    offset: int = -1


# ---- checks whose verdict is recorded (activities/checks.py) -------------


class CheckIssue(BaseModel):
    """One problem found by a check: ``step`` is a step id, "spec" or "plan"."""

    step: str
    field: str
    message: str


class SpecCheck(BaseModel):
    """The spec a run was started with, as it arrived (before any parsing)."""

    spec: dict[str, Any]


class SpecCheckResult(BaseModel):
    issues: list[CheckIssue] = Field(default_factory=list)


class PlanCheckLimits(BaseModel):
    """What the plan may contain, after the limits of every plan above it."""

    max_steps: int
    max_depth: int
    kinds: list[str]
    fields: list[str] = Field(default_factory=list)


class PlanCheck(BaseModel):
    """A planner's reply and where its plan would land."""

    text: str
    # The run's spec as it arrived; the plan is checked against its inputs,
    # defaults, routes and `allow`.
    spec: dict[str, Any]
    step_id: str
    limits: PlanCheckLimits
    # Every id in the run (the plan's ids must be new).
    taken_ids: list[str] = Field(default_factory=list)
    # The finished steps the decompose step waited for: the plan may read them.
    context_ids: list[str] = Field(default_factory=list)


class PlanCheckResult(BaseModel):
    """The plan's steps (``kind`` filled in) when ``issues`` is empty."""

    steps: list[dict[str, Any]] = Field(default_factory=list)
    issues: list[CheckIssue] = Field(default_factory=list)
