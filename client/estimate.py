"""What a spec will cost before it runs: ``llmmixer estimate`` and ``run --dry-run``'s table.

A pure function of the spec, its inputs and the price table. For each step:

- Input tokens come from the step's prompt rendered with the inputs
  (``client/tokens.py``: exact for OpenAI models, a labelled approximation
  for the others), plus the output tokens of each step it references.
- Output tokens are bounded by ``max_tokens`` (the step's, else the spec's
  defaults; without either the provider's limit is not known and
  ``ASSUMED_MAX_TOKENS`` is used, with a warning).
- **min**: every call answers at once with one token, on the cheapest target
  of its chain. **expected**: every call answers at once on its first target,
  using ``EXPECTED_OUTPUT_SHARE`` of its ``max_tokens``. **max**: every
  attempt that ``retry.max_attempts`` allows, on every target of the
  fallback chain, is billed in full.
- ``best_of`` counts its ``n`` candidates and the judge, whose prompt holds
  every candidate. ``decompose`` counts its planner (each refused plan is
  asked again) and up to ``max_steps`` sub-steps (``max_steps ** max_depth``
  when plans may nest) on the models its routes and ``allow`` name; a
  decompose step's own ``budget`` caps what its sub-steps may spend.
- An llm step with ``tools`` is a loop of model turns (``max_turns``, 10
  unless set). **min** assumes one turn (the model answers without a tool),
  **expected** two (one tool call, then the answer). **max** assumes every
  turn: each sends the tool declarations again and the whole conversation
  so far, so turn *k* also re-sends *k - 1* replies of ``max_tokens`` and
  *k - 1* tool results, each bounded by the tool's ``max_output_bytes`` / 4
  (a command) or ``ASSUMED_TOOL_RESULT_TOKENS`` (an MCP server or a spec,
  whose output has no bound in the spec). One tool call per turn is
  assumed; a model that calls several at once adds their results too.
- Files a step sends (``attachments`` and message parts) add, per target,
  what its provider's published rule charges (``client/tokens.py``,
  ``file_tokens``): an image by its width and height, read from its header
  (Anthropic width*height/750 up to ~1600; OpenAI 85 + 170 per 512-px tile;
  Gemini 258 per 768-px tile), a PDF by its pages (1500-3000 tokens a page,
  Gemini 258), a text file as text. Each is an approximation and labelled
  so; without the file's bytes, an image spans the provider's smallest to
  largest charge and a PDF is assumed a page per 50 KB.
- Commands (``pty``) and approvals cost nothing; an ``agent`` step's CLI
  spends on its own account, which is not estimated.

Prices are read through ``PriceTable`` only; a model without a price counts
0 and is listed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from llmmixer.activities.pricing import PriceTable
from llmmixer.client.tokens import TokenCount, count_tokens, file_tokens
from llmmixer.core.contracts import Attachment, Usage
from llmmixer.core.plans import PlanContext, limits_for, planner_prompt
from llmmixer.core.spec import (
    AgentStep,
    ApprovalStep,
    DecomposeStep,
    FallbackTarget,
    LlmStep,
    PtyStep,
    Spec,
    text_parts,
)
from llmmixer.core.templates import references, render
from llmmixer.core.tools import CommandTool
from llmmixer.workflows.calls import target_chain
from llmmixer.workflows.reuse import DEFAULT_JUDGE_INSTRUCTION

__all__ = [
    "ASSUMED_MAX_TOKENS",
    "ASSUMED_TOOL_RESULT_TOKENS",
    "EXPECTED_OUTPUT_SHARE",
    "Estimate",
    "Span",
    "StepEstimate",
    "add_estimate_parser",
    "cmd_estimate",
    "estimate_spec",
    "format_estimate",
]

ASSUMED_MAX_TOKENS = 4096
# A tool result the spec gives no bound for (an MCP server's, a spec's output).
ASSUMED_TOOL_RESULT_TOKENS = 4096
EXPECTED_OUTPUT_SHARE = 0.5
# What a command's or an agent's output is expected to hold for a step that
# reads it; its maximum is the step's max_output_bytes, at ~4 bytes a token.
_COMMAND_OUTPUT_EXPECTED = 200
_BYTES_PER_TOKEN = 4
_AGENT_OUTPUT_BYTES = 1024 * 1024
# The judge's default instruction is DEFAULT_JUDGE_INSTRUCTION (steps/llm.py
# sends it); each candidate's heading costs about this many tokens.
_CANDIDATE_HEADING_TOKENS = 12


@dataclass(frozen=True)
class Span:
    """A low / expected / high triple (tokens or USD)."""

    low: float = 0
    expected: float = 0
    high: float = 0

    def __add__(self, other: Span) -> Span:
        return Span(self.low + other.low, self.expected + other.expected, self.high + other.high)

    def times(self, low: float, expected: float, high: float) -> Span:
        return Span(self.low * low, self.expected * expected, self.high * high)

    def capped(self, high: float) -> Span:
        return Span(min(self.low, high), min(self.expected, high), min(self.high, high))


def _sum(spans: Iterable[Span]) -> Span:
    total = Span()
    for span in spans:
        total += span
    return total


@dataclass(frozen=True)
class StepEstimate:
    step: str
    kind: str
    models: list[str]
    calls: Span
    input_tokens: Span
    output_tokens: Span
    cost_usd: Span
    tokenizer: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Estimate:
    spec: str
    steps: list[StepEstimate]
    tokens: Span
    cost_usd: Span
    budget_max_cost_usd: float | None
    budget_max_tokens: int | None
    unpriced: list[str]
    warnings: list[str]
    # The spec is a dry run: the estimate is of running it for real.
    dry_run: bool = False

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Call:
    """One provider call's cost and tokens across its bounds."""

    input_tokens: Span
    output_tokens: Span
    cost_usd: Span


