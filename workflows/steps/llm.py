"""``kind: llm``: ask a model through its chain of targets, or ``best_of`` several."""

from __future__ import annotations

import asyncio

from temporalio.exceptions import ActivityError

from llmmixer.core.contracts import (
    LLM_ACTIVITY,
    ChatMessage,
    EventType,
    LlmReply,
    PlanRequest,
    ToolDeclaration,
)
from llmmixer.core.spec import DecomposeStep, FallbackTarget, LlmStep, text_parts
from llmmixer.workflows.calls import falls_back, llm_call, llm_options, target_chain
from llmmixer.workflows.records import Candidate, FallbackNote
from llmmixer.workflows.reuse import DEFAULT_JUDGE_INSTRUCTION, best_of_hash, chain_hash
from llmmixer.workflows.steps.base import (
    Completed,
    Outcome,
    StepContext,
    StepFailed,
    describe_failure,
    execute_activity,
)
from llmmixer.workflows.steps.budget import budget_gate
from llmmixer.workflows.steps.hedge import hedged_call
from llmmixer.workflows.steps.tools import run_tool_loop


async def run_llm(ctx: StepContext, step: LlmStep) -> Outcome:
    settled = await budget_gate(ctx, step)
    if settled is not None:
        return settled
    messages, system = _compose(ctx, step)
    if step.best_of is not None:
        digest = best_of_hash(ctx.spec, step, messages, system, _judge_instruction(ctx, step))
        reused = ctx.reuse_or_note_digest(step.id, digest)
        if reused is not None:
            return reused
        return Completed(await _best_of(ctx, step, messages, system))
    chain = target_chain(ctx.spec, step)
    # The whole chain, not the target that answered: reuse holds while it is unchanged.
    reused = ctx.reuse_or_note_digest(step.id, chain_hash(ctx.spec, step, messages, system))
    if reused is not None:
        return reused
    # Runs recorded before tool loops existed asked once, without tools.
    tools = ctx.spec.tools(step) if ctx.tool_loop else []
    if tools:

        async def turn(
            conversation: list[ChatMessage],
            system: str | None,
            declarations: list[ToolDeclaration],
            label: str,
        ) -> LlmReply:
            return await ask(
                ctx, step, chain, conversation, system, tools=declarations, label=label
            )

        return await run_tool_loop(ctx, step, tools, lambda: _compose(ctx, step), turn)
    reply = await ask(ctx, step, chain, messages, system)
    return Completed(reply.text)


def _compose(ctx: StepContext, step: LlmStep) -> tuple[list[ChatMessage], str | None]:
    """The step's messages and system prompt, rendered (a person's retry prompt included)."""
    prompt = ctx.prompt(step.id, step.prompt)
    messages = []
    for message in step.messages or []:
        content = message["content"]
        # A message's text parts are one text; its file parts go with that
        # turn, in their order (providers are sent a turn's files before its text).
        text = "\n\n".join(ctx.render(part, step.id) for part in text_parts(content))
        messages.append(
            ChatMessage.model_validate(
                {
                    "role": message["role"],
                    "content": text,
                    "attachments": ctx.spec.part_files(content),
                }
            )
        )
    if prompt is not None:
        messages.append(ChatMessage(role="user", content=ctx.render(prompt, step.id)))
    # `attachments:` go with the last turn, after the files its parts place
    # there: references only, the worker loads the bytes.
    files = ctx.spec.attachments(step)
    if files and messages:
        *earlier, last = messages
        messages = [*earlier, last.model_copy(update={"attachments": [*last.attachments, *files]})]
    ctx.state.note_prompt(step.id, messages[-1].content if messages else None)
    system = ctx.render(step.system, step.id) if step.system else None
    return messages, system


