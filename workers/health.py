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

It is a small ASGI app on uvicorn, started inside the worker's event loop
(``llmmixer.runtime.http_server``): it keeps answering while the worker is
busy, and it reveals nothing (no versions, no settings, no ``Server`` header),
so binding ``0.0.0.0`` inside a container is harmless. Every response closes
its connection; a client that has not sent a whole request within
``read_timeout_s`` is dropped, so a stuck prober can never pile up connections,
and a request with more than 100 header lines is refused with 400.

The server is off unless ``LLMMIXER_HEALTH_PORT`` (or ``--health-port``) is
set; :func:`health_port_from_env` reads the variable with a clear error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Final

from llmmixer.runtime.http_server import AsgiServer
from llmmixer.runtime.settings import WorkerEnv

__all__ = [
    "HEALTH_PORT_ENV",
    "HealthServer",
    "Readiness",
    "ReadinessState",
    "health_app",
    "health_port_from_env",
]

HEALTH_PORT_ENV: Final = "LLMMIXER_HEALTH_PORT"

Readiness = Callable[[], bool | tuple[bool, str]]
"""Answers "is the worker ready?": ``True``/``False``, or ``(ready, reason)``.

It is called on the event loop for every ``/readyz`` request, so it must be
cheap and must not block: read a flag, do not dial Temporal.
"""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# More header lines than any real prober sends; such a request is refused.
# (uvicorn's h11 parser refuses a request line or header block over 16 KiB.)
_MAX_HEADER_LINES: Final = 100
# Keeps a 503 body to one short line whatever the readiness callable returns.
_MAX_REASON_CHARS: Final = 200


def health_port_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """The port from ``LLMMIXER_HEALTH_PORT``; ``None`` (server off) when unset or empty.

    Raises ``ValueError`` naming the variable for anything that is not a port
    number, so a typo in a manifest fails at start-up instead of silently
    turning the probes into restarts.
    """
    return WorkerEnv.from_env(environ).health_port


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


def health_app(readiness: Readiness) -> ASGIApp:
    """``/healthz`` and ``/readyz`` as an ASGI app, over ``readiness``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan, no websockets
        method: str = scope["method"]
        path: str = scope["path"]
        if len(scope["headers"]) > _MAX_HEADER_LINES:
            status, body = 400, "too many headers"
        elif path not in ("/healthz", "/readyz"):
            status, body = 404, "not found"
        elif method not in ("GET", "HEAD"):
            status, body = 405, "method not allowed"
        elif path == "/healthz":
            status, body = 200, "ok"
        else:
            ready, reason = _check_readiness(readiness)
            status, body = (200, "ready") if ready else (503, reason)
        payload = (body + "\n").encode()
        # Spelled as probers' documentation shows them; uvicorn sends names as given.
        headers = [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", str(len(payload)).encode()),
            (b"Cache-Control", b"no-store"),
            (b"Connection", b"close"),
        ]
        if status == 405:
            headers.append((b"Allow", b"GET, HEAD"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        # uvicorn leaves the body out of the answer to a HEAD.
        await send({"type": "http.response.body", "body": payload})

    return app


def _check_readiness(readiness: Readiness) -> tuple[bool, str]:
    try:
        answer = readiness()
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


class HealthServer(AsgiServer):
    """``/healthz`` and ``/readyz`` on ``host:port`` (``port=0`` picks a free one).

    ``start()``/``stop()`` or ``async with``; ``port`` is the one bound.
    """

    def __init__(
        self,
        host: str,
        port: int,
        readiness: Readiness,
        *,
        read_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(
            health_app(readiness),
            host,
            port,
            name="HealthServer",
            request_timeout_s=read_timeout_s,
        )
