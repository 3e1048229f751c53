"""Hedged calls: a second call when the first has streamed nothing after a while.

``hedge: {after_s: 2}`` (or ``{after: p95}``, learned by the worker) on an
llm step: the step's call starts as usual, carrying a ``HedgeTrigger``. The
LLM activity watches for its first token; when the delay is up without one,
it signals the workflow (``HedgeStart``: the delay and how it was found).
Only then does a second call start, on the hedge's target (the chain's next
target, or the same one); the first complete answer wins and the other is
cancelled. A call that streams in time sends nothing and costs the run no
extra history; a call that has started streaming is never hedged, however
long its answer takes.

Both calls count toward the step's usage and cost (``RunState.account_hedge``)
and the step's record keeps a ``HedgeNote`` saying who won and why the second
call started; the run's history shows both activities.

Determinism: whether and when a hedge starts is the signal, which is in
history with the delay the worker found; the signal name comes from
``workflow.uuid4()``; the race is decided by the order in which Temporal
delivers the results, which replays the same. Specs without ``hedge`` never
reach this module, so their runs issue exactly the commands they did before
(and no recorded run can have had a ``hedge``: older releases refused the
field), which is why no ``workflow.patched`` id guards it.
"""

from __future__ import annotations

import asyncio

from temporalio import workflow
from temporalio.exceptions import ActivityError

from llmmixer.core.contracts import (
    HEDGE_COST_ACTIVITY,
    LLM_ACTIVITY,
    HedgeCost,
    HedgeCostRequest,
    HedgeStart,
    HedgeTrigger,
    LlmCall,
    LlmReply,
    Usage,
)
from llmmixer.core.spec import FallbackTarget, Hedge
from llmmixer.workflows.calls import (
    HEDGE_OPTIONS,
    ModelStep,
    StepActivityOptions,
    hedge_target,
    hedged_options,
)
from llmmixer.workflows.records import HedgeNote
from llmmixer.workflows.steps.base import StepContext

__all__ = ["hedged_call"]

# The signal a slow call sends to ask for its hedge; a name per call, never reused.
HEDGE_SIGNAL_PREFIX = "llmmixer.hedge."


async def hedged_call(
    ctx: StepContext,
    step: ModelStep,
    hedge: Hedge,
    chain: list[FallbackTarget],
    index: int,
    call: LlmCall,
    summary: str,
) -> LlmReply:
    """The reply to ``call`` (to ``chain[index]``), hedged as ``hedge`` says.

    Raises ``ActivityError`` like a plain call when it failed (both calls,
    when a hedge started), so the step's fallbacks apply as they always do.
    """
    state = ctx.state
    signal = HEDGE_SIGNAL_PREFIX + str(workflow.uuid4())
    asked: list[HedgeStart] = []

    # A lambda: the SDK reads a handler's type hints when it is set, and
    # resolving string annotations in the sandbox, for every step of a wide
    # stage in one workflow task, took long enough to trip the deadlock
    # detector. The argument comes as JSON and is validated here.
    workflow.set_signal_handler(signal, lambda start: _note_hedge(asked, start))
    trigger = HedgeTrigger(
        signal=signal,
        after_s=hedge.after_s,
        after=hedge.after,
        min_s=hedge.min_s,
        default_s=hedge.default_s,
        min_samples=hedge.min_samples,
    )
    options = hedged_options(ctx.spec, step)
    primary = _start(call.model_copy(update={"hedge": trigger}), options, summary)
    second: asyncio.Task[LlmReply] | None = None
    try:
        await workflow.wait_condition(lambda: primary.done() or bool(asked))
        # A second call would only cost when the first has ended meanwhile
        # or the step's budget is spent.
        if primary.done() or state.over_budget(call.step_id) is not None:
            return await primary
        [start] = asked
        other = hedge_target(chain, index, hedge)
        second = _start(
            call.model_copy(
                update={
                    "provider": other.provider,
                    "model": other.model,
                    "base_url": other.base_url,
                }
            ),
            options,
            f"{summary} hedge: {other.provider}/{other.model}",
        )
        note = HedgeNote(
            provider=call.provider,
            model=call.model,
            hedge_provider=other.provider,
            hedge_model=other.model,
            after_s=start.delay_s,
            reason=start.reason(call.provider, call.model),
        )
        return await _race(ctx, call.step_id, primary, second, note)
    finally:
        workflow.set_signal_handler(signal, None)
        for handle in (primary, second):
            if handle is not None and not handle.done():
                handle.cancel()


