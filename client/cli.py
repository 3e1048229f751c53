"""The ``llmmixer`` command line (docs/cli.md).

Exit status: 0 completed, 1 failed or cancelled (or an operation that could
not be done), 2 invalid spec or usage, 3 waiting for a person.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError

from llmmixer.client.audit import AuditError, add_audit_parser, cmd_audit
from llmmixer.client.display import ProgressView, progress_table, terminal_safe, unblock_hints
from llmmixer.client.estimate import (
    add_estimate_parser,
    cmd_estimate,
    estimate_spec,
    format_estimate,
)
from llmmixer.client.local import EmbeddedServerError, TemporalUnreachable, temporal_for_run
from llmmixer.client.mixer import (
    INTERVENTIONS,
    InterventionRefused,
    MixerClient,
    MixerHandle,
    RunFailed,
)
from llmmixer.client.rerun import RerunError, read_source, reuse_table
from llmmixer.client.schedules import add_schedule_parser, cmd_schedule
from llmmixer.client.setup import add_setup_parser, cmd_setup, list_query, shown_status
from llmmixer.client.specfile import (
    model_retirements,
    parse_inputs,
    prepare_spec,
    spec_warnings,
)
from llmmixer.client.watch import EventPump, retrying
from llmmixer.core.contracts import EventType
from llmmixer.core.validation import SpecError
from llmmixer.runtime.codec_server import add_codec_server_arguments
from llmmixer.runtime.connection import Connection
from llmmixer.runtime.settings import Settings, SettingsError
from llmmixer.runtime.telemetry import flush_telemetry
from llmmixer.workflows.records import RunProgress, RunStatus

if TYPE_CHECKING:
    from llmmixer.workers.health import ReadinessState

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_WAITING = 0, 1, 2, 3
# Progress is asked for on step-level events; this only bounds a quiet spell.
_IDLE_REFRESH_S = 5.0
_CLOSED_QUERY_S = 10.0
_CLOSED = {
    WorkflowExecutionStatus.COMPLETED,
    WorkflowExecutionStatus.FAILED,
    WorkflowExecutionStatus.CANCELED,
    WorkflowExecutionStatus.TERMINATED,
    WorkflowExecutionStatus.TIMED_OUT,
}


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- validate -------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        # File inputs (the spec's and --input's) are read and typed, not stored.
        _, spec = prepare_spec(args.spec, inputs=parse_inputs(args.input or []))
    except SpecError as error:
        for issue in error.issues:
            _err(str(issue))
        return EXIT_USAGE
    # A model past its end of life is a warning, not an invalid spec: an
    # OpenAI-compatible gateway or a proxy may still serve the name, and a
    # spec's validity must not change with the date (validate_spec, whose
    # verdict a run records, does not look at it either).
    for issue in model_retirements(spec, retired=True):
        _err(f"warning: {issue}")
    for warning in spec_warnings(spec):
        _err(f"warning: {warning}")
    print(f"{args.spec}: valid ({len(spec.steps)} steps)")
    return EXIT_OK


# ---- run / watch ----------------------------------------------------------------


def _described_files(body: dict[str, object]) -> bool:
    """Whether ``prepare_spec`` described file inputs that are not stored yet."""
    inputs = body.get("inputs")
    return isinstance(inputs, dict) and any(
        isinstance(v, dict) and isinstance(v.get("file"), dict) and not v["file"].get("ref")
        for v in inputs.values()
    )


async def cmd_run(args: argparse.Namespace) -> int:
    try:
        inputs = parse_inputs(args.input)
        body, spec = prepare_spec(args.spec, inputs=inputs, dry_run=args.dry_run)
    except SpecError as error:
        for issue in error.issues:
            _err(str(issue))
        return EXIT_USAGE
    for issue in model_retirements(spec, retired=True):
        _err(f"warning: {issue}")
    for warning in spec_warnings(spec):
        _err(f"warning: {warning}")
    connection = Connection.from_env()
    async with temporal_for_run(
        connection, allow_embedded=not args.detach, want_worker=not args.detach
    ) as stack:
        mixer = MixerClient(stack.client, connection.task_queue)
        if _described_files(body):
            # Files go into the payload store of the client that starts the run.
            try:
                body, spec = await mixer.prepare(args.spec, inputs=inputs, dry_run=args.dry_run)
            except SpecError as error:
                for issue in error.issues:
                    _err(str(issue))
                return EXIT_USAGE
        if args.reuse_from:
            # The spec edited in place: steps whose call is unchanged take
            # the source run's output (like `rerun ID --spec SPEC`).
            try:
                source = await read_source(stack.client, args.reuse_from)
                reuse = reuse_table(source, spec, [])
            except (RerunError, AuditError) as error:
                _err(str(error))
                return EXIT_FAILED
            handle = await mixer.start_prepared(body, spec, workflow_id=args.id, reuse=reuse)
        else:
            handle = await mixer.start_prepared(body, spec, workflow_id=args.id)
        _err(f"started {handle.id} ({spec.name}, {len(spec.steps)} steps)")
        if args.detach:
            print(handle.id)
            return EXIT_OK
        code = await _follow(handle, stop_when_waiting=True)
        if args.dry_run:
            _err(format_estimate(estimate_spec(spec)))
        if code == EXIT_WAITING and stack.embedded is not None:
            _err(
                "The run is saved; it continues once a person acts and a worker runs: "
                "start `llmmixer dev` (same LLMMIXER_HOME), then use the commands above."
            )
        return code


async def cmd_rerun(args: argparse.Namespace) -> int:
    """Start a closed run again, reusing unchanged steps; print the new run's id."""
    mixer = await MixerClient.connect()
    try:
        handle = await mixer.rerun(
            args.id,
            from_steps=args.from_steps,
            spec=args.spec,
            inputs=parse_inputs(args.input),
            new_workflow_id=args.new_id,
        )
    except SpecError as error:
        for issue in error.issues:
            _err(str(issue))
        return EXIT_USAGE
    except (RerunError, AuditError) as error:
        _err(str(error))
        return EXIT_FAILED
    _err(f"started {handle.id}, a re-run of {args.id}; follow it with `llmmixer watch {handle.id}`")
    print(handle.id)
    return EXIT_OK


