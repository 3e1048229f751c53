"""Liveness and readiness endpoints for whatever supervises the worker.

Docker's ``HEALTHCHECK``, Compose's ``depends_on: service_healthy`` and
Kubernetes' probes all speak plain HTTP, so the worker answers two paths:

``GET /healthz``
    ``200 ok`` whenever this server answers at all. The server runs on the
    worker's own event loop, so an answer proves the process is alive *and* the
    loop is not wedged (a blocking call in an ``async def`` activity would stall
    it, and the liveness probe then restarts the pod).

``GET /readyz``
    ``200 ready`` when the ``readiness`` callable says so (connected to
    Temporal and polling the task queue), otherwise ``503`` with a one-line
    reason, e.g. ``503 connecting to Temporal at temporal:7233``.

Anything else is ``404``; methods other than ``GET``/``HEAD`` get ``405``.

It is deliberately a few dozen lines on ``asyncio.start_server`` rather than a
web framework: it must keep answering while the worker is busy, it adds no
dependency to the image, and it reveals nothing (no versions, no settings), so
binding ``0.0.0.0`` inside a container is harmless. Every connection gets one
response and is closed; a client that sends nothing is dropped after
``read_timeout_s`` so a stuck prober can never pile up connections.

The server is off unless ``LLMMIXER_HEALTH_PORT`` (or ``--health-port``) is
set; :func:`health_port_from_env` reads the variable with a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Final

__all__ = [
    "HEALTH_PORT_ENV",
    "HealthServer",
    "Readiness",
    "ReadinessState",
    "health_port_from_env",
]

HEALTH_PORT_ENV: Final = "LLMMIXER_HEALTH_PORT"

Readiness = Callable[[], bool | tuple[bool, str]]
"""Answers "is the worker ready?": ``True``/``False``, or ``(ready, reason)``.

It is called on the event loop for every ``/readyz`` request, so it must be
cheap and must not block: read a flag, do not dial Temporal.
"""

# A request line plus headers from any real prober fits easily in this; a
# longer line is refused rather than buffered (the StreamReader enforces it).
_LINE_LIMIT: Final = 8 * 1024
_MAX_HEADER_LINES: Final = 100
# Keeps a 503 body to one short line whatever the readiness callable returns.
_MAX_REASON_CHARS: Final = 200

_PHRASES: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def health_port_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """The port from ``LLMMIXER_HEALTH_PORT``; ``None`` (server off) when unset or empty.

    Raises ``ValueError`` naming the variable for anything that is not a port
    number, so a typo in a manifest fails at start-up instead of silently
    turning the probes into restarts.
    """
    raw = (os.environ if environ is None else environ).get(HEALTH_PORT_ENV, "").strip()
    if not raw:
        return None
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ValueError(
            f"{HEALTH_PORT_ENV}={raw!r} is not a port number: "
            "set it to 1-65535 (0 picks a free port), or unset it to turn the health server off"
        )
    return port


class ReadinessState:
    """A ready flag with a reason, for the worker to flip as it starts and stops.

    Pass the instance itself as the ``readiness`` callable. The worker starts
    it not ready ("starting"), marks it ready once polling, and marks it not
    ready again when shutdown begins so a supervisor stops counting the pod as
    available while it drains.
    """

    def __init__(self, reason: str = "starting") -> None:
        self._ready = False
        self._reason = reason

    def set_ready(self) -> None:
        self._ready = True
        self._reason = "ready"

    def set_not_ready(self, reason: str) -> None:
        self._ready = False
        self._reason = reason

    @property
    def ready(self) -> bool:
        return self._ready

    def __call__(self) -> tuple[bool, str]:
        return self._ready, self._reason


class HealthServer:
    """``/healthz`` and ``/readyz`` on ``host:port`` (``port=0`` picks a free one)."""

    def __init__(
        self,
        host: str,
        port: int,
        readiness: Readiness,
        *,
        read_timeout_s: float = 5.0,
    ) -> None:
        self._host = host
        self._requested_port = port
        self._readiness = readiness
        self._read_timeout_s = read_timeout_s
        self._server: asyncio.Server | None = None
        self._bound_port: int | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The port actually bound (differs from the requested one when that was 0)."""
        if self._bound_port is None:
            raise RuntimeError("HealthServer.port is known only after start()")
        return self._bound_port

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("HealthServer is already started")
        self._server = await asyncio.start_server(
            self._on_connection, self._host, self._requested_port, limit=_LINE_LIMIT
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop open connections; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # On 3.11 wait_closed() does not wait for handlers, and on 3.12+ it
        # waits for them forever; cancelling them makes both prompt.
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=1.0)
        await server.wait_closed()

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            # A prober that hangs up early, or stop(): nothing to answer.
            pass
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self._read_timeout_s):
                request_line = await reader.readline()
                for _ in range(_MAX_HEADER_LINES):
                    # Headers are read only to be discarded: nothing here
                    # depends on them, but a client expects its request consumed.
                    if (await reader.readline()).strip() == b"":
                        break
                else:
                    await self._respond(writer, "GET", 400, "too many headers")
                    return
        except TimeoutError:
            return
        except ValueError:  # a line longer than _LINE_LIMIT
            await self._respond(writer, "GET", 400, "request line too long")
            return
        if not request_line:
            return  # connected and closed without a request (a TCP probe)
        method, status, body = self._route(request_line)
        await self._respond(writer, method, status, body)

    def _route(self, request_line: bytes) -> tuple[str, int, str]:
        parts = request_line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "GET", 400, "malformed request line"
        method, target, _version = parts
        path = target.split("?", 1)[0]
        if path not in ("/healthz", "/readyz"):
            return method, 404, "not found"
        if method not in ("GET", "HEAD"):
            return method, 405, "method not allowed"
        if path == "/healthz":
            return method, 200, "ok"
        ready, reason = self._check_readiness()
        return method, (200 if ready else 503), ("ready" if ready else reason)

    def _check_readiness(self) -> tuple[bool, str]:
        try:
            answer = self._readiness()
        except Exception as exc:
            # Only the type: an exception's message can carry an address with
            # credentials or a provider's echo, and this endpoint is unauthenticated.
            return False, f"readiness check failed: {type(exc).__name__}"
        if isinstance(answer, tuple):
            ready, reason = answer
        else:
            ready, reason = bool(answer), ""
        reason = " ".join(str(reason).split())[:_MAX_REASON_CHARS] or "not ready"
        return bool(ready), reason

    async def _respond(
        self, writer: asyncio.StreamWriter, method: str, status: int, body: str
    ) -> None:
        payload = (body + "\n").encode()
        headers = [
            f"HTTP/1.1 {status} {_PHRASES[status]}",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(payload)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        if status == 405:
            headers.append("Allow: GET, HEAD")
        head = ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1")
        writer.write(head if method == "HEAD" else head + payload)
        await writer.drain()