class _Estimator:
    def __init__(self, spec: Spec, prices: PriceTable, files: Mapping[str, bytes]) -> None:
        self.spec = spec
        self.prices = prices
        # sha256 -> bytes of the file inputs this process could read.
        self.files = {hashlib.sha256(data).hexdigest(): data for data in files.values()}
        self.outputs: dict[str, Span] = {}  # output tokens of each step, for its readers
        self.children: dict[str, Span] = {}
        self.unpriced: set[str] = set()
        self.warnings: list[str] = []

    # ---- pieces -----------------------------------------------------------

    def cap(self, step: LlmStep | DecomposeStep, notes: list[str]) -> int:
        cap = step.max_tokens or self.spec.defaults.max_tokens
        if cap is None:
            notes.append(f"no max_tokens: assumed {ASSUMED_MAX_TOKENS} per reply")
            self.warnings.append(
                f"step {step.id}: max_tokens: not set, so its output is not bounded; "
                f"the estimate assumes {ASSUMED_MAX_TOKENS}: set max_tokens to bound it"
            )
            return ASSUMED_MAX_TOKENS
        return cap

    def referenced(self, *texts: str | None) -> Span:
        """Output tokens of the steps ``texts`` read, each reference counted."""
        total = Span()
        for text in texts:
            for ref in references(text or ""):
                if ref.kind == "step":
                    total += self.outputs.get(ref.name, Span())
                elif ref.kind == "children":
                    total += self.children.get(ref.name, Span())
                elif ref.kind == "join":
                    total += _sum(s for i, s in self.outputs.items() if i.startswith(ref.name))
                    # A plan names its steps D-1, D-2, ...: a join over D-* reads them.
                    total += _sum(
                        span
                        for parent, span in self.children.items()
                        if f"{parent}-".startswith(ref.name) or ref.name.startswith(f"{parent}-")
                    )
        return total

    def with_files(
        self, target: FallbackTarget, prompt: TokenCount, files: Sequence[Attachment]
    ) -> TokenCount:
        """``prompt`` plus what ``files`` cost ``target`` (client/tokens.py, ``file_tokens``)."""
        if not files:
            return prompt
        counts = [self.file_count(target, f) for f in files]
        return TokenCount(
            prompt.low + sum(c.low for c in counts),
            prompt.expected + sum(c.expected for c in counts),
            prompt.high + sum(c.high for c in counts),
            f"{prompt.method}; files ≈ each provider's published rule",
        )

    def file_count(self, target: FallbackTarget, file: Attachment) -> TokenCount:
        data = self.files.get(file.sha256)
        return file_tokens(target.provider, target.model, file.media_type, file.size, data)

    def file_notes(self, target: FallbackTarget, files: Sequence[Attachment]) -> list[str]:
        notes = []
        for file in files:
            count = self.file_count(target, file)
            tokens = f"{count.expected}" if count.exact else f"{count.low}-{count.high}"
            notes.append(f"{file.name}: {count.method}: {tokens} tokens on {target.provider}")
        return notes

    def rendered(self, text: str | None) -> str:
        # Upstream outputs are not known yet: they count through referenced().
        return render(text or "", self.spec.inputs, {}, {})

    def price(self, target: FallbackTarget, input_tokens: float, output_tokens: float) -> float:
        found = self.prices.price(target.provider, target.model)
        if found is None:
            self.unpriced.add(f"{target.provider}/{target.model}")
            return 0.0
        usage = Usage(input_tokens=math.ceil(input_tokens), output_tokens=math.ceil(output_tokens))
        return found.cost(usage)

    def call(
        self,
        chain: list[FallbackTarget],
        system: str | None,
        messages: list[str],
        upstream: Span,
        cap: int,
        attempts: int,
        files: Sequence[Attachment] = (),
    ) -> tuple[_Call, str]:
        """One call of a step across its chain: min on the cheapest, max on all of it."""
        counts: list[TokenCount] = [
            self.with_files(t, count_tokens(t.provider, t.model, system, messages), files)
            for t in chain
        ]
        first = counts[0]
        expected_out = max(1, math.ceil(cap * EXPECTED_OUTPUT_SHARE))
        low = min(
            self.price(t, c.low + upstream.low, 1) for t, c in zip(chain, counts, strict=True)
        )
        expected = self.price(chain[0], first.expected + upstream.expected, expected_out)
        high = attempts * sum(
            self.price(t, c.high + upstream.high, cap) for t, c in zip(chain, counts, strict=True)
        )
        highest_in = max(c.high for c in counts) + upstream.high
        result = _Call(
            input_tokens=Span(
                min(c.low for c in counts) + upstream.low,
                first.expected + upstream.expected,
                attempts * len(chain) * highest_in,
            ),
            output_tokens=Span(1, expected_out, attempts * len(chain) * cap),
            cost_usd=Span(low, expected, high),
        )
        return result, first.method

    # ---- steps ------------------------------------------------------------

    def step(self, step: Any) -> StepEstimate:
        match step:
            case LlmStep():
                return self.llm(step)
            case DecomposeStep():
                return self.decompose(step)
            case PtyStep():
                self.outputs[step.id] = Span(
                    0, _COMMAND_OUTPUT_EXPECTED, step.max_output_bytes // _BYTES_PER_TOKEN
                )
                return _free(
                    step.id,
                    "pty",
                    "a command: no provider cost; its readers count up to "
                    "max_output_bytes / 4 tokens of its output",
                )
            case AgentStep():
                self.outputs[step.id] = Span(
                    0, _COMMAND_OUTPUT_EXPECTED, _AGENT_OUTPUT_BYTES // _BYTES_PER_TOKEN
                )
                return _free(
                    step.id,
                    "agent",
                    f"{step.agent} spends on its own account: not estimated",
                )
            case ApprovalStep():
                self.outputs[step.id] = Span(0, 0, _COMMAND_OUTPUT_EXPECTED)
                return _free(step.id, "approval", "a person decides: no provider cost")
        raise TypeError(f"step kind {getattr(step, 'kind', step)!r} has no estimate")

    def llm(self, step: LlmStep) -> StepEstimate:
        notes: list[str] = []
        cap = self.cap(step, notes)
        attempts = self.spec.retry(step).max_attempts
        chain = target_chain(self.spec, step)
        system = self.rendered(step.system) if step.system else None
        contents = [text_parts(m.get("content", "")) for m in step.messages or []]
        messages = [self.rendered("\n\n".join(texts)) for texts in contents]
        if step.prompt is not None:
            messages.append(self.rendered(step.prompt))
        texts = [step.system, step.prompt, *(t for texts in contents for t in texts)]
        upstream = self.referenced(*texts)
        files = [
            *(f for m in step.messages or [] for f in self.spec.part_files(m.get("content", ""))),
            *self.spec.attachments(step),
        ]
        notes += self.file_notes(chain[0], files)
        if attempts > 1:
            notes.append(f"max: {attempts} attempts per target")
        if len(chain) > 1:
            notes.append(f"max: all {len(chain)} targets of the fallback chain")
        tools = self.spec.tools(step)
        if step.best_of is None and tools:
            return self.tool_loop(
                step, chain, system, messages, upstream, cap, attempts, notes, files
            )
        if step.best_of is None:
            one, method = self.call(chain, system, messages, upstream, cap, attempts, files)
            self.outputs[step.id] = Span(1, one.output_tokens.expected, cap)
            return StepEstimate(
                step.id,
                "llm",
                _names(chain),
                Span(1, 1, attempts * len(chain)),
                one.input_tokens,
                one.output_tokens,
                one.cost_usd,
                method,
                notes,
            )
        best = step.best_of
        targets = [
            FallbackTarget.model_validate(best.targets[i % len(best.targets)].model_dump())
            if best.targets
            else chain[0]
            for i in range(best.n)
        ]
        candidates = [
            self.call([t], system, messages, upstream, cap, attempts, files) for t in targets
        ]
        judge_chain = (
            [FallbackTarget(provider=best.judge.provider, model=best.judge.model)]
            if best.judge
            else chain[:1]
        )
        instruction = (
            self.rendered(best.judge.prompt)
            if best.judge is not None and best.judge.prompt
            else DEFAULT_JUDGE_INSTRUCTION
        )
        task = messages[-1] if messages else ""
        # The judge reads every candidate's reply: n times one candidate's output.
        answers = _sum(
            Span(c.output_tokens.low, c.output_tokens.expected, cap) for c, _ in candidates
        )
        headings = best.n * _CANDIDATE_HEADING_TOKENS
        answers += Span(headings, headings, headings)
        judge_upstream = upstream + answers
        if best.judge is not None and best.judge.prompt:
            judge_upstream += self.referenced(best.judge.prompt)
        judge, method = self.call(
            judge_chain,
            None,
            [f"{instruction}\n\n## Task\n{task}\n\n"],
            judge_upstream,
            cap,
            attempts,
        )
        calls = [c for c, _ in candidates] + [judge]
        notes.append(f"best_of: {best.n} candidates and a judge")
        self.outputs[step.id] = Span(1, judge.output_tokens.expected, cap)
        return StepEstimate(
            step.id,
            "llm",
            _names([*targets, *judge_chain]),
            Span(best.n + 1, best.n + 1, attempts * (best.n + len(judge_chain))),
            _sum(c.input_tokens for c in calls),
            _sum(c.output_tokens for c in calls),
            _sum(c.cost_usd for c in calls),
            method,
            notes,
        )

    def tool_loop(
        self,
        step: LlmStep,
        chain: list[FallbackTarget],
        system: str | None,
        messages: list[str],
        upstream: Span,
        cap: int,
        attempts: int,
        notes: list[str],
        files: Sequence[Attachment] = (),
    ) -> StepEstimate:
        """An llm step with tools: one to ``max_turns`` model turns per attempt."""
        tools = self.spec.tools(step)
        turns = self.spec.max_turns(step)
        declarations = json.dumps(
            [
                {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": getattr(tool, "parameters", None),
                }
                for tool in tools
            ]
        )
        result = max(
            tool.max_output_bytes // _BYTES_PER_TOKEN
            if isinstance(tool, CommandTool)
            else ASSUMED_TOOL_RESULT_TOKENS
            for tool in tools
        )
        expected_out = max(1, math.ceil(cap * EXPECTED_OUTPUT_SHARE))
        # Per target: one turn's input (prompt, upstream, declarations) ...
        firsts = [
            (
                target,
                self.with_files(
                    target, count_tokens(target.provider, target.model, system, messages), files
                ),
                count_tokens(target.provider, target.model, None, [declarations]),
            )
            for target in chain
        ]
        # ... and all turns, the k-th re-sending k - 1 replies and tool results.
        growth = (cap + result) * turns * (turns - 1) // 2
        highs = [
            (target, turns * (prompt.high + upstream.high + decl.high) + growth)
            for target, prompt, decl in firsts
        ]
        first, prompt, decl = firsts[0]
        one_turn_low = [(target, p.low + upstream.low + d.low) for target, p, d in firsts]
        likely = min(2, turns)  # one tool call, then the answer
        expected_in = likely * (prompt.expected + upstream.expected + decl.expected) + (
            likely - 1
        ) * (expected_out + _COMMAND_OUTPUT_EXPECTED)
        cost = Span(
            min(self.price(target, tokens, 1) for target, tokens in one_turn_low),
            self.price(first, expected_in, likely * expected_out),
            attempts * sum(self.price(target, tokens, turns * cap) for target, tokens in highs),
        )
        notes.append(
            f"tools: min 1 model turn, expected 2, max {turns} (max_turns), each re-sending "
            f"the conversation so far with one tool result of up to {result} tokens per turn"
        )
        if attempts > 1 or len(chain) > 1:
            notes.append(f"max: {turns} turns for each attempt on each target")
        self.outputs[step.id] = Span(1, expected_out, cap)
        return StepEstimate(
            step.id,
            "llm",
            _names(chain),
            Span(1, likely, attempts * len(chain) * turns),
            Span(
                min(tokens for _, tokens in one_turn_low),
                expected_in,
                attempts * len(chain) * max(tokens for _, tokens in highs),
            ),
            Span(1, likely * expected_out, attempts * len(chain) * turns * cap),
            cost,
            prompt.method,
            notes,
        )

    def decompose(self, step: DecomposeStep) -> StepEstimate:
        notes: list[str] = []
        cap = self.cap(step, notes)
        attempts = self.spec.retry(step).max_attempts
        chain = target_chain(self.spec, step)
        limits = limits_for(step)
        context = PlanContext(
            step_id=step.id,
            limits=limits,
            spec=self.spec,
            taken_ids=frozenset(s.id for s in self.spec.steps),
        )
        prompt = planner_prompt(self.rendered(step.prompt), context)
        system = self.rendered(step.system) if step.system else None
        upstream = self.referenced(step.prompt, step.system)
        # A refused plan is asked for again, up to max_attempts times, each
        # ask retried by Temporal as configured.
        planner, method = self.call(chain, system, [prompt], upstream, cap, attempts * attempts)
        notes.append(f"planner: up to {attempts} plans x {attempts} attempts")

        nesting = "decompose" in limits.kinds and limits.max_depth > 1
        most = limits.max_steps ** (limits.max_depth if nesting else 1)
        some = math.ceil(limits.max_steps / 2)
        notes.append(
            f"sub-steps: 1 to {most}"
            + (f" ({limits.max_steps}^{limits.max_depth}: plans may nest)" if nesting else "")
        )
        sub_cap = self.spec.defaults.max_tokens or ASSUMED_MAX_TOKENS
        sub_attempts = self.spec.defaults.retry.max_attempts
        models = self.plan_models(step, chain, notes)
        # A sub-step's prompt is written by the plan (at most the planner's
        # reply), and it may read the steps before it.
        sub_in_low = count_tokens(models[0].provider, models[0].model, None, ["task"]).low
        sub_input = Span(
            sub_in_low,
            planner.output_tokens.expected / some + upstream.expected,
            cap + upstream.high + (limits.max_steps - 1) * sub_cap,
        )
        prices = [
            (
                self.price(m, sub_input.low, 1),
                self.price(m, sub_input.expected, sub_cap * EXPECTED_OUTPUT_SHARE),
                self.price(m, sub_input.high, sub_cap),
            )
            for m in models
        ]
        sub_cost = Span(
            min(p[0] for p in prices),
            some * prices[0][1],
            most * sub_attempts * max(p[2] for p in prices),
        )
        sub_tokens_in = Span(
            sub_input.low, some * sub_input.expected, most * sub_attempts * sub_input.high
        )
        sub_tokens_out = Span(
            1, some * sub_cap * EXPECTED_OUTPUT_SHARE, most * sub_attempts * sub_cap
        )
        budget = step.budget
        if budget is not None and budget.max_cost_usd is not None:
            # A sub-step starts only while the budget has room; the last one
            # started may overshoot it by its own cost.
            sub_cost = sub_cost.capped(budget.max_cost_usd + max(p[2] for p in prices))
            notes.append(f"sub-steps capped by budget max_cost_usd {budget.max_cost_usd:g}")
        if budget is not None and budget.max_tokens is not None:
            bound = budget.max_tokens + sub_input.high + sub_cap
            share = sub_tokens_in.high / max(1, sub_tokens_in.high + sub_tokens_out.high)
            sub_tokens_in = sub_tokens_in.capped(bound * share)
            sub_tokens_out = sub_tokens_out.capped(bound * (1 - share))
            tokens_share = bound / max(1, most * sub_attempts * (sub_input.high + sub_cap))
            if tokens_share < 1:
                sub_cost = Span(sub_cost.low, sub_cost.expected, sub_cost.high * tokens_share)
            notes.append(f"sub-steps capped by budget max_tokens {budget.max_tokens}")
        per_child = Span(1, sub_cap * EXPECTED_OUTPUT_SHARE, sub_cap)
        self.outputs[step.id] = Span(1, planner.output_tokens.expected, cap)
        self.children[step.id] = per_child.times(1, some, most)
        return StepEstimate(
            step.id,
            "decompose",
            _names([*chain, *models]),
            Span(2, 1 + some, attempts * attempts * len(chain) + most * sub_attempts),
            planner.input_tokens + sub_tokens_in,
            planner.output_tokens + sub_tokens_out,
            planner.cost_usd + sub_cost,
            method,
            notes,
        )

    def plan_models(
        self, step: DecomposeStep, chain: list[FallbackTarget], notes: list[str]
    ) -> list[FallbackTarget]:
        """The models a plan's steps may use: the step's own first, then routes and allow."""
        named = [chain[0]]
        named += [
            FallbackTarget(provider=t.provider, model=t.model)
            for targets in self.spec.routes.values()
            for t in targets
        ]
        named += [
            FallbackTarget(provider=rule.provider, model=rule.model)
            for rule in self.spec.allow or []
            if rule.model
        ]
        if self.spec.allow is None or any(rule.model is None for rule in self.spec.allow):
            notes.append("a plan may name models not listed: their cost is not bounded here")
        unique: dict[tuple[str, str], FallbackTarget] = {}
        for target in named:
            unique.setdefault((target.provider, target.model), target)
        return list(unique.values())