async def cmd_watch(args: argparse.Namespace) -> int:
    mixer = await MixerClient.connect()
    return await _follow(mixer.get_handle(args.id), stop_when_waiting=False)


async def _follow(
    handle: MixerHandle,
    *,
    stop_when_waiting: bool,
    stream: TextIO | None = None,
    from_offset: int = 0,
) -> int:
    """Show the run live until it ends (or, for `run`, until it waits for a person).

    Driven by the run's event stream: streamed text is shown as it arrives,
    and progress is asked for again when a step-level event arrives (or after
    a quiet spell), never in a tight loop. A dropped connection is picked up
    again from the offset after the last event seen, so nothing shows twice
    and nothing is lost.
    """

    def reconnecting(error: BaseException, delay_s: float, attempt: int) -> None:
        if attempt == 1:  # once per outage, not once per try
            reason = error.message if isinstance(error, RPCError) else str(error)
            view.note(f"lost Temporal ({reason or type(error).__name__}); reconnecting")

    with ProgressView(handle.id, stream) as view:
        description = await retrying(handle.temporal.describe, on_retry=reconnecting)
        if description.status in _CLOSED:
            ended = await _progress_if_answered(handle)
            if ended is not None:
                view.summary(ended)
            return await _report_end(handle, ended)
        progress = await retrying(handle.progress, on_retry=reconnecting)
        view.update(progress)
        hinted = False
        async with EventPump(handle, from_offset, on_retry=reconnecting) as pump:
            while True:
                if progress.needs_person:
                    if stop_when_waiting:
                        break
                    if not hinted:
                        for line in unblock_hints(handle.id, progress):
                            view.note(line)
                        hinted = True
                else:
                    hinted = False
                events = await pump.batch(_IDLE_REFRESH_S)
                ended_now = pump.ended or any(e.type == EventType.WORKFLOW_ENDED for e in events)
                if ended_now:
                    progress = await _progress_if_answered(handle) or progress
                    view.update(progress)
                elif not events or any(e.type != EventType.STEP_DELTA for e in events):
                    progress = await retrying(handle.progress, on_retry=reconnecting)
                    view.update(progress)
                for event in events:
                    view.event(event)
                if ended_now:
                    break
    return await _report_end(handle, progress)


async def _progress_if_answered(handle: MixerHandle) -> RunProgress | None:
    """The progress of a run that has (nearly) closed; None when no worker answers."""
    try:
        return await asyncio.wait_for(handle.progress(), _CLOSED_QUERY_S)
    except (RPCError, TimeoutError):
        return None


