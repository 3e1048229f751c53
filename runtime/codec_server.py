"""The codec server: Temporal's ``/encode`` and ``/decode`` for the CLI and the Web UI.

With ``LLMMIXER_PAYLOAD_KEY`` set, history holds only ciphertext, and the
Temporal CLI (``--codec-endpoint``) and Web UI (Settings → Codec Server) show
payloads only through this server (``llmmixer codec-server``, also
``python -m llmmixer.workers.storage codec-server``). Bodies are
``{"payloads": [...]}`` in protobuf JSON; errors are ``{"error": "..."}``.

Whoever can call ``/decode`` reads every payload, so it follows ``llmmixer
serve``'s rule (``llmmixer.runtime.http_guard``): without
``LLMMIXER_CODEC_TOKEN`` it binds to loopback only, answers only a loopback
``Host``, and a browser may post only from the Web UI's origin
(``--allow-origin``) or the server's own; with a token, every request but the
CORS preflight must carry it. It is an ASGI app (Starlette's request,
responses and body limit) on uvicorn, like the other HTTP servers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Final

from google.protobuf import json_format
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from temporalio.api.common.v1 import Payloads
from temporalio.converter import PayloadCodec

from llmmixer.runtime.address import is_loopback
from llmmixer.runtime.http_guard import (
    GuardPolicy,
    RequestGuard,
    TokenError,
    bearer_matches,
    check_token,
)
from llmmixer.runtime.http_server import AsgiServer
from llmmixer.runtime.settings import ServeEnv, SettingsError
from llmmixer.runtime.storage import PayloadSettings, codec_for

__all__ = [
    "CODEC_TOKEN_ENV",
    "DEFAULT_CODEC_ORIGIN",
    "DEFAULT_CODEC_PORT",
    "CodecServerRefused",
    "add_codec_server_arguments",
    "codec_app",
    "codec_main",
    "codec_server_command",
    "serve_codec",
]

CODEC_TOKEN_ENV: Final = "LLMMIXER_CODEC_TOKEN"
DEFAULT_CODEC_PORT: Final = 8089
DEFAULT_CODEC_ORIGIN: Final = "http://localhost:8233"
_CODEC_MAX_BODY: Final = 64 * 1024 * 1024


class CodecServerRefused(ValueError):
    """A codec server configuration that would expose every payload; the message says the fix."""


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def _too_large() -> Response:
    return _error(413, f"the body is over {_CODEC_MAX_BODY} bytes")


def codec_app(
    codec: PayloadCodec, *, allow_origin: str = DEFAULT_CODEC_ORIGIN, token: str | None = None
) -> ASGIApp:
    """The codec server as an ASGI app: ``POST .../encode`` and ``POST .../decode``.

    Any path ending in ``/encode`` or ``/decode`` is served, so the endpoint may
    sit under a prefix (the Web UI appends the paths to the address it is given).
    """

    async def transcode(scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            body = await request.body()
        except HTTPException:  # Starlette's body limit, counting a body as it arrives
            await _too_large()(scope, receive, send)
            return
        payloads = Payloads()
        try:
            json_format.Parse(body, payloads)
        except (json_format.ParseError, UnicodeDecodeError) as parse_error:
            response = _error(400, f'the body must be {{"payloads": [...]}}: {parse_error}')
        else:
            if request.url.path.rstrip("/").endswith("/encode"):
                result = await codec.encode(list(payloads.payloads))
            else:
                result = await codec.decode(list(payloads.payloads))
            response = Response(
                json_format.MessageToJson(Payloads(payloads=result)),
                media_type="application/json",
            )
        await response(scope, receive, send)

    limited = RequestBodyLimitMiddleware(transcode, max_body_size=_CODEC_MAX_BODY)

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        path = request.url.path.rstrip("/")
        declared = request.headers.get("content-length", "")
        if request.method == "OPTIONS":
            refusal: Response | None = JSONResponse({})  # the preflight carries no credentials
        elif token is not None and not bearer_matches(request.headers.get("authorization"), token):
            refusal = _error(
                401, f"missing or wrong token: send `Authorization: Bearer ${CODEC_TOKEN_ENV}`"
            )
        elif request.method != "POST" or not path.endswith(("/encode", "/decode")):
            refusal = _error(404, "POST /encode or /decode")
        elif declared.isdigit() and int(declared) > _CODEC_MAX_BODY:
            # Answered here, in this server's error shape: past this point
            # Starlette's limit would answer a declared oversize in plain text.
            refusal = _too_large()
        else:
            refusal = None
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await limited(scope, receive, send)

    guarded = RequestGuard(
        endpoint,
        policy=GuardPolicy(
            token_variable=CODEC_TOKEN_ENV,
            token_set=token is not None,
            allowed_origins=frozenset({allow_origin}),
            hint="give that address to --codec-endpoint or the Web UI's Codec Server setting",
        ),
        respond=lambda refusal: _error(refusal.status, refusal.message),
    )
    cors = [
        (b"access-control-allow-origin", allow_origin.encode("latin-1")),
        (b"access-control-allow-methods", b"POST, OPTIONS"),
        (b"access-control-allow-headers", b"content-type, x-namespace, authorization"),
        (b"access-control-allow-credentials", b"true"),
        (b"vary", b"Origin"),
    ]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan, no websockets

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *cors]
            await send(message)

        await guarded(scope, receive, send_with_cors)

    return app


async def serve_codec(
    codec: PayloadCodec,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_CODEC_PORT,
    allow_origin: str = DEFAULT_CODEC_ORIGIN,
    token: str | None = None,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve :func:`codec_app` until cancelled.

    ``allow_origin`` is the Web UI's origin (CORS). Without ``token`` only a
    loopback ``host`` is accepted (:class:`CodecServerRefused` otherwise); a
    token shorter than 16 characters raises ``TokenError``; a port in use
    raises ``OSError``. ``ready(port)`` is called once the port is bound.
    """
    token = check_token(CODEC_TOKEN_ENV, token)
    if token is None and not is_loopback(host):
        raise CodecServerRefused(
            f"refusing to serve the codec on {host}: whoever reaches it can decrypt every "
            f"payload. Set {CODEC_TOKEN_ENV} to a long random secret (the Temporal CLI sends "
            f'it with --codec-auth "Bearer $TOKEN"), or serve on 127.0.0.1'
        )
    app = codec_app(codec, allow_origin=allow_origin, token=token)
    async with AsgiServer(app, host, port, name="codec server") as server:
        if ready is not None:
            ready(server.port)
        await server.wait()