async def ask(
    ctx: StepContext,
    step: LlmStep | DecomposeStep,
    chain: list[FallbackTarget],
    messages: list[ChatMessage],
    system: str | None,
    *,
    plan: PlanRequest | None = None,
    label: str = "",
    track: bool = True,
    tools: list[ToolDeclaration] | None = None,
) -> LlmReply:
    """One answer through ``chain`` (primary, then fallbacks), accounted on the step.

    With ``track=False`` (best_of candidates, which run side by side) the
    record's provider/model/latency are left for the caller to set.
    Raises ``StepFailed`` when the last target failed.
    """
    spec, state = ctx.spec, ctx.state
    hedge = spec.hedge(step)
    for index, target in enumerate(chain):
        has_next = index < len(chain) - 1
        call = llm_call(
            spec,
            step,
            target,
            messages,
            system,
            workflow_id=state.workflow_id,
            has_fallback=has_next,
            plan=plan,
            tools=tools,
        )
        if track:
            state.note_target(step.id, target.provider, target.model)
        summary = f"{step.id}{label}: {target.provider}/{target.model}"
        try:
            if hedge is not None:
                reply = await hedged_call(ctx, step, hedge, chain, index, call, summary)
            else:
                reply = await execute_activity(
                    LLM_ACTIVITY, call, LlmReply, llm_options(spec, step), summary
                )
        except ActivityError as error:
            attempts, message, error_type = describe_failure(error, spec.retry(step))
            state.count_attempts(step.id, attempts)
            if not has_next or not falls_back(step, error_type):
                raise StepFailed(message) from None
            state.note_fallback(
                step.id,
                FallbackNote(
                    provider=target.provider,
                    model=target.model,
                    error=message,
                    error_type=error_type,
                ),
            )
            continue
        state.account_reply(step.id, reply, track=track)
        # Replies recorded before ``unsent_from`` existed carry the text in
        # ``unsent_text``; newer ones point into ``text``. Either way the event
        # stream is workflow state, not a command, so replays of both agree
        # without a patch.
        unsent = reply.unsent_text
        if not unsent and reply.unsent_from is not None:
            unsent = reply.text[reply.unsent_from :]
        if unsent:
            ctx.events.publish(EventType.STEP_DELTA, step.id, reply.attempt, {"text": unsent})
        return reply
    raise StepFailed("no provider in the chain answered")  # unreachable: chain is non-empty


async def _best_of(
    ctx: StepContext, step: LlmStep, messages: list[ChatMessage], system: str | None
) -> str:
    """N candidates side by side (one activity each), then a judge picks or merges."""
    assert step.best_of is not None
    best = step.best_of
    own = target_chain(ctx.spec, step)
    targets = [
        FallbackTarget.model_validate(best.targets[i % len(best.targets)].model_dump())
        if best.targets
        else own[0]
        for i in range(best.n)
    ]

    async def candidate(number: int, target: FallbackTarget) -> Candidate:
        try:
            reply = await ask(
                ctx, step, [target], messages, system, label=f" #{number}", track=False
            )
        except StepFailed as failure:
            return Candidate(provider=target.provider, model=target.model, error=str(failure))
        return Candidate(
            provider=reply.provider,
            model=reply.model,
            output=reply.text,
            usage=reply.usage,
            cost_usd=reply.cost_usd,
        )

    # gather keeps the candidates in their numbered order whatever order
    # they finish in, so the judge's prompt is the same on every replay.
    candidates = await asyncio.gather(*(candidate(i + 1, t) for i, t in enumerate(targets)))
    ctx.state.set_candidates(step.id, candidates)
    answered = [(i + 1, c) for i, c in enumerate(candidates) if c.output is not None]
    if not answered:
        errors = "; ".join(f"#{i + 1}: {c.error}" for i, c in enumerate(candidates))
        raise StepFailed(f"every best_of candidate failed: {errors}")
    judge = best.judge
    instruction = _judge_instruction(ctx, step)
    task = messages[-1].content if messages else ""
    numbered = "\n\n".join(
        f"### Candidate {number} ({c.provider}/{c.model})\n{c.output}" for number, c in answered
    )
    judge_messages = [
        ChatMessage(role="user", content=f"{instruction}\n\n## Task\n{task}\n\n{numbered}")
    ]
    judge_chain = [FallbackTarget(provider=judge.provider, model=judge.model)] if judge else own[:1]
    reply = await ask(ctx, step, judge_chain, judge_messages, None, label=" judge")
    return reply.text


def _judge_instruction(ctx: StepContext, step: LlmStep) -> str:
    judge = step.best_of.judge if step.best_of is not None else None
    if judge is not None and judge.prompt:
        return ctx.render(judge.prompt, step.id)
    return DEFAULT_JUDGE_INSTRUCTION
