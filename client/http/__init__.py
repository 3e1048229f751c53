"""``llmmixer serve``: the HTTP API, its Server-Sent Events and the web page, on FastAPI.

``auth`` (token, browser checks, security headers), ``models`` (bodies),
``routes`` (the API), ``events`` (SSE) and ``app`` (assembly and the command).
"""

from llmmixer.client.http.app import DEFAULT_HOST, DEFAULT_PORT, create_app, serve
from llmmixer.client.http.auth import CONTENT_SECURITY_POLICY, TOKEN_ENV, ServeSettings

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "TOKEN_ENV",
    "ServeSettings",
    "create_app",
    "serve",
]