def _names(targets: Iterable[FallbackTarget]) -> list[str]:
    return list(dict.fromkeys(f"{t.provider}/{t.model}" for t in targets))


def _free(step_id: str, kind: str, note: str) -> StepEstimate:
    return StepEstimate(step_id, kind, [], Span(), Span(), Span(), Span(), "", [note])


def _order(spec: Spec) -> list[Any]:
    """The steps in an order where each comes after those it needs."""
    done: set[str] = set()
    ordered: list[Any] = []
    pending = list(spec.steps)
    while pending:
        ready = [s for s in pending if set(s.needs) <= done] or pending[:1]
        for step in ready:
            ordered.append(step)
            done.add(step.id)
            pending.remove(step)
    return ordered


def estimate_spec(
    spec: Spec, prices: PriceTable | None = None, files: Mapping[str, bytes] | None = None
) -> Estimate:
    """The cost forecast of ``spec`` (validated, with its inputs merged).

    ``files`` (input name -> bytes, ``client.files.read_file_inputs``) lets
    images be counted by their width and height and PDFs by their pages;
    a file without its bytes is counted by its type and size alone.
    """
    estimator = _Estimator(spec, prices or PriceTable.load(), files or {})
    by_order = {s.id: estimator.step(s) for s in _order(spec)}
    steps = [by_order[s.id] for s in spec.steps]
    tokens = _sum(s.input_tokens + s.output_tokens for s in steps)
    cost = _sum(s.cost_usd for s in steps)
    warnings = list(estimator.warnings)
    unpriced = sorted(estimator.unpriced)
    if unpriced:
        warnings.append(
            f"no price for {', '.join(unpriced)}: counted as $0; add them to prices.toml"
        )
    budget = spec.budget
    if budget is not None and budget.max_cost_usd is not None and cost.high > budget.max_cost_usd:
        warnings.append(
            f"budget: worst case ${cost.high:.4f} exceeds max_cost_usd {budget.max_cost_usd:g}; "
            "the run would wait for a person there (`llmmixer raise-budget`)"
        )
    if budget is not None and budget.max_tokens is not None and tokens.high > budget.max_tokens:
        warnings.append(
            f"budget: worst case {int(tokens.high)} tokens exceeds max_tokens {budget.max_tokens}; "
            "the run would wait for a person there (`llmmixer raise-budget`)"
        )
    return Estimate(
        spec=spec.name,
        steps=steps,
        tokens=tokens,
        cost_usd=cost,
        budget_max_cost_usd=budget.max_cost_usd if budget else None,
        budget_max_tokens=budget.max_tokens if budget else None,
        unpriced=unpriced,
        warnings=warnings,
        dry_run=spec.dry_run,
    )


