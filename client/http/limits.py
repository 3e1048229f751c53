"""The request body limit of ``llmmixer serve``.

FastAPI has its own (``max_body_size``, Starlette's ``RequestBodyLimitMiddleware``),
and it was tried first; it is not used because, measured against
``tests/test_serve.py::test_body_over_the_limit_is_413``, its 413 is a fixed
plain-text ``Content Too Large`` sent from inside the route, past the app's
exception handlers, so the API's ``{"errors": [...]}`` shape and its advice
were lost. It also checks a declared ``Content-Length`` only when a route reads
the body, so a route that takes none (``/cancel``) would act first and answer
413 afterwards. This middleware refuses before any route runs.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimit"]


class BodyLimit:
    """Refuses a request body over ``max_bytes`` with 413, keeping at most that much.

    A declared Content-Length over the limit is refused without keeping any of
    it; a chunked body is counted as it arrives. The rest of a refused body is
    read and dropped (up to ``_DRAIN_FACTOR`` times the limit) before the 413 is
    sent: a client still writing its body would otherwise see a reset
    connection instead of the answer. The accepted body is handed on whole.
    """

    _DRAIN_FACTOR = 16

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_large = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            more = bool(message.get("more_body", False))
            size += len(chunk)
            if too_large or size > self.max_bytes:
                too_large = True
                chunks.clear()
                if size > self.max_bytes * self._DRAIN_FACTOR:
                    break
                continue
            chunks.append(chunk)
        if too_large:
            await self._too_large(scope, receive, send)
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {
                "errors": [
                    f"the request body is over {self.max_bytes} bytes: send a smaller "
                    "spec, and give large inputs as files that the steps read"
                ]
            },
            status_code=413,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)
