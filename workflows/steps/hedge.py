"""Hedged calls: another call when the latest has streamed nothing after a while.

``hedge: {after_s: 2}`` (or ``{after: p95}``, learned by the worker) on an
llm step: the step's call starts as usual, carrying a ``HedgeTrigger``. The
LLM activity watches for its first token; when the delay is up without one,
it signals the workflow (``HedgeStart``: the delay and how it was found).
Only then does a second call start, on the hedge's target (the chain's next
target, or the same one). With ``max: 2`` or more, that hedge carries a
trigger of its own and, when it too has streamed nothing for its delay,
asks for a third call (the chain's target after that), and so on up to
``max`` hedges. The first complete answer wins and the others are
cancelled. A call that streams in time sends nothing and costs the run no
extra history; a call that has started streaming is never hedged, however
long its answer takes. When further hedges may follow, a call that asked and
then begins to stream says so (``HedgeStart.streaming``), and no further
hedge starts while it streams.

Every call counts toward the step's usage and cost (``RunState.account_hedge``)
and the step's record keeps a ``HedgeNote`` per hedge saying who won and why
it started; the run's history shows every activity.

Determinism: whether and when a hedge starts is the signal, which is in
history with the delay the worker found; the signal name comes from
``workflow.uuid4()`` (the n-th hedge's own trigger adds ``.n`` to it, so
no more random draws than before); the race is decided by the order in
which Temporal delivers the results, which replays the same. Specs without ``hedge`` never
reach this module, so their runs issue exactly the commands they did before
(and no recorded run can have had a ``hedge``: older releases refused the
field), which is why no ``workflow.patched`` id guards it. With ``max: 1``
(the default) the commands are those of the first release of hedging: the
single hedge carries no trigger, and the loser is cancelled, then priced.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from temporalio import workflow
from temporalio.exceptions import ActivityError
from temporalio.workflow import ActivityHandle

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
from llmmixer.workflows.steps.base import StepContext, start_activity

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

    Raises ``ActivityError`` like a plain call when it failed (all calls,
    when a hedge started: the first call's error), so the step's fallbacks
    apply as they always do.
    """
    state = ctx.state
    signal = HEDGE_SIGNAL_PREFIX + str(workflow.uuid4())
    asked: dict[int, HedgeStart] = {}
    # Calls that asked for a hedge and then began to stream after all.
    streaming: set[int] = set()
    options = hedged_options(ctx.spec, step)
    calls: list[_Call] = []
    notes: list[HedgeNote] = []

    def trigger(number: int) -> HedgeTrigger | None:
        # The last hedge allowed asks for nothing: nothing could answer it.
        if number > hedge.max - 1:
            return None
        name = signal if number == 0 else f"{signal}.{number}"
        workflow.set_signal_handler(name, _asker(asked, streaming, number))
        return HedgeTrigger(
            signal=name,
            after_s=hedge.after_s,
            after=hedge.after,
            min_s=hedge.min_s,
            default_s=hedge.default_s,
            min_samples=hedge.min_samples,
            report_first_token=hedge.max > 1,
        )

    try:
        primary = _start(call.model_copy(update={"hedge": trigger(0)}), options, summary)
        calls.append(_Call(primary, call.provider, call.model))
        await workflow.wait_condition(lambda: primary.done() or 0 in asked)
        # A second call would only cost when the first has ended meanwhile,
        # has begun to stream (its word of that overtook its ask), or the
        # step's budget is spent.
        if primary.done() or 0 in streaming or state.over_budget(call.step_id) is not None:
            return await primary
        more = True
        while True:
            # The earliest call first when several ended in the same workflow
            # task: replays agree.
            for position, entry in enumerate(calls):
                if _answered(entry.handle):
                    return await _settle(ctx, call.step_id, calls, notes, position)
            if all(entry.handle.done() for entry in calls):
                for note in notes:
                    state.account_hedge(call.step_id, note)
                error = primary.exception()
                assert isinstance(error, ActivityError)
                raise error
            number = len(calls)
            # A call streaming now answers soon: no further hedge beside it.
            held = any(i in streaming and not entry.handle.done() for i, entry in enumerate(calls))
            if more and not held and number - 1 in asked:
                # A further hedge is one more prompt to pay: not on a spent budget.
                if number > 1 and state.over_budget(call.step_id) is not None:
                    more = False
                else:
                    notes.append(
                        _hedge(
                            chain,
                            index,
                            hedge,
                            number,
                            call,
                            calls,
                            asked,
                            trigger,
                            options,
                            summary,
                        )
                    )
                    more = number < hedge.max
            # While a call streams, only a call ending can make a hedge due.
            await workflow.wait_condition(_woken(calls, asked if more and not held else None))
    finally:
        for number in range(min(len(calls), hedge.max)):
            workflow.set_signal_handler(signal if number == 0 else f"{signal}.{number}", None)
        for entry in calls:
            if not entry.handle.done():
                entry.handle.cancel()


@dataclass(frozen=True)
class _Call:
    """One call of a hedged step: its activity and whom it asks."""

    handle: asyncio.Task[LlmReply]
    provider: str
    model: str