async def _report_end(handle: MixerHandle, progress: RunProgress | None) -> int:
    description = await handle.temporal.describe()
    if description.status == WorkflowExecutionStatus.COMPLETED:
        result = await handle.result()
        output = result.output or ""
        # On a terminal the output could drive it (clipboard, links, cursor);
        # into a file or a pipe it goes unchanged.
        print(terminal_safe(output) if sys.stdout.isatty() else output)
        return EXIT_OK
    if description.status in _CLOSED:
        try:
            await handle.result()
        except RunFailed as error:
            _err(terminal_safe(f"run {handle.id} {description.status.name.lower()}: {error}"))
        return EXIT_FAILED
    assert progress is not None
    _err(f"run {handle.id} is waiting for a person:")
    for line in unblock_hints(handle.id, progress):
        _err(line)
    return EXIT_WAITING


# ---- status / list / cancel -------------------------------------------------------


async def cmd_status(args: argparse.Namespace) -> int:
    mixer = await MixerClient.connect()
    handle = mixer.get_handle(args.id)
    progress = await handle.progress()
    if args.json:
        print(progress.model_dump_json(indent=2))
    else:
        from rich.console import Console

        Console().print(progress_table(handle.id, progress))
        for line in unblock_hints(handle.id, progress):
            print(line)
        if progress.error:
            print(terminal_safe(f"error: {progress.error}"))
    return {
        RunStatus.COMPLETED: EXIT_OK,
        RunStatus.WAITING: EXIT_WAITING,
        RunStatus.RUNNING: EXIT_OK,
    }.get(progress.status, EXIT_FAILED)


async def cmd_list(args: argparse.Namespace) -> int:
    mixer = await MixerClient.connect()
    query = list_query(args.state, args.spec)
    count = 0
    try:
        async for execution in mixer.temporal.list_workflows(query, limit=args.limit):
            status = shown_status(execution)
            started = execution.start_time.strftime("%Y-%m-%d %H:%M:%S")
            print(f"{execution.id}\t{status}\t{started}")
            count += 1
    except RPCError as error:
        if args.state is None and args.spec is None:
            raise
        _err(
            f"Temporal refused the query ({error.message}): `llmmixer setup` registers "
            "the search attributes --state and --spec filter on"
        )
        return EXIT_FAILED
    if count == 0:
        filtered = args.state is not None or args.spec is not None
        _err("no such runs" if filtered else "no runs yet: start one with `llmmixer run SPEC`")
    return EXIT_OK


async def cmd_cancel(args: argparse.Namespace) -> int:
    mixer = await MixerClient.connect()
    handle = mixer.get_handle(args.id)
    await handle.cancel()
    print(f"cancellation requested for {args.id}: running steps are being stopped")
    return EXIT_OK


# ---- interventions ----------------------------------------------------------------


async def cmd_raise_budget(args: argparse.Namespace) -> int:
    if args.max_tokens is None and args.max_cost_usd is None:
        _err("raise-budget needs --max-tokens N and/or --max-cost-usd X (the new, higher limits)")
        return EXIT_USAGE
    mixer = await MixerClient.connect()
    handle = mixer.get_handle(args.id)
    try:
        limits = await handle.raise_budget(
            step=args.step or "", max_tokens=args.max_tokens, max_cost_usd=args.max_cost_usd
        )
    except InterventionRefused as error:
        _err(f"refused: {error}")
        return EXIT_FAILED
    scope = f"the budget of {args.step}" if args.step else "the spec's budget"
    print(
        f"raised {scope}: max_tokens {limits.max_tokens}, max_cost_usd {limits.max_cost_usd}; "
        "steps it held start now"
    )
    return EXIT_OK


async def cmd_intervene(args: argparse.Namespace) -> int:
    mixer = await MixerClient.connect()
    handle = mixer.get_handle(args.id)
    text = getattr(args, INTERVENTIONS[args.command].field)
    try:
        outcome = await handle.intervene(args.command, args.step, text)
    except InterventionRefused as error:
        _err(f"refused: {error}")
        return EXIT_FAILED
    print(f"{args.command} {args.step}: {outcome.message} (now {outcome.status.value})")
    return EXIT_OK


# ---- dev / worker -----------------------------------------------------------------


async def cmd_dev(args: argparse.Namespace) -> int:
    from llmmixer.activities.terminal.policy import local_operator_note
    from llmmixer.runtime.address import parse_address
    from llmmixer.runtime.home import llmmixer_home
    from llmmixer.workers.devserver import EmbeddedServer
    from llmmixer.workers.worker import mixer_worker, run_until_signalled

    connection = Connection.from_env()
    host, port = parse_address(connection.address)
    server = EmbeddedServer(host=host, port=port, ui_port=args.ui_port, home=llmmixer_home())
    async with server:
        _err(f"Temporal dev server on {server.address} · Web UI {server.ui_url}")
        _err(f"data: {server.db_path} · Ctrl-C stops server and worker")
        client = await connection.connect()
        if note := local_operator_note():
            _err(note)
        # `llmmixer dev` is the user's own worker: they are the operator.
        async with mixer_worker(client, user_is_operator=True) as worker:
            await run_until_signalled(worker)
    return EXIT_OK


