"""Who may talk to llmmixer's own HTTP servers: ``llmmixer serve`` and the codec server.

Both servers follow one rule. Without a token they bind to loopback only, and
that alone is not enough: a page on any web site can make the browser send
requests to ``127.0.0.1``, so

* the ``Host`` header must be a loopback name. A foreign name that resolves to
  this machine (DNS rebinding) makes the attacker's page *same-origin* with the
  server, so the browser would let it read every answer and send anything;
* a state-changing request (POST, PUT, PATCH, DELETE) must come from the
  server's own origin: ``Sec-Fetch-Site`` ``same-origin`` or ``none``, and an
  ``Origin`` whose host is the request's ``Host``. A form on another site can
  POST ``text/plain`` or form data without asking the browser's permission
  (CORS applies only to reading the answer), so it is refused before any
  handler runs;
* a state-changing request must say ``Content-Type: application/json``, which
  a browser sends cross-origin only after a CORS preflight this server never
  grants.

A request with no ``Origin`` and no ``Sec-Fetch-Site`` (``curl``, httpx, the
Temporal CLI) is not a browser acting for another site, and passes.

With a token, every request must carry ``Authorization: Bearer <token>``;
the Host check is then dropped (the server may sit behind any name), and the
origin checks stay. A token shorter than :data:`MIN_TOKEN_LENGTH` is refused at
start: a short secret can be guessed over the network.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "MIN_TOKEN_LENGTH",
    "STATE_CHANGING",
    "GuardPolicy",
    "Refusal",
    "RequestGuard",
    "TokenError",
    "bearer_matches",
    "check_request",
    "check_token",
    "host_is_loopback",
]

MIN_TOKEN_LENGTH = 16
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_SAME_ORIGIN_FETCH = frozenset({"same-origin", "none"})


class TokenError(ValueError):
    """A configured token that is too weak to protect a server; the message says the fix."""


def check_token(variable: str, value: str | None) -> str | None:
    """The token from ``variable``, or ``None`` when it is unset or empty.

    Raises :class:`TokenError` naming ``variable`` when the token is shorter
    than :data:`MIN_TOKEN_LENGTH` characters.
    """
    if not value:
        return None
    if len(value) < MIN_TOKEN_LENGTH:
        raise TokenError(
            f"{variable} is {len(value)} characters long; it must be at least "
            f"{MIN_TOKEN_LENGTH} (a short token can be guessed over the network). Set it to a "
            f'long random secret, for example `export {variable}=$(python3 -c "import secrets; '
            'print(secrets.token_urlsafe())")`'
        )
    return value


def bearer_matches(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>``; never raises.

    Compared as bytes in constant time, so the answer's timing does not tell how
    much of a guess was right, and a header with non-ASCII characters is simply
    wrong (``hmac.compare_digest`` raises on non-ASCII ``str``). Header values
    arrive decoded as latin-1 (as ASGI and HTTP/1.1 define them), so encoding
    them back as latin-1 gives the bytes that were sent.
    """
    if not authorization:
        return False
    scheme, _, given = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    sent = given.strip().encode("latin-1", errors="replace")
    expected = token.encode("utf-8", errors="surrogateescape")
    return hmac.compare_digest(sent, expected)