# ---- the table ------------------------------------------------------------------


def _usd(value: float) -> str:
    return f"${value:.4f}" if value < 100 else f"${value:,.2f}"


def _tokens(span: Span) -> str:
    low, high = int(span.low), int(span.high)
    return f"{low}" if low == high else f"{low}-{high}"


def format_estimate(estimate: Estimate) -> str:
    """The table ``llmmixer estimate`` prints: one row per step, then the total."""
    header = ("step", "kind", "models", "input tok", "output tok", "min", "expected", "max")
    rows = [header]
    for step in estimate.steps:
        rows.append(
            (
                step.step,
                step.kind,
                ", ".join(step.models) or "-",
                _tokens(step.input_tokens),
                _tokens(step.output_tokens),
                _usd(step.cost_usd.low),
                _usd(step.cost_usd.expected),
                _usd(step.cost_usd.high),
            )
        )
    total = estimate.cost_usd
    rows.append(
        (
            "total",
            "",
            "",
            _tokens(_sum(s.input_tokens for s in estimate.steps)),
            _tokens(_sum(s.output_tokens for s in estimate.steps)),
            _usd(total.low),
            _usd(total.expected),
            _usd(total.high),
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    title = f"estimate for {estimate.spec}"
    if estimate.dry_run:
        title += " run for real (a dry run costs nothing)"
    lines = [title]
    for number, row in enumerate(rows):
        if number == len(rows) - 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    methods = sorted({s.tokenizer for s in estimate.steps if s.tokenizer})
    lines.append("input tokens: " + "; ".join(methods) if methods else "no provider calls")
    for step in estimate.steps:
        if step.notes:
            lines.append(f"  {step.step}: " + "; ".join(step.notes))
    if estimate.budget_max_cost_usd is not None or estimate.budget_max_tokens is not None:
        limits = []
        if estimate.budget_max_cost_usd is not None:
            limits.append(f"max_cost_usd {estimate.budget_max_cost_usd:g}")
        if estimate.budget_max_tokens is not None:
            limits.append(f"max_tokens {estimate.budget_max_tokens}")
        lines.append("budget: " + ", ".join(limits))
    lines += [f"warning: {warning}" for warning in estimate.warnings]
    return "\n".join(lines)


def estimate_json(estimate: Estimate) -> str:
    return json.dumps(estimate.as_json(), indent=2)


def add_estimate_parser(sub: Any) -> None:
    """``llmmixer estimate SPEC... [--input k=v] [--json]``."""
    estimate = sub.add_parser("estimate", help="what a spec will cost: min, expected, max per step")
    estimate.add_argument("spec", nargs="+", help="one or more spec files")
    estimate.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an input (value @file reads a file)",
    )
    estimate.add_argument("--json", action="store_true", help="print the estimate as JSON")


def cmd_estimate(args: Any) -> int:
    """Exit 0, or 2 when a spec is invalid (the others are still estimated)."""
    import sys

    from llmmixer.client.files import read_file_inputs, spec_dir
    from llmmixer.client.specfile import parse_inputs, prepare_spec, read_spec
    from llmmixer.core.validation import SpecError

    table = PriceTable.load()
    code = 0
    documents = []
    for number, source in enumerate(args.spec):
        inputs = parse_inputs(args.input)
        try:
            spec = prepare_spec(source, inputs=inputs)[1]
        except SpecError as error:
            for issue in error.issues:
                print(f"{source}: {issue}", file=sys.stderr)
            code = 2
            continue
        own = read_spec(source).get("inputs")
        files = read_file_inputs(
            {**(own if isinstance(own, dict) else {}), **inputs}, base_dir=spec_dir(source)
        )
        estimate = estimate_spec(spec, table, files)
        if args.json:
            documents.append({"file": source, **estimate.as_json()})
            continue
        if number:
            print()
        if len(args.spec) > 1:
            print(f"== {source}")
        print(format_estimate(estimate))
    if args.json and documents:
        print(json.dumps(documents if len(args.spec) > 1 else documents[0], indent=2))
    return code