async def cmd_worker(args: argparse.Namespace) -> int:
    from llmmixer.activities.terminal.policy import worker_note
    from llmmixer.workers.health import ReadinessState, health_port_from_env
    from llmmixer.workers.worker import (
        ROLE_PTY,
        ROLES_ENV,
        mixer_worker,
        parse_roles,
        run_until_signalled,
    )

    # Every variable at once, before connecting: a bad one stops the worker here.
    Settings.from_env()
    connection = Connection.from_env()
    health_port = args.health_port if args.health_port is not None else health_port_from_env()
    readiness = ReadinessState(f"connecting to Temporal at {connection.address}")
    async with _health_server(health_port, readiness):
        try:
            client = await connection.connect()
        except RuntimeError as error:
            _err(f"cannot reach Temporal at {connection.address}: {error}")
            return EXIT_FAILED
        async with mixer_worker(client) as worker:
            readiness.set_ready()
            queues = ", ".join(repr(queue) for queue in worker.task_queues)
            _err(f"worker polling {queues} on {connection.address}")
            note = worker_note()
            if note and ROLE_PTY in parse_roles(os.environ.get(ROLES_ENV, "")):
                _err(note)
            # Not ready from the signal on: the drain takes up to the grace
            # period, and the worker takes no new work meanwhile.
            await run_until_signalled(
                worker, on_signal=lambda: readiness.set_not_ready("shutting down")
            )
    return EXIT_OK


@contextlib.asynccontextmanager
async def _health_server(port: int | None, readiness: ReadinessState) -> AsyncIterator[None]:
    """The worker's /healthz and /readyz while it runs, when a port is configured."""
    from llmmixer.workers.health import HealthServer

    if not port:
        yield
        return
    async with HealthServer(host="0.0.0.0", port=port, readiness=readiness) as server:
        _err(f"health: http://0.0.0.0:{server.port}/healthz and /readyz")
        yield


# ---- doctor -----------------------------------------------------------------------


async def cmd_doctor(args: argparse.Namespace) -> int:
    from llmmixer.client.doctor import run_doctor

    return await run_doctor(json_output=args.json)


async def cmd_serve(args: argparse.Namespace) -> int:
    # Imported here so the other commands never pay for loading the web stack.
    from llmmixer.client.http import serve

    return await serve(args.host, args.port)


async def cmd_codec_server(args: argparse.Namespace) -> int:
    from llmmixer.runtime.codec_server import codec_server_command

    return await codec_server_command(args.host, args.port, args.allow_origin)


