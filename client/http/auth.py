"""Who may use ``llmmixer serve``: the bearer token, and the browser checks of every request.

When ``LLMMIXER_API_TOKEN`` is set (at least 16 characters), every API request
needs ``Authorization: Bearer <token>`` (compared in constant time); the page,
its static files, ``/healthz`` and ``/openapi.json`` are public because they
carry no run data. The token is accepted *only* in that header, never in a
query string: query strings end up in access logs, proxy logs and browser
history.

Loopback is not a wall against the web pages its user opens
(``llmmixer.runtime.http_guard`` explains the attacks): without a token only a
loopback ``Host`` is answered, and with or without one a request that changes
something must say ``Content-Type: application/json`` and must not come from
another origin (``Origin``, ``Sec-Fetch-Site``), or it is refused with 403/415
before any route runs. Every answer forbids framing and sniffing and carries a
Content-Security-Policy that lets the page run only its own script.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmmixer.runtime.http_guard import GuardPolicy, Refusal, bearer_matches, check_token

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "TOKEN_ENV",
    "SecurityHeaders",
    "ServeSettings",
    "guard_policy",
    "refused",
    "require_token",
]

TOKEN_ENV = "LLMMIXER_API_TOKEN"


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    """How the app behaves; ``token`` is never printed (it is left out of ``repr``)."""

    token: str | None = None
    """The bearer token every API request must carry; ``None`` lets every request in."""
    max_body_bytes: int = 1024 * 1024
    """Largest request body; a bigger one is refused with 413 before any route acts on it."""
    keepalive_s: float = 15.0
    """An SSE comment is sent after this long without an event, so proxies keep the
    connection open and a vanished client is noticed."""

    spec_threads: int = 4
    """Specs parsed and validated at once, each in a worker thread (never on the event
    loop, where a slow document would hold every other request)."""

    def __post_init__(self) -> None:
        # Raises TokenError, naming the variable, for a guessable token.
        check_token(TOKEN_ENV, self.token)

    def __repr__(self) -> str:
        token = "set" if self.token else "unset"
        return f"ServeSettings(token={token}, max_body_bytes={self.max_body_bytes})"


def settings_of(request: Request) -> ServeSettings:
    settings: ServeSettings = request.app.state.settings
    return settings


_bearer = HTTPBearer(
    auto_error=False,
    description=f"The value of {TOKEN_ENV} on the server, when it is set.",
)


async def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """The dependency of every API route: 401 unless the request carries the token."""
    expected = settings_of(request).token
    if expected is None:
        return
    # `credentials` is only there so the OpenAPI document declares the scheme;
    # the raw header is compared, as bytes and in constant time.
    if not bearer_matches(request.headers.get("authorization"), expected):
        raise HTTPException(
            status_code=401,
            detail=(
                "missing or wrong token: send `Authorization: Bearer <token>` "
                f"with the value of {TOKEN_ENV} the server was started with"
            ),
            headers={"WWW-Authenticate": "Bearer"},
        )


def guard_policy(settings: ServeSettings) -> GuardPolicy:
    """What ``runtime.http_guard.RequestGuard`` lets through to ``serve``'s routes."""
    return GuardPolicy(token_variable=TOKEN_ENV, token_set=settings.token is not None)


def refused(refusal: Refusal) -> ASGIApp:
    """The answer to a request the guard refuses, in the API's error shape."""
    return JSONResponse({"errors": [refusal.message]}, status_code=refusal.status)


#: The page loads only its own script and stylesheet and talks only to this server;
#: nothing may frame it, and no inline script runs (step outputs are shown as text).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    # Another site may not embed these answers (as a script, an image...) either.
    (b"cross-origin-resource-policy", b"same-origin"),
]


class SecurityHeaders:
    """Adds the headers above to every answer, refusals and the event stream included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in _SECURITY_HEADERS if n not in present]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)
