"""Hedged calls: a second call when the first has streamed nothing after a while.

``hedge: {after_s: 2}`` (or ``{after: p95}``, learned by the worker) on an
llm step: the step's call starts as usual, carrying a signal name. The LLM
activity sends that signal when its first token arrives. If neither the
signal nor the reply has come when the delay is up, a second call starts on
the hedge's target (the chain's next target, or the same one), and the
first complete answer wins; the other is cancelled. A call that has started
streaming is never hedged, however long its answer takes.

Both calls count toward the step's usage and cost (``RunState.account_hedge``)
and the step's record keeps a ``HedgeNote`` saying who won and why the second
call started; the run's history shows both activities.

Determinism: the delay is a constant of the spec or the result of
``HEDGE_DELAY_ACTIVITY`` (in history), the signal name comes from
``workflow.uuid4()``, and the race is decided by the order in which Temporal
delivers the results, which replays the same. Specs without ``hedge`` never
reach this module, so their runs issue exactly the commands they did before.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

from llmmixer.core.contracts import (
    HEDGE_COST_ACTIVITY,
    HEDGE_DELAY_ACTIVITY,
    LLM_ACTIVITY,
    HedgeCost,
    HedgeCostRequest,
    HedgeDelay,
    HedgeDelayRequest,
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

# Signal names of first tokens; one per hedged call, never reused.
FIRST_TOKEN_SIGNAL_PREFIX = "llmmixer.first_token."


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
    delay_s, why = await _delay(hedge, call)
    signal = FIRST_TOKEN_SIGNAL_PREFIX + str(workflow.uuid4())
    seen: list[bool] = []
    workflow.set_signal_handler(signal, lambda: seen.append(True))
    options = hedged_options(ctx.spec, step)
    primary = _start(call.model_copy(update={"first_token_signal": signal}), options, summary)
    second: asyncio.Task[LlmReply] | None = None
    try:
        try:
            await workflow.wait_condition(
                lambda: primary.done() or bool(seen),
                timeout=timedelta(seconds=delay_s),
                timeout_summary=f"hedge of {summary} after {delay_s:g} s",
            )
        except TimeoutError:
            pass
        # Streaming already, or over budget: a second call would only cost.
        if primary.done() or seen or state.over_budget(call.step_id) is not None:
            return await primary
        other = hedge_target(chain, index, hedge)
        second = _start(
            call.model_copy(
                update={
                    "provider": other.provider,
                    "model": other.model,
                    "base_url": other.base_url,
                    "first_token_signal": None,
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
            after_s=delay_s,
            reason=f"no first token from {call.provider}/{call.model} after {why}",
        )
        return await _race(ctx, call.step_id, primary, second, note)
    finally:
        workflow.set_signal_handler(signal, None)
        for handle in (primary, second):
            if handle is not None and not handle.done():
                handle.cancel()


async def _delay(hedge: Hedge, call: LlmCall) -> tuple[float, str]:
    """(seconds, the same in words for the record) before a second call starts."""
    if hedge.after_s is not None:
        return hedge.after_s, f"{hedge.after_s:g} s (after_s)"
    assert hedge.after is not None
    found = await workflow.execute_activity(
        HEDGE_DELAY_ACTIVITY,
        HedgeDelayRequest(
            provider=call.provider,
            model=call.model,
            percentile=hedge.after,
            min_s=hedge.min_s,
            default_s=hedge.default_s,
            min_samples=hedge.min_samples,
        ),
        result_type=HedgeDelay,
        start_to_close_timeout=HEDGE_OPTIONS.start_to_close_timeout,
        retry_policy=HEDGE_OPTIONS.retry_policy,
        summary=f"hedge delay {hedge.after}: {call.provider}/{call.model}",
    )
    if found.learned:
        return found.delay_s, (
            f"{found.delay_s:.3g} s ({hedge.after} of the last {found.samples} first tokens "
            "of that model on the worker)"
        )
    return found.delay_s, (
        f"{found.delay_s:g} s (default_s: the worker has seen {found.samples} first tokens "
        f"of that model, {hedge.after} needs {hedge.min_samples})"
    )


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
