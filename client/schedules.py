"""Recurring runs on Temporal Schedules: ``llmmixer schedule ...`` and ``MixerClient``'s methods.

A schedule is Temporal's own object (``temporal schedule list`` and the Web UI
show it too): its action starts ``MixerWorkflow`` with the spec, validated
once when the schedule is created, exactly as ``llmmixer run --detach`` would.
Each run's workflow id is the schedule's name followed by the time it was
scheduled for, which Temporal appends.

A scheduled run reads that time as ``{{inputs.scheduled_time}}`` (ISO 8601,
UTC): the schedule declares the input empty and the workflow fills it from
the run's ``TemporalScheduledStartTime`` search attribute
(``workflows/search.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionExecutionStartWorkflow,
    ScheduleActionResult,
    ScheduleActionStartWorkflow,
    ScheduleDescription,
    ScheduleListActionStartWorkflow,
    ScheduleListDescription,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
)
from temporalio.service import RPCError, RPCStatusCode

from llmmixer.client.specfile import parse_inputs, prepare_spec, read_spec, spec_warnings
from llmmixer.core.spec import Spec
from llmmixer.core.validation import SpecError
from llmmixer.workflows.mixer import WORKFLOW_NAME
from llmmixer.workflows.search import SCHEDULED_TIME_INPUT, iso_utc

if TYPE_CHECKING:
    from llmmixer.client.mixer import MixerClient

__all__ = [
    "OVERLAP_POLICIES",
    "MixerSchedule",
    "Overlap",
    "ScheduleNotFound",
    "ScheduledRun",
    "add_schedule_parser",
    "cmd_schedule",
]

T = TypeVar("T")
Overlap = Literal["skip", "buffer", "allow"]
# What happens when a run is due while the previous one still runs: `skip`
# drops it, `buffer` starts it once the previous ends (one held at most),
# `allow` starts it alongside.
OVERLAP_POLICIES: Mapping[str, ScheduleOverlapPolicy] = {
    "skip": ScheduleOverlapPolicy.SKIP,
    "buffer": ScheduleOverlapPolicy.BUFFER_ONE,
    "allow": ScheduleOverlapPolicy.ALLOW_ALL,
}
_OVERLAP_NAMES = {policy: name for name, policy in OVERLAP_POLICIES.items()}
# The schedule's memo: the spec's name, shown by `list` without decoding the
# spec, and the cron expressions as written (Temporal keeps them only as the
# calendars it parsed them into).
_MEMO_SPEC = "llmmixer_spec"
_MEMO_CRON = "llmmixer_cron"


class ScheduleNotFound(LookupError):
    """No schedule of that name on this namespace."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"no schedule named {name!r}: `llmmixer schedule list` shows the schedules there are"
        )
        self.name = name


@dataclass(frozen=True)
class ScheduledRun:
    """One run a schedule started: its workflow id and when it was due and began."""

    workflow_id: str
    scheduled_at: datetime
    started_at: datetime


@dataclass(frozen=True)
class MixerSchedule:
    """What ``list`` and ``describe`` show of a schedule.

    ``overlap``, ``runs_started`` and ``running`` are known only to
    ``describe`` (the list Temporal keeps does not carry them): None/0/[] there.
    """

    name: str
    spec: str
    cron: list[str]
    paused: bool
    note: str
    next_runs: list[datetime] = field(default_factory=list)
    recent_runs: list[ScheduledRun] = field(default_factory=list)
    overlap: Overlap | None = None
    runs_started: int = 0
    running: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["next_runs"] = [iso_utc(moment) for moment in self.next_runs]
        data["recent_runs"] = [
            {
                "workflow_id": run.workflow_id,
                "scheduled_at": iso_utc(run.scheduled_at),
                "started_at": iso_utc(run.started_at),
            }
            for run in self.recent_runs
        ]
        return data


# ---- the API MixerClient's methods call -----------------------------------------


def scheduled_spec(
    source: Mapping[str, Any] | str | Path,
    inputs: Mapping[str, Any] | None = None,
    *,
    dry_run: bool = False,
) -> tuple[dict[str, Any], Spec]:
    """The body a schedule starts runs with, and its validated model.

    ``inputs.scheduled_time`` is declared empty unless the spec or ``inputs``
    set it, so a spec may use ``{{inputs.scheduled_time}}`` and each run gets
    its own time there.
    """
    body = read_spec(source)
    declared = dict(body.get("inputs") or {})
    merged: dict[str, Any] = {} if SCHEDULED_TIME_INPUT in declared else {SCHEDULED_TIME_INPUT: ""}
    merged.update(inputs or {})
    return prepare_spec(body, inputs=merged, dry_run=dry_run)