async def codec_server_command(host: str, port: int, allow_origin: str) -> int:
    """``llmmixer codec-server`` (and ``python -m llmmixer.workers.storage codec-server``)."""
    codec = codec_for(PayloadSettings.from_env())
    if codec is None:
        print(
            "no codec configured: set LLMMIXER_PAYLOAD_KEY (and/or LLMMIXER_PAYLOAD_COMPRESS=1) "
            "as the workers have it",
            file=sys.stderr,
        )
        return 2
    try:
        token = ServeEnv.from_env().codec_token
    except SettingsError as error:
        print(f"refusing to start: {error}", file=sys.stderr)
        return 2
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host

    def announce(bound: int) -> None:
        print(
            json.dumps({"codec_server": f"http://{shown}:{bound}", "token": bool(token)}),
            flush=True,
        )

    try:
        await serve_codec(
            codec,
            host=host,
            port=port,
            allow_origin=allow_origin,
            token=token,
            ready=announce,
        )
    except (TokenError, CodecServerRefused) as error:
        print(f"refusing to start: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(
            f"cannot listen on {shown}:{port}: {error.strerror}; choose another --port",
            file=sys.stderr,
        )
        return 1
    return 0


def add_codec_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help=f"beyond loopback needs {CODEC_TOKEN_ENV}"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_CODEC_PORT)
    parser.add_argument(
        "--allow-origin", default=DEFAULT_CODEC_ORIGIN, help="the Web UI's origin (CORS)"
    )


def codec_main(argv: Sequence[str] | None = None) -> int:
    """``python -m llmmixer.workers.storage codec-server``: the name the docs give."""
    parser = argparse.ArgumentParser(
        prog="python -m llmmixer.workers.storage",
        description="Payload tools; `llmmixer codec-server` is the same command.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    server = sub.add_parser("codec-server", help="serve /encode and /decode with this codec")
    add_codec_server_arguments(server)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(codec_server_command(args.host, args.port, args.allow_origin))
    return 0