def _note_hedge(asked: list[HedgeStart], start: object) -> None:
    if not asked:  # a retried attempt may ask again
        asked.append(HedgeStart.model_validate(start))


def _start(call: LlmCall, options: StepActivityOptions, summary: str) -> asyncio.Task[LlmReply]:
    handle = workflow.start_activity(
        LLM_ACTIVITY,
        call,
        result_type=LlmReply,
        task_queue=options.task_queue,
        start_to_close_timeout=options.start_to_close_timeout,
        heartbeat_timeout=options.heartbeat_timeout,
        retry_policy=options.retry_policy,
        cancellation_type=options.cancellation_type,
        summary=summary,
    )
    # The loser's outcome is read only when it ended first; never "unretrieved".
    handle.add_done_callback(lambda task: task.cancelled() or task.exception())
    return handle


async def _race(
    ctx: StepContext,
    step_id: str,
    primary: asyncio.Task[LlmReply],
    second: asyncio.Task[LlmReply],
    note: HedgeNote,
) -> LlmReply:
    """The first complete answer of the two; the loser is cancelled and charged."""
    while True:
        running = [handle for handle in (primary, second) if not handle.done()]
        if running:
            await workflow.wait(running, return_when=asyncio.FIRST_COMPLETED)
        # Primary first when both ended in the same workflow task: replays agree.
        for winner, handle, loser in (("primary", primary, second), ("hedge", second, primary)):
            if _answered(handle):
                reply = handle.result()
                ended = loser.done()
                if not ended:
                    loser.cancel()
                await _charge_loser(ctx, step_id, note, winner, reply, loser, ended)
                return reply
        if primary.done() and second.done():
            ctx.state.account_hedge(step_id, note)
            error = primary.exception()
            assert isinstance(error, ActivityError)
            raise error


def _answered(handle: asyncio.Task[LlmReply]) -> bool:
    return handle.done() and not handle.cancelled() and handle.exception() is None


async def _charge_loser(
    ctx: StepContext,
    step_id: str,
    note: HedgeNote,
    winner: str,
    reply: LlmReply,
    loser: asyncio.Task[LlmReply],
    ended: bool,
) -> None:
    provider, model = (
        (note.hedge_provider, note.hedge_model)
        if winner == "primary"
        else (note.provider, note.model)
    )
    note = note.model_copy(update={"winner": winner})
    if ended:
        # It ended too: a failure costs nothing known, an answer its own usage.
        if _answered(loser):
            other = loser.result()
            note = note.model_copy(
                update={"loser_usage": other.usage, "loser_cost_usd": other.cost_usd}
            )
    elif not reply.dry_run:
        # Cancelled while running: the provider bills the prompt it read,
        # which is the winner's prompt.
        usage = Usage(input_tokens=reply.usage.input_tokens)
        cost = await workflow.execute_activity(
            HEDGE_COST_ACTIVITY,
            HedgeCostRequest(provider=provider, model=model, usage=usage),
            result_type=HedgeCost,
            start_to_close_timeout=HEDGE_OPTIONS.start_to_close_timeout,
            retry_policy=HEDGE_OPTIONS.retry_policy,
            summary=f"hedge: price of the cancelled call to {provider}/{model}",
        )
        note = note.model_copy(
            update={"loser_usage": usage, "loser_cost_usd": cost.cost_usd, "loser_estimated": True}
        )
    ctx.state.account_hedge(step_id, note)
