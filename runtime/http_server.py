"""An ASGI app on uvicorn inside a running event loop: the worker's probes and the codec server.

``llmmixer serve``, the worker's ``/healthz``/``/readyz`` and the codec server
are all ASGI apps on Starlette/uvicorn. ``serve`` owns its process and runs
uvicorn as usual; the other two run *inside* a process that does something
else (the worker, ``llmmixer codec-server``'s own loop), so they start here:

* the socket is bound and listening before uvicorn runs, so ``port`` (0 picks a
  free one) is known at once and a port in use raises ``OSError`` instead of
  uvicorn's ``sys.exit``; a client that connects early waits in the backlog;
* uvicorn's signal handlers are never installed: the owner (the worker's
  graceful drain) decides when to stop, and uvicorn would otherwise take
  SIGTERM for itself and only raise it again once its server had stopped;
* logging is left as the process configured it, and there is no access log;
* the pure-Python h11 parser is used, whatever else is installed, so malformed
  requests get the same 400 everywhere; with ``request_timeout_s``, a
  connection that has not sent a whole request by then is closed (uvicorn's own
  keep-alive timeout starts only after a first response), so stalled clients
  cannot pile up connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from llmmixer.runtime.service import Service

__all__ = ["AsgiServer", "bind_socket"]

_BACKLOG = 128


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port``; ``host`` may be a bracketed IPv6 literal."""
    bare = host[1:-1] if host.startswith("[") else host
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bare, port))
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _h11_with_request_timeout(timeout_s: float) -> type[H11Protocol]:
    class RequestTimeoutH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._deadline = self.loop.call_later(timeout_s, self._drop_unless_requested)

        def _drop_unless_requested(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

    return RequestTimeoutH11


class _OwnerHandlesSignals(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AsgiServer(Service):
    """Serves ``app`` on ``host:port`` from :meth:`start` to :meth:`stop` (also ``async with``)."""

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        *,
        name: str = "AsgiServer",
        request_timeout_s: float | None = None,
        shutdown_timeout_s: int = 1,
    ) -> None:
        self._app = app
        self._host = host
        self._requested_port = port
        self._name = name
        self._request_timeout_s = request_timeout_s
        self._shutdown_timeout_s = shutdown_timeout_s
        self._socket: socket.socket | None = None
        self._bound_port: int | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The port actually bound (differs from the requested one when that was 0)."""
        if self._bound_port is None:
            raise RuntimeError(f"{self._name}.port is known only after start()")
        return self._bound_port

    async def start(self) -> None:
        """Bind and listen (``OSError`` if the port is taken), then serve in a task."""
        if self._task is not None:
            raise RuntimeError(f"{self._name} is already started")
        sock = bind_socket(self._host, self._requested_port)
        config = uvicorn.Config(
            self._app,
            http=(
                _h11_with_request_timeout(self._request_timeout_s)
                if self._request_timeout_s is not None
                else "h11"
            ),
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            # Reveal nothing about the software: these servers may be unauthenticated.
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=self._shutdown_timeout_s,
        )
        self._socket = sock
        self._bound_port = sock.getsockname()[1]
        self._server = _OwnerHandlesSignals(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))

    async def wait(self) -> None:
        """Until the server ends by itself (it does not, unless it fails)."""
        if self._task is None:
            raise RuntimeError(f"{self._name} is not started: call start() first")
        await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Stop listening and close open connections; safe to call twice."""
        task, self._task = self._task, None
        server, sock = self._server, self._socket
        if task is None or server is None:
            return
        server.should_exit = True
        try:
            await task
        finally:
            if sock is not None:
                sock.close()