def build_schedule(
    name: str,
    body: dict[str, Any],
    spec_name: str,
    steps: int,
    *,
    description: str = "",
    task_queue: str,
    cron: Sequence[str],
    overlap: Overlap,
    paused: bool = False,
    note: str = "",
) -> Schedule:
    if overlap not in OVERLAP_POLICIES:
        raise ValueError(f"overlap {overlap!r}: use one of {', '.join(OVERLAP_POLICIES)}")
    if not cron:
        raise ValueError('cron: give at least one cron expression, e.g. "0 9 * * 1"')
    return Schedule(
        action=ScheduleActionStartWorkflow(
            WORKFLOW_NAME,
            body,
            id=name,
            task_queue=task_queue,
            static_summary=f"llmmixer: {spec_name} ({steps} steps), schedule {name}",
            memo={"spec": spec_name, "description": description},
        ),
        spec=ScheduleSpec(cron_expressions=list(cron)),
        policy=SchedulePolicy(overlap=OVERLAP_POLICIES[overlap]),
        state=ScheduleState(paused=paused, note=note or f"llmmixer spec {spec_name}"),
    )


async def create(
    mixer: MixerClient,
    name: str,
    body: dict[str, Any],
    spec_name: str,
    steps: int,
    *,
    cron: Sequence[str],
    overlap: Overlap,
    paused: bool = False,
    description: str = "",
) -> None:
    schedule = build_schedule(
        name,
        body,
        spec_name,
        steps,
        description=description,
        task_queue=mixer.task_queue,
        cron=cron,
        overlap=overlap,
        paused=paused,
    )
    await mixer.temporal.create_schedule(
        name, schedule, memo={_MEMO_SPEC: spec_name, _MEMO_CRON: list(cron)}
    )


async def describe(temporal: Client, name: str) -> MixerSchedule:
    try:
        description = await temporal.get_schedule_handle(name).describe()
    except RPCError as error:
        raise _not_found(error, name) from None
    return await _from_description(description)


async def list_all(temporal: Client) -> list[MixerSchedule]:
    """Every schedule that starts llmmixer runs, newest first as Temporal lists them.

    Temporal's list is eventually consistent: a schedule created a moment ago
    may show a moment later.
    """
    found = []
    async for entry in await temporal.list_schedules():
        action = entry.schedule.action if entry.schedule else None
        if isinstance(action, ScheduleListActionStartWorkflow) and action.workflow == WORKFLOW_NAME:
            found.append(await _from_list_entry(entry))
    return found


async def act(temporal: Client, name: str, action: str, note: str | None = None) -> None:
    """``pause``, ``unpause``, ``trigger`` or ``delete`` the schedule ``name``."""
    handle = temporal.get_schedule_handle(name)
    try:
        if action == "pause":
            await handle.pause(note=note)
        elif action == "unpause":
            await handle.unpause(note=note)
        elif action == "trigger":
            await handle.trigger()
        elif action == "delete":
            await handle.delete()
        else:
            raise ValueError(f"action {action!r}: use pause, unpause, trigger or delete")
    except RPCError as error:
        raise _not_found(error, name) from None


def _not_found(error: RPCError, name: str) -> Exception:
    return ScheduleNotFound(name) if error.status == RPCStatusCode.NOT_FOUND else error


def _runs(actions: Sequence[ScheduleActionResult]) -> list[ScheduledRun]:
    runs = []
    for result in actions:
        if isinstance(result.action, ScheduleActionExecutionStartWorkflow):
            runs.append(
                ScheduledRun(result.action.workflow_id, result.scheduled_at, result.started_at)
            )
    return runs


async def _memo(entry: ScheduleDescription | ScheduleListDescription, key: str, default: T) -> T:
    try:
        value = await entry.memo_value(key, default=default)
    except Exception:  # a memo another tool wrote: show the schedule all the same
        return default
    return value if isinstance(value, type(default)) else default


async def _cron(
    entry: ScheduleDescription | ScheduleListDescription, spec: ScheduleSpec | None
) -> list[str]:
    none: list[str] = []
    written = [str(item) for item in await _memo(entry, _MEMO_CRON, none)]
    if written:
        return written
    # Created by another tool: its own cron strings if the server kept them.
    return list(spec.cron_expressions) if spec else []


async def _from_description(description: ScheduleDescription) -> MixerSchedule:
    schedule, info = description.schedule, description.info
    overlap = schedule.policy.overlap
    return MixerSchedule(
        name=description.id,
        spec=await _memo(description, _MEMO_SPEC, ""),
        cron=await _cron(description, schedule.spec),
        paused=schedule.state.paused,
        note=schedule.state.note or "",
        next_runs=list(info.next_action_times),
        recent_runs=_runs(info.recent_actions),
        overlap=_OVERLAP_NAMES.get(overlap),  # type: ignore[arg-type]
        runs_started=info.num_actions,
        running=[
            run.workflow_id
            for run in info.running_actions
            if isinstance(run, ScheduleActionExecutionStartWorkflow)
        ],
    )


async def _from_list_entry(entry: ScheduleListDescription) -> MixerSchedule:
    schedule, info = entry.schedule, entry.info
    return MixerSchedule(
        name=entry.id,
        spec=await _memo(entry, _MEMO_SPEC, ""),
        cron=await _cron(entry, schedule.spec if schedule else None),
        paused=schedule.state.paused if schedule else False,
        note=(schedule.state.note or "") if schedule else "",
        next_runs=list(info.next_action_times) if info else [],
        recent_runs=_runs(info.recent_actions) if info else [],
    )