# ---- parser -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmmixer", description="Durable multi-LLM workflows on Temporal."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = sub.add_parser("dev", help="embedded Temporal dev server (SQLite, Web UI) + worker")
    dev.add_argument("--ui-port", type=int, default=None, help="Web UI port (default: port+1000)")
    worker = sub.add_parser("worker", help="a worker against TEMPORAL_ADDRESS")
    worker.add_argument("--health-port", type=int, default=None, help="serve /healthz, /readyz")

    validate = sub.add_parser("validate", help="check a spec; one error per line, exit 2")
    validate.add_argument("spec")
    validate.add_argument("--input", action="append", default=[], metavar="KEY=VALUE")

    run = sub.add_parser("run", help="run a spec and show its progress")
    run.add_argument("spec")
    run.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an input (value @file reads a file: an image or PDF becomes a file input)",
    )
    run.add_argument("--id", default=None, help="workflow id (default: NAME-random)")
    run.add_argument("--detach", action="store_true", help="start and return (needs a server)")
    run.add_argument(
        "--reuse-from",
        default=None,
        metavar="ID",
        help="reuse the output of every step whose call is unchanged since run ID",
    )
    run.add_argument(
        "--dry-run", action="store_true", help="answer every provider call offline; no key needed"
    )

    rerun = sub.add_parser(
        "rerun", help="start a closed run again, reusing the output of every unchanged step"
    )
    rerun.add_argument("id", help="the source run (completed, failed, cancelled, ...)")
    rerun.add_argument(
        "--from",
        dest="from_steps",
        action="append",
        default=[],
        metavar="STEP",
        help="run this step and everything after it again (repeatable)",
    )
    rerun.add_argument("--spec", default=None, help="an edited spec to run instead of the source's")
    rerun.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change an input (the source run's inputs are kept otherwise)",
    )
    rerun.add_argument(
        "--id", dest="new_id", default=None, metavar="ID", help="the new run's workflow id"
    )

    for name, help_text in (
        ("status", "a run's steps and how to unblock them"),
        ("watch", "follow a run live"),
        ("cancel", "cancel a run"),
    ):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("id")
        if name == "status":
            command.add_argument("--json", action="store_true", help="print the progress JSON")
    listing = sub.add_parser("list", help="recent runs")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument(
        "--state",
        choices=[s.value for s in RunStatus],
        help="only runs in this state (search attribute LlmmixerState; see `setup`)",
    )
    listing.add_argument("--spec", help="only runs of this spec name (LlmmixerSpec)")
    add_audit_parser(sub)
    add_schedule_parser(sub)
    add_estimate_parser(sub)
    add_setup_parser(sub)

    for name, kind in INTERVENTIONS.items():
        command = sub.add_parser(name, help=f"{name} a step of a run")
        command.add_argument("id")
        command.add_argument("step")
        command.add_argument(f"--{kind.field}", required=kind.required, default=None)

    budget = sub.add_parser("raise-budget", help="raise a run's token or cost budget")
    budget.add_argument("id")
    budget.add_argument("--step", default=None, help="a decompose step's budget (default: spec's)")
    budget.add_argument("--max-tokens", type=int, default=None)
    budget.add_argument("--max-cost-usd", type=float, default=None)

    sub.add_parser("schema", help="print the spec format as a JSON Schema (docs/spec.schema.json)")
    sub.add_parser("prices", help="the token price table costs are computed with, and its date")

    doctor = sub.add_parser("doctor", help="what is installed, reachable and configured")
    doctor.add_argument("--json", action="store_true")

    serve = sub.add_parser("serve", help="HTTP API, SSE event stream and web page")
    serve.add_argument(
        "--host", default="127.0.0.1", help="beyond loopback needs LLMMIXER_API_TOKEN"
    )
    serve.add_argument("--port", type=int, default=8765)

    codec = sub.add_parser(
        "codec-server",
        help="decrypt payloads for the Temporal CLI and Web UI (as LLMMIXER_PAYLOAD_KEY allows)",
    )
    add_codec_server_arguments(codec)
    return parser


_ASYNC: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "run": cmd_run,
    "rerun": cmd_rerun,
    "watch": cmd_watch,
    "status": cmd_status,
    "list": cmd_list,
    "cancel": cmd_cancel,
    "audit": cmd_audit,
    "schedule": cmd_schedule,
    "setup": cmd_setup,
    **dict.fromkeys(INTERVENTIONS, cmd_intervene),
    "raise-budget": cmd_raise_budget,
    "dev": cmd_dev,
    "worker": cmd_worker,
    "doctor": cmd_doctor,
    "serve": cmd_serve,
    "codec-server": cmd_codec_server,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.command == "validate":
        return cmd_validate(args)
    if args.command == "estimate":
        return cmd_estimate(args)
    if args.command == "schema":
        from llmmixer.core.schema import spec_json_schema

        print(json.dumps(spec_json_schema(), indent=2))
        return EXIT_OK
    if args.command == "prices":
        from llmmixer.activities.pricing import PriceTable, price_listing

        print(price_listing(PriceTable.load()))
        return EXIT_OK
    try:
        return asyncio.run(_ASYNC[args.command](args))
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except (TemporalUnreachable, EmbeddedServerError, SettingsError) as error:
        _err(str(error))
        return EXIT_FAILED
    except RPCError as error:
        _err(f"Temporal refused the request: {error.message} ({error.status.name})")
        return EXIT_FAILED
    except RuntimeError as error:
        if "connect" in str(error).lower():
            _err(f"cannot reach Temporal: {error}. Start `llmmixer dev`, or set TEMPORAL_ADDRESS")
            return EXIT_FAILED
        raise


def run_cli() -> None:
    """Console-script entry: ``main`` then an immediate exit.

    The Temporal client's native runtime can still be calling back into Python
    while the interpreter finalises, which aborts the process after the work is
    done; leaving with ``os._exit`` once output is flushed avoids that.
    """
    code = main()
    # os._exit skips atexit, where OpenTelemetry would export its last spans.
    flush_telemetry()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_cli()
