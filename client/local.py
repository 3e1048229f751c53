"""Getting a Temporal server and a worker for ``llmmixer run`` and ``llmmixer dev``.

As docs/cli.md promises: on a loopback address where nothing listens, ``run`` starts the
embedded dev server on that port (Web UI on a free port, SQLite under
``LLMMIXER_HOME``) plus a worker, and stops both when it exits. A
non-loopback address that does not answer is an error, never a silent local
fallback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

from temporalio.client import Client

from llmmixer.activities.terminal.policy import local_operator_note
from llmmixer.client.pollers import poller_identities
from llmmixer.runtime.address import free_port, is_listening, is_loopback, parse_address
from llmmixer.runtime.connection import Connection
from llmmixer.runtime.home import llmmixer_home

# EmbeddedServerError re-exported: the CLI reports it without importing
# worker code outside the commands that run a worker.
from llmmixer.workers.devserver import EmbeddedServer
from llmmixer.workers.devserver import EmbeddedServerError as EmbeddedServerError
from llmmixer.workers.worker import mixer_worker


class TemporalUnreachable(RuntimeError):
    """The configured Temporal server does not answer; the message says what to do."""


@dataclass
class LocalStack:
    client: Client
    connection: Connection
    embedded: EmbeddedServer | None
    in_process_worker: bool

    @property
    def ui_url(self) -> str | None:
        return self.embedded.ui_url if self.embedded else None


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def temporal_for_run(
    connection: Connection, *, allow_embedded: bool = True, want_worker: bool = True
) -> AsyncIterator[LocalStack]:
    """A connected client, starting the embedded server and a worker when needed."""
    host, port = parse_address(connection.address)
    embedded: EmbeddedServer | None = None
    async with contextlib.AsyncExitStack() as stack:
        if not await is_listening(host, port):
            if not is_loopback(host):
                raise TemporalUnreachable(
                    f"nothing answers at TEMPORAL_ADDRESS={connection.address}: check the "
                    "address and network, or unset TEMPORAL_ADDRESS to use the embedded server"
                )
            if not allow_embedded:
                raise TemporalUnreachable(
                    f"no Temporal server at {connection.address}: start one with "
                    "`llmmixer dev` (or drop --detach to let `run` start its own)"
                )
            embedded = EmbeddedServer(
                host=host, port=port, ui_port=free_port(), home=llmmixer_home()
            )
            _note(f"starting the embedded Temporal server on {connection.address} ...")
            await stack.enter_async_context(embedded)
            _note(f"Temporal Web UI: {embedded.ui_url} (while this command runs)")
        client = await connection.connect()
        run_worker = want_worker and (
            embedded is not None or not await poller_identities(client, connection.task_queue)
        )
        if run_worker:
            if embedded is None:
                _note(
                    f"no worker polls task queue {connection.task_queue!r}: running one in this "
                    "process until the run ends or waits for a person"
                )
            if note := local_operator_note():
                _note(note)
            # The embedded worker is the user's own: they are the operator.
            worker = await stack.enter_async_context(mixer_worker(client, user_is_operator=True))
            await stack.enter_async_context(worker)
        yield LocalStack(client, connection, embedded, run_worker)