# ---- llmmixer schedule ...  ---------------------------------------------------------


def add_schedule_parser(sub: Any) -> None:
    """``llmmixer schedule create|list|describe|pause|unpause|trigger|delete``."""
    schedule = sub.add_parser("schedule", help="recurring runs on Temporal Schedules")
    actions = schedule.add_subparsers(dest="schedule_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="run SPEC on a cron schedule")
    create.add_argument("name", help="the schedule's id; its runs are NAME-<scheduled time>")
    create.add_argument("spec")
    create.add_argument(
        "--cron",
        action="append",
        required=True,
        metavar="EXPR",
        help='cron expression in UTC, e.g. "0 9 * * 1" (Mondays 09:00); repeatable',
    )
    create.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an input for every run (value @file reads a file)",
    )
    create.add_argument(
        "--overlap",
        choices=tuple(OVERLAP_POLICIES),
        default="skip",
        help="a run due while the last one runs: skip it, buffer it, or allow both",
    )
    create.add_argument("--paused", action="store_true", help="create it paused")
    create.add_argument(
        "--dry-run", action="store_true", help="its runs answer every provider call offline"
    )
    listing = actions.add_parser("list", help="schedules that start llmmixer runs")
    listing.add_argument("--json", action="store_true")
    describe_parser = actions.add_parser("describe", help="a schedule: next and recent runs")
    describe_parser.add_argument("name")
    describe_parser.add_argument("--json", action="store_true")
    for action, help_text in (
        ("pause", "start no runs until unpaused"),
        ("unpause", "start runs again"),
        ("trigger", "start a run now (the overlap policy applies)"),
        ("delete", "delete the schedule; runs it started go on"),
    ):
        command = actions.add_parser(action, help=help_text)
        command.add_argument("name")
        if action in ("pause", "unpause"):
            command.add_argument("--note", default=None, help="why, shown by describe")


async def cmd_schedule(args: argparse.Namespace) -> int:
    from llmmixer.client.mixer import MixerClient

    action = args.schedule_command
    if action == "create":
        try:
            _, spec = scheduled_spec(args.spec, parse_inputs(args.input), dry_run=args.dry_run)
        except SpecError as error:
            for issue in error.issues:
                _err(str(issue))
            return 2
        for warning in spec_warnings(spec):
            _err(f"warning: {warning}")
        mixer = await MixerClient.connect()
        # Through create_schedule, which stores file inputs (--input NAME=@FILE).
        await mixer.create_schedule(
            args.name,
            args.spec,
            cron=args.cron,
            inputs=parse_inputs(args.input),
            overlap=args.overlap,
            paused=args.paused,
            dry_run=args.dry_run,
        )
        print(f"created schedule {args.name}: {spec.name} at {'; '.join(args.cron)} (UTC)")
        return 0
    mixer = await MixerClient.connect()
    try:
        if action == "list":
            schedules = await mixer.list_schedules()
            if args.json:
                print(json.dumps([s.as_json() for s in schedules], indent=2))
            elif not schedules:
                _err(
                    "no schedules yet: create one with `llmmixer schedule create NAME SPEC --cron`"
                )
            for item in schedules if not args.json else []:
                state = "paused" if item.paused else "active"
                upcoming = iso_utc(item.next_runs[0]) if item.next_runs else "-"
                print(f"{item.name}\t{item.spec}\t{'; '.join(item.cron)}\t{state}\tnext {upcoming}")
            return 0
        if action == "describe":
            found = await mixer.describe_schedule(args.name)
            if args.json:
                print(json.dumps(found.as_json(), indent=2))
            else:
                _print_description(found)
            return 0
        if action == "pause":
            await mixer.pause_schedule(args.name, note=args.note)
            print(f"paused {args.name}: no run starts until `llmmixer schedule unpause`")
        elif action == "unpause":
            await mixer.unpause_schedule(args.name, note=args.note)
            print(f"unpaused {args.name}")
        elif action == "trigger":
            await mixer.trigger_schedule(args.name)
            print(f"triggered {args.name}: `llmmixer schedule describe {args.name}` shows the run")
        elif action == "delete":
            await mixer.delete_schedule(args.name)
            print(f"deleted {args.name}; runs it started go on")
    except ScheduleNotFound as error:
        _err(str(error))
        return 1
    return 0


def _print_description(found: MixerSchedule) -> None:
    print(f"schedule  {found.name}")
    print(f"spec      {found.spec}")
    print(f"cron      {'; '.join(found.cron)} (UTC)")
    print(f"state     {'paused' if found.paused else 'active'}" + (f" ({found.note})"))
    print(f"overlap   {found.overlap or '-'}")
    print(f"started   {found.runs_started} runs; running now: {', '.join(found.running) or '-'}")
    for moment in found.next_runs[:3]:
        print(f"next      {iso_utc(moment)}")
    for run in found.recent_runs:
        print(f"recent    {run.workflow_id} (scheduled {iso_utc(run.scheduled_at)})")


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