def _hedge(
    chain: list[FallbackTarget],
    index: int,
    hedge: Hedge,
    number: int,
    call: LlmCall,
    calls: list[_Call],
    asked: dict[int, HedgeStart],
    trigger: Callable[[int], HedgeTrigger | None],
    options: StepActivityOptions,
    summary: str,
) -> HedgeNote:
    """Start the ``number``-th hedge (``calls[-1]`` asked for it); its note."""
    other = hedge_target(chain, index, hedge, number)
    label = "hedge" if number == 1 else f"hedge {number}"
    hedged = call.model_copy(
        update={
            "provider": other.provider,
            "model": other.model,
            "base_url": other.base_url,
            "hedge": trigger(number),
        }
    )
    slow, start = calls[-1], asked[number - 1]
    calls.append(
        _Call(
            _start(hedged, options, f"{summary} {label}: {other.provider}/{other.model}"),
            other.provider,
            other.model,
        )
    )
    return HedgeNote(
        provider=slow.provider,
        model=slow.model,
        hedge_provider=other.provider,
        hedge_model=other.model,
        after_s=start.delay_s,
        reason=start.reason(slow.provider, slow.model),
        number=number,
    )


def _woken(calls: list[_Call], asked: dict[int, HedgeStart] | None) -> Callable[[], bool]:
    """Wake the race when a running call ends, or (``asked``) the latest asks for a hedge."""
    running = [entry.handle for entry in calls if not entry.handle.done()]
    latest = len(calls) - 1
    return lambda: (
        any(handle.done() for handle in running) or (asked is not None and latest in asked)
    )


def _asker(
    asked: dict[int, HedgeStart], streaming: set[int], number: int
) -> Callable[[object], None]:
    # A lambda: the SDK reads a handler's type hints when it is set, and
    # resolving string annotations in the sandbox, for every step of a wide
    # stage in one workflow task, took long enough to trip the deadlock
    # detector. The argument comes as JSON and is validated here.
    return lambda start: _note_hedge(asked, streaming, number, start)


def _note_hedge(
    asked: dict[int, HedgeStart], streaming: set[int], number: int, start: object
) -> None:
    said = HedgeStart.model_validate(start)
    if said.streaming:
        streaming.add(number)
    else:  # a retried attempt may ask again: its first request stands
        asked.setdefault(number, said)


def _start(call: LlmCall, options: StepActivityOptions, summary: str) -> asyncio.Task[LlmReply]:
    handle = start_activity(LLM_ACTIVITY, call, LlmReply, options, summary)
    # A loser's outcome is read only when it ended first; never "unretrieved".
    handle.add_done_callback(lambda task: task.cancelled() or task.exception())
    return handle


def _answered(handle: asyncio.Task[LlmReply]) -> bool:
    return handle.done() and not handle.cancelled() and handle.exception() is None


async def _settle(
    ctx: StepContext,
    step_id: str,
    calls: list[_Call],
    notes: list[HedgeNote],
    winner: int,
) -> LlmReply:
    """``calls[winner]`` answered: cancel the others, charge each on one note.

    Note n charges its own call when that lost, else (its call won) the
    step's first call: every loser once. All cancellations go out before
    any price is asked, as with a single hedge.
    """
    reply = calls[winner].handle.result()
    ended = [entry.handle.done() for entry in calls]
    for entry in calls:
        if not entry.handle.done():
            entry.handle.cancel()
    # (note, and for a loser cancelled while running: its prompt and price)
    charged: list[tuple[HedgeNote, Usage | None, ActivityHandle[HedgeCost] | None]] = []
    for entry_note in notes:
        loser = entry_note.number if entry_note.number != winner else 0
        outcome = (
            "primary" if winner == 0 else "hedge" if winner == entry_note.number else "other_hedge"
        )
        note = entry_note.model_copy(update={"winner": outcome})
        handle = calls[loser].handle
        if ended[loser]:
            # It ended too: a failure costs nothing known, an answer its own usage.
            if _answered(handle):
                other = handle.result()
                note = note.model_copy(
                    update={"loser_usage": other.usage, "loser_cost_usd": other.cost_usd}
                )
        elif not reply.dry_run:
            # Cancelled while running: the provider bills the prompt it read,
            # which is the winner's prompt.
            usage = Usage(input_tokens=reply.usage.input_tokens)
            provider, model = calls[loser].provider, calls[loser].model
            price = workflow.start_activity(
                HEDGE_COST_ACTIVITY,
                HedgeCostRequest(provider=provider, model=model, usage=usage),
                result_type=HedgeCost,
                start_to_close_timeout=HEDGE_OPTIONS.start_to_close_timeout,
                retry_policy=HEDGE_OPTIONS.retry_policy,
                summary=f"hedge: price of the cancelled call to {provider}/{model}",
            )
            charged.append((note, usage, price))
            continue
        charged.append((note, None, None))
    for note, prompt, pending in charged:
        if prompt is not None and pending is not None:
            cost = await pending
            note = note.model_copy(
                update={
                    "loser_usage": prompt,
                    "loser_cost_usd": cost.cost_usd,
                    "loser_estimated": True,
                }
            )
        ctx.state.account_hedge(step_id, note)
    return reply