def host_is_loopback(host: str | None) -> bool:
    """Whether a ``Host`` header names this machine's loopback: ``localhost``, ``127.0.0.1``,
    ``[::1]`` (any loopback address literal), with or without a port.

    Only the text is judged, never resolved: a name that merely resolves to
    127.0.0.1 is exactly what DNS rebinding uses.
    """
    if not host:
        return False
    text = host.strip()
    if text.startswith("["):
        name, sep, rest = text[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return False
        if ":" not in name:
            return False  # brackets hold IPv6 literals only
    else:
        name, sep, port = text.partition(":")
        if sep and not port.isdigit():
            return False  # an unbracketed IPv6 literal, or a malformed port
    return is_loopback_name(name)


def is_loopback_name(name: str) -> bool:
    """``localhost`` or a loopback IP literal (v4, v6, v4-mapped); names are never resolved."""
    bare = name.rstrip(".").lower()
    if bare == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


@dataclass(frozen=True, kw_only=True)
class GuardPolicy:
    """What one server accepts."""

    token_variable: str
    """The environment variable holding the server's token, named in refusals."""
    token_set: bool
    """With a token the Host check is off (the token is checked by the server's routes)."""
    allowed_origins: frozenset[str] = field(default_factory=frozenset)
    """Other origins whose browsers may send state-changing requests (the codec server's
    Temporal Web UI); ``scheme://host[:port]``, compared exactly."""
    require_json: bool = True
    """State-changing requests must declare ``Content-Type: application/json``."""
    hint: str = ""
    """Appended to a Host refusal: how to reach the server instead."""


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _origin_host(origin: str) -> str | None:
    try:
        parts = urlsplit(origin)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return parts.netloc.lower()


def check_request(
    method: str, headers: Mapping[str, str], policy: GuardPolicy, *, port: int | None = None
) -> Refusal | None:
    """Why a request must be refused, or ``None``.

    ``headers`` has lower-case names; ``port`` is the server's, for the advice.
    """
    host = headers.get("host")
    if not policy.token_set and not host_is_loopback(host):
        address = f"http://127.0.0.1:{port or 'PORT'}/"
        return Refusal(
            403,
            f"refused: the Host {host!r} is not a loopback name. Without "
            f"{policy.token_variable} this server answers only requests addressed to "
            "localhost, 127.0.0.1 or [::1], so a web page whose name points at this machine "
            f"(DNS rebinding) cannot use it. Use {address}, or set "
            f"{policy.token_variable} on the server and send it as a Bearer token"
            + (f"; {policy.hint}" if policy.hint else ""),
        )
    if method.upper() not in STATE_CHANGING:
        return None
    origin = headers.get("origin")
    fetch_site = (headers.get("sec-fetch-site") or "").strip().lower()
    if origin is None or origin not in policy.allowed_origins:
        if fetch_site and fetch_site not in _SAME_ORIGIN_FETCH:
            return Refusal(
                403,
                f"refused: the browser says this request comes from another site "
                f"(Sec-Fetch-Site: {fetch_site}); only the server's own page may send it. "
                "Use that page, or send the request from a script or `curl` (no Origin "
                "header)",
            )
        if origin is not None and _origin_host(origin) != (host or "").strip().lower():
            return Refusal(
                403,
                f"refused: the request comes from the origin {origin!r}, not from this "
                f"server's own ({host!r}); a page on another origin may not send it. "
                "Use the server's own page, or send the request from a script or `curl` "
                "(no Origin header)",
            )
    if policy.require_json and _media_type(headers.get("content-type")) != "application/json":
        return Refusal(
            415,
            f"refused: a {method.upper()} must have the header `Content-Type: application/json` "
            "and a JSON body (`{}` when there is nothing to send), which a page on another "
            "site cannot send without this server's permission; for example "
            "`curl -H 'Content-Type: application/json' -d '{}' URL`",
        )
    return None


# ---- as ASGI middleware --------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestGuard:
    """Applies :func:`check_request` before ``app`` sees a request.

    ``respond(refusal)`` builds the ASGI app that answers a refused request, so
    each server keeps its own error body.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        policy: GuardPolicy,
        respond: Callable[[Refusal], ASGIApp],
    ) -> None:
        self.app = app
        self.policy = policy
        self.respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for name, value in scope.get("headers") or []:
            # A repeated header keeps its first value: the one every check sees.
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        server = scope.get("server")
        port = server[1] if server and len(server) > 1 else None
        refusal = check_request(scope["method"], headers, self.policy, port=port)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        await self.respond(refusal)(scope, receive, send)
