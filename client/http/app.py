"""``llmmixer serve``: the app assembled from ``auth``, ``routes`` and ``events``, and the command.

    GET  /                 the web page (client/static/index.html) and /static/*
    GET  /healthz          liveness; no token needed
    GET  /openapi.json     the OpenAPI document (docs/api.md is generated from it)
    /workflows...          the API (``routes.py``)

Errors are always ``{"errors": ["..."]}``, each message saying what to do.
A request body over ``ServeSettings.max_body_bytes`` is refused with 413
before any route runs (``limits.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from llmmixer.client.http.auth import (
    TOKEN_ENV,
    SecurityHeaders,
    ServeSettings,
    guard_policy,
    refused,
)
from llmmixer.client.http.events import OpenStreams
from llmmixer.client.http.limits import BodyLimit
from llmmixer.client.http.routes import KnownRuns, api
from llmmixer.client.mixer import MixerClient
from llmmixer.runtime.address import is_loopback
from llmmixer.runtime.http_guard import RequestGuard

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "create_app", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
STATIC_DIR = Path(__file__).parent.parent / "static"


def _error_messages(detail: Any) -> list[str]:
    if isinstance(detail, list):
        return [str(item) for item in detail]
    return [str(detail)]


def create_app(mixer: MixerClient, settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app over a connected ``MixerClient``."""
    settings = settings or ServeSettings()
    app = FastAPI(
        title="llmmixer",
        summary="Start, watch and steer durable multi-LLM workflows.",
        version="1",
        # Swagger UI and ReDoc load their scripts from a CDN; the page at / is the UI.
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        # A body is read as JSON only with a JSON Content-Type (the default since
        # FastAPI 0.132, stated so it never changes under us): text/plain and form
        # posts are what other web sites can send without a CORS preflight.
        strict_content_type=True,
    )
    app.state.mixer = mixer
    app.state.settings = settings
    app.state.streams = OpenStreams()
    app.state.known_runs = KnownRuns()
    app.state.spec_limiter = anyio.CapacityLimiter(settings.spec_threads)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"errors": _error_messages(error.detail)},
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def body_error(request: Request, error: RequestValidationError) -> JSONResponse:
        messages = []
        for item in error.errors():
            where = ".".join(str(part) for part in item.get("loc", ()))
            messages.append(f"{where}: {item.get('msg', 'invalid')}")
        return JSONResponse({"errors": messages}, status_code=422)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(api)
    # The last added runs first: headers on every answer, then the browser checks,
    # then the body limit, so a refused request's body is never read.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestGuard, policy=guard_policy(settings), respond=refused)
    app.add_middleware(SecurityHeaders)
    return app


# ---- the command ---------------------------------------------------------------------------


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> int:
    """``llmmixer serve``: exit 2 for a refused configuration, 1 if Temporal is unreachable."""
    import uvicorn

    from llmmixer.runtime.connection import Connection
    from llmmixer.runtime.settings import ServeEnv, SettingsError

    try:
        token = ServeEnv.from_env().api_token
    except SettingsError as error:
        _err(f"refusing to start: {error}")
        return 2
    if token is None and not is_loopback(host):
        _err(
            f"refusing to serve on {host}: anyone who can reach it could start and steer runs. "
            f"Set {TOKEN_ENV} to a long random secret (for example `export {TOKEN_ENV}="
            '$(python3 -c "import secrets; print(secrets.token_urlsafe())")`), '
            "or serve on 127.0.0.1"
        )
        return 2
    connection = Connection.from_env()
    try:
        mixer = MixerClient(await connection.connect(), connection.task_queue)
    except RuntimeError as error:
        _err(
            f"cannot reach Temporal at {connection.address}: {error}. "
            "Start `llmmixer dev`, or set TEMPORAL_ADDRESS"
        )
        return 1
    if token is None:
        _err(
            f"{TOKEN_ENV} is not set: the API is open to every local user of this machine "
            "(web pages cannot use it: only loopback Host names and same-origin requests "
            "are answered)"
        )
    app = create_app(mixer, ServeSettings(token=token))
    shown = f"[{host}]" if ":" in host else host
    _err(
        f"starting on http://{shown}:{port}/ (API under /workflows, OpenAPI at /openapi.json) "
        f"for Temporal {connection.address}, task queue {connection.task_queue!r}"
    )
    # The access log shows method, path and status; the token travels only in a
    # header, which uvicorn never logs.
    config = uvicorn.Config(app, host=host, port=port, log_level="info", lifespan="off")
    server = uvicorn.Server(config)
    try:
        await server.serve()
    except SystemExit:
        # uvicorn exits the process when it cannot bind (it has logged why);
        # returning instead lets the CLI leave through its usual, safe exit.
        _err(f"cannot listen on {shown}:{port}: choose another --port, or stop what uses it")
        return 1
    return 0 if server.started else 1
