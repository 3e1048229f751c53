"""One local HTTP server that speaks the OpenAI, Anthropic and Gemini wire protocols.

The real SDKs are pointed at it through their base URL (never patched), so
tests exercise the SDKs' own request building, SSE parsing and error classes.
It is written on the standard library only (asyncio streams, HTTP/1.1 with
keep-alive: a connection serves request after request until the client
closes it or it idles for ``keep_alive_s``, as the SDKs' pools expect) and
runs its own event loop in a daemon thread, so it works from sync and async
tests alike and a hung reply never blocks a test's loop.

Routes (``/v1`` is part of the OpenAI base URL, as with the real service)::

    POST /v1/chat/completions                     OpenAI Chat Completions (SSE + [DONE])
    POST /v1/responses                            OpenAI Responses (typed SSE events)
    POST /v1/messages                             Anthropic Messages (message_start..message_stop)
    POST /{version}/models/{model}:streamGenerateContent?alt=sse   Gemini
    POST /{version}/models/{model}:generateContent                 Gemini, not streamed
    POST /upload/{version}/files                  Gemini Files API (resumable upload)

Files in a request (images, PDFs, text documents) are read in each API's own
wire shape, base64 data URLs and Gemini file URIs of earlier uploads included:
``RecordedCall.files`` holds what arrived, and an unscripted reply names each
file by type, size and sha256, so a test sees that the bytes came through whole.

Streams use chunked transfer encoding, so a clean end (``0\\r\\n\\r\\n``) and a
connection cut mid-way are different things to the client, as in real life.

Scripting: queue :class:`Reply` objects per provider (and optionally model);
an unscripted call gets a deterministic reply derived from its prompt.

Unkind on request, as the real services are: an error event in the middle of
a stream, in each API's own shape (``stream_error``); an HTML error page from
a proxy (``html``); a malformed SSE line (``malformed_after``); safety blocks
(``block_reason``, ``refusal``, a ``finish_reason``); thinking parts
(``thinking``); cache and reasoning usage (``cached_tokens``,
``cache_write_tokens``, ``reasoning_tokens``); rate-limit headers
(:func:`rate_limit_headers`).

Gemini explicit caching: ``POST /{version}/cachedContents`` stores the
contents and system instruction it is given (from
``GEMINI_MIN_CACHED_TOKENS`` tokens on, else a 400 as the real API answers;
``refuse_gemini_caches`` refuses every one); a generate request naming it in
``cachedContent`` reports its tokens as ``cachedContentTokenCount``.
Creations are listed in :attr:`FakeProviderServer.gemini_caches`, not in
``calls``.

Anthropic prompt caching is accounted as Anthropic does it: a request whose
system or messages carry ``cache_control`` breakpoints reads the longest
prefix already cached (reported as ``cache_read_input_tokens``, billed at 0.1x
input) and writes the rest up to its last breakpoint (``cache_creation_input_tokens``,
1.25x). A prefix is cached only from ``ANTHROPIC_MIN_CACHED_TOKENS`` tokens on,
and only once the writing reply has started (its ``message_start`` was sent),
so siblings sent at the same moment all miss, as they do for real. Anthropic
prompt tokens are counted as one per four characters of text (``fake_tokens``),
cached or not, unless a reply scripts its own ``usage``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import http
import json
import random
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "ANTHROPIC_MIN_CACHED_TOKENS",
    "FAKE_KEYS",
    "GEMINI_MIN_CACHED_TOKENS",
    "FakeProviderServer",
    "RawRequest",
    "ReceivedFile",
    "RecordedCall",
    "Reply",
    "ToolUse",
    "fake_tokens",
    "rate_limit_headers",
]

# The smallest prefix Anthropic caches (Sonnet and Opus; Haiku wants more).
ANTHROPIC_MIN_CACHED_TOKENS = 1024

# The smallest context Gemini 2.5 Flash caches explicitly.
GEMINI_MIN_CACHED_TOKENS = 1024

# Keys the fixtures put in the environment; shaped like real ones so the
# generic redaction patterns are exercised too.
FAKE_KEYS: Mapping[str, str] = {
    "OPENAI_API_KEY": "sk-fake-openai-0123456789abcdef",
    "ANTHROPIC_API_KEY": "sk-ant-fake-0123456789abcdef",
    "GEMINI_API_KEY": "AIzaFAKE-gemini-0123456789abcdefghij",
}

_GEMINI_CACHES = re.compile(r"^/(?P<version>[^/]+)/cachedContents$")
_GEMINI_PATH = re.compile(r"^/(?P<version>[^/]+)/models/(?P<model>[^/:]+):(?P<method>\w+)$")
_WORDS = re.compile(r"\s*\S+")
_GEMINI_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_ANTHROPIC_ERROR = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


@dataclass(frozen=True)
class ToolUse:
    """One tool call a scripted reply makes, sent in the API's own shape.

    ``arguments`` as a mapping is sent as JSON; as a string it is sent as it
    is (Anthropic and Gemini need an object; OpenAI's APIs carry a string, so
    a broken one can be scripted). ``id``: the call id (by default one in the
    provider's style; Gemini sends none unless given). ``signature``: Gemini's
    ``thoughtSignature`` (base64) on the call's part, which a thinking model
    wants back with the call on the next turn.
    """

    name: str
    arguments: Mapping[str, Any] | str = field(default_factory=dict)
    id: str | None = None
    signature: str | None = None

    def json_arguments(self) -> str:
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(dict(self.arguments))

    def object_arguments(self) -> dict[str, Any]:
        if isinstance(self.arguments, str):
            value = json.loads(self.arguments)
            return value if isinstance(value, dict) else {}
        return dict(self.arguments)


@dataclass
class Reply:
    """One scripted answer (or fault) for one request.

    Success: ``text`` (or explicit ``chunks``), ``usage=(input, output)``,
    ``chunk_delay_s``, ``think_s`` (silence after the stream opens and
    before its first text, as a reasoning model keeps), ``model`` (the model
    name the response reports),
    ``finish_reason`` (provider-native, e.g. ``"content_filter"``, ``"refusal"``,
    ``"SAFETY"``). Faults: ``status`` (with ``headers``, ``message`` or a whole
    ``body``; ``echo_credential`` puts the received key into the error message,
    as some servers do), ``hang`` (accept and never answer), ``cut_after``
    (send that many text chunks, then drop the connection), ``truncate_after``
    (send that many chunks, then end the body cleanly without the terminal event),
    ``stall_after`` (send that many text chunks, then go silent with the
    connection open until the client gives up).
    """

    text: str | None = None
    chunks: list[str] | None = None
    usage: tuple[int, int] | None = None
    chunk_delay_s: float | None = None
    think_s: float = 0.0
    model: str | None = None
    finish_reason: str | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    message: str | None = None
    body: Any = None
    echo_credential: bool = False
    hang: bool = False
    cut_after: int | None = None
    truncate_after: int | None = None
    stall_after: int | None = None
    # --- unkind replies -----------------------------------------------------------
    #: After ``error_after`` text chunks, an error event in the API's own shape
    #: (Anthropic ``event: error``, Responses ``response.failed``, a Chat
    #: Completions ``{"error": ...}`` chunk, a Gemini ``{"error": ...}`` chunk);
    #: the value is the error's type or code, e.g. ``"overloaded_error"``.
    stream_error: str | None = None
    error_after: int = 0
    #: With ``status``: the error comes as a proxy's HTML page (text/html).
    html: bool = False
    #: After that many text chunks, a ``data:`` line that is not JSON.
    malformed_after: int | None = None
    #: Gemini: the prompt is blocked (``promptFeedback.blockReason``, no candidates).
    block_reason: str | None = None
    #: OpenAI: a structured-output refusal streamed instead of content.
    refusal: str | None = None
    #: Thinking before the answer (Anthropic thinking blocks, Gemini thought
    #: parts, a Responses reasoning summary); never part of the answer.
    thinking: list[str] | None = None
    #: Usage details in each API's fields (cached prompt tokens are part of
    #: the input count, reasoning tokens part of the output count).
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    #: Tool calls after the text (parallel when several), each streamed in
    #: its API's shape; the finish reason is then the API's tool-call one.
    tool_calls: list[ToolUse] | None = None


@dataclass
class LatencyMix:
    """A drawn wait before each reply's first text: ``slow_s`` for ``slow_share``
    of the calls, ``fast_s`` for the others, from a ``seed``ed generator (the
    tail a hedge is there to cut)."""

    fast_s: float = 1.0
    slow_s: float = 10.0
    slow_share: float = 0.05
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def draw(self) -> float:
        return self.slow_s if self._rng.random() < self.slow_share else self.fast_s


def fake_tokens(text: str) -> int:
    """How many tokens the fake counts for ``text``: one per four characters."""
    return (len(text) + 3) // 4


def rate_limit_headers(
    provider: str, *, requests_left: int, tokens_left: int, reset_s: float = 60.0
) -> dict[str, str]:
    """The rate-limit headers ``provider`` sends with every reply, in its own names."""
    if provider == "anthropic":
        # RFC 3339 with milliseconds, so a reset a second away is one second away.
        at = datetime.fromtimestamp(time.time() + reset_s, UTC)
        reset = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {
            "anthropic-ratelimit-requests-limit": "1000",
            "anthropic-ratelimit-requests-remaining": str(requests_left),
            "anthropic-ratelimit-requests-reset": reset,
            "anthropic-ratelimit-tokens-limit": "100000",
            "anthropic-ratelimit-tokens-remaining": str(tokens_left),
            "anthropic-ratelimit-tokens-reset": reset,
        }
    return {
        "x-ratelimit-limit-requests": "1000",
        "x-ratelimit-remaining-requests": str(requests_left),
        "x-ratelimit-reset-requests": f"{reset_s:g}s",
        "x-ratelimit-limit-tokens": "100000",
        "x-ratelimit-remaining-tokens": str(tokens_left),
        "x-ratelimit-reset-tokens": f"{reset_s:g}s",
    }


@dataclass(frozen=True)
class ReceivedFile:
    """One file a request carried: how it came (``part``: the API's part type) and its bytes."""

    part: str
    media_type: str
    data: bytes
    name: str | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class RecordedCall:
    """What the server received (the credential only as a fingerprint)."""

    provider: str
    api: str  # "chat" | "responses" | "messages" | "generate"
    model: str
    path: str
    body: dict[str, Any]
    stream: bool
    authorization_present: bool
    api_key_header_present: bool
    credential_fingerprint: str | None
    # time.monotonic() when the request arrived, to measure retry spacing.
    received_at: float = 0.0
    # Which TCP connection carried it (1, 2, ...): equal numbers mean reuse.
    connection: int = 0
    # Files the request carried, in order (see ReceivedFile).
    files: tuple[ReceivedFile, ...] = ()

    def sent_key(self, key: str) -> bool:
        """Whether this request carried exactly ``key``."""
        return self.credential_fingerprint == _fingerprint(key)


@dataclass(frozen=True)
class RawRequest:
    """Every request the server read, routed or not, as it arrived (headers lower-cased).

    Security tests read these to prove a server never saw a key: a request
    that matched no route (a 404) is still a request that may have carried one.
    """

    method: str
    target: str  # path and query string, as sent
    headers: Mapping[str, str]
    body: bytes

    def carries(self, secret: str) -> bool:
        """Whether ``secret`` appears anywhere in this request: target, any header, body."""
        if not secret:
            return False
        return (
            secret in self.target
            or any(secret in v for v in self.headers.values())
            or secret.encode() in self.body
        )


def _fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    target: str = ""


class FakeProviderServer:
    """Start with :meth:`start` (or the ``provider_server`` fixture), stop with :meth:`stop`."""

    def __init__(self, *, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.chunk_delay_s = 0.0
        """Delay before each streamed text chunk when a reply does not set its own."""
        self.keep_alive_s = 5.0
        """How long an idle kept-alive connection stays open before the server closes it."""
        self.latency: LatencyMix | None = None
        """When set, a reply without its own ``think_s`` waits a drawn time before its text."""
        self._hung_up: list[RecordedCall] = []
        self._lock = threading.Lock()
        self._connections = 0
        # Anthropic prompt cache: prefix digest -> its tokens.
        self._anthropic_cache: dict[str, int] = {}
        # Gemini explicit caches: name -> tokens; and every creation request's body.
        self._gemini_caches: dict[str, int] = {}
        self._gemini_cache_bodies: list[dict[str, Any]] = []
        self.refuse_gemini_caches = False
        """Answer every Gemini cache creation with a 400, as a model without caching does."""
        self._queues: dict[str, list[tuple[str | None, Reply]]] = {}
        self._calls: list[RecordedCall] = []
        self._requests: list[RawRequest] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Gemini Files API: upload id -> (display name, media type, bytes so far),
        # and the finished files by URI.
        self._uploading: dict[str, tuple[str, str, bytearray]] = {}
        self._uploaded: dict[str, ReceivedFile] = {}

    # --- addresses ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    @property
    def gemini_base_url(self) -> str:
        return self.url

    def base_url(self, provider: str) -> str:
        return {
            "openai": self.openai_base_url,
            "anthropic": self.anthropic_base_url,
            "gemini": self.gemini_base_url,
        }[provider]

    def env(self, *, keys: bool = True) -> dict[str, str]:
        """The contract's variables pointing every SDK here (with fake keys)."""
        env = {
            "OPENAI_BASE_URL": self.openai_base_url,
            "ANTHROPIC_BASE_URL": self.anthropic_base_url,
            "GOOGLE_GEMINI_BASE_URL": self.gemini_base_url,
        }
        if keys:
            env.update(FAKE_KEYS)
        return env

    # --- scripting ---------------------------------------------------------------------

    def script(self, provider: str, *replies: Reply, model: str | None = None) -> None:
        """Queue replies for ``provider`` (only for ``model`` when given), used in order."""
        with self._lock:
            queue = self._queues.setdefault(provider, [])
            queue.extend((model, r) for r in replies)

    def reply(self, provider: str, text: str, *, model: str | None = None, **kw: Any) -> None:
        self.script(provider, Reply(text=text, **kw), model=model)

    def fail(
        self,
        provider: str,
        status: int,
        *,
        headers: Mapping[str, str] | None = None,
        message: str | None = None,
        model: str | None = None,
        times: int = 1,
        **kw: Any,
    ) -> None:
        reply = Reply(status=status, headers=dict(headers or {}), message=message, **kw)
        self.script(provider, *([reply] * times), model=model)

    def hang(self, provider: str, *, model: str | None = None) -> None:
        self.script(provider, Reply(hang=True), model=model)

    def cut(
        self,
        provider: str,
        *,
        after_chunks: int = 1,
        text: str | None = None,
        model: str | None = None,
    ) -> None:
        self.script(provider, Reply(text=text, cut_after=after_chunks), model=model)

    def truncate(
        self,
        provider: str,
        *,
        after_chunks: int = 1,
        text: str | None = None,
        model: str | None = None,
    ) -> None:
        self.script(provider, Reply(text=text, truncate_after=after_chunks), model=model)

    def pending(self, provider: str | None = None) -> int:
        """Scripted replies not used yet."""
        with self._lock:
            if provider is not None:
                return len(self._queues.get(provider, []))
            return sum(len(q) for q in self._queues.values())

    def reset(self) -> None:
        with self._lock:
            self._queues.clear()
            self._calls.clear()
            self._requests.clear()
            self._anthropic_cache.clear()
            self._gemini_caches.clear()
            self._gemini_cache_bodies.clear()
            self._uploading.clear()
            self._uploaded.clear()
            self._hung_up.clear()
        self.refuse_gemini_caches = False
        self.chunk_delay_s = 0.0
        self.keep_alive_s = 5.0
        self.latency = None

    @property
    def hung_up(self) -> list[RecordedCall]:
        """Calls whose client closed the connection before their first text (a cancelled call)."""
        with self._lock:
            return list(self._hung_up)

    @property
    def connections(self) -> int:
        """TCP connections accepted so far (kept-alive ones count once)."""
        with self._lock:
            return self._connections

    # --- inspection --------------------------------------------------------------------

    @property
    def calls(self) -> list[RecordedCall]:
        with self._lock:
            return list(self._calls)

    @property
    def requests(self) -> list[RawRequest]:
        """Every request read so far, including ones no route answered."""
        with self._lock:
            return list(self._requests)

    @property
    def gemini_caches(self) -> list[dict[str, Any]]:
        """The bodies of every Gemini ``cachedContents`` creation request, in order."""
        with self._lock:
            return list(self._gemini_cache_bodies)

    @property
    def uploads(self) -> list[ReceivedFile]:
        """Files uploaded through the Gemini Files API, in order."""
        with self._lock:
            return list(self._uploaded.values())

    def count(self, provider: str | None = None, model: str | None = None) -> int:
        return sum(
            1
            for c in self.calls
            if (provider is None or c.provider == provider) and (model is None or c.model == model)
        )

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> FakeProviderServer:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._connection, self.host, 0)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported to the starting thread
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-provider-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake provider server did not start within 10 s")
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = self._server = None

    def __enter__(self) -> FakeProviderServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- HTTP --------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            self._connections += 1
            connection = self._connections
        try:
            while True:
                try:
                    request = await asyncio.wait_for(_read_request(reader), self.keep_alive_s)
                except TimeoutError:
                    return  # idle too long: close, as servers do; the SDK must cope
                if request is None:
                    return
                with self._lock:
                    self._requests.append(
                        RawRequest(request.method, request.target, request.headers, request.body)
                    )
                reusable = await self._dispatch(request, reader, writer, connection)
                if not reusable or request.headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        except asyncio.CancelledError:
            pass  # server shutting down
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(
        self,
        req: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        connection: int = 0,
    ) -> bool:
        """Answer one request; True when the connection may carry another."""
        if req.method == "POST" and req.path.startswith("/upload/"):
            await self._upload(req, writer)
            return True
        try:
            body = json.loads(req.body or b"{}")
        except json.JSONDecodeError:
            await _send_json(writer, 400, {"error": {"message": "body is not JSON"}})
            return True
        if req.method == "POST" and _GEMINI_CACHES.match(req.path):
            await self._create_gemini_cache(writer, body)
            return True
        route = self._route(req, body)
        if route is None:
            await _send_json(writer, 404, {"error": {"message": f"no route for {req.path}"}})
            return True
        provider, api, model, stream = route
        credential = _credential(req)
        call = RecordedCall(
            provider=provider,
            api=api,
            model=model,
            path=req.path,
            body=body,
            stream=stream,
            authorization_present="authorization" in req.headers,
            api_key_header_present="x-api-key" in req.headers or "x-goog-api-key" in req.headers,
            credential_fingerprint=_fingerprint(credential) if credential else None,
            received_at=time.monotonic(),
            connection=connection,
            files=tuple(self._received_files(api, body)),
        )
        reply = self._take(provider, model, call)
        if reply.hang:
            await _wait_for_hang_up(reader)
            return False
        if reply.status != 200:
            await self._send_error(writer, provider, reply, credential)
            return True
        text = reply.text if reply.text is not None else _default_text(provider, api, model, body)
        if reply.text is None and call.files:
            text += "".join(
                f" [saw {f.media_type} {len(f.data)} bytes sha256:{f.sha256}]" for f in call.files
            )
        chunks = reply.chunks if reply.chunks is not None else _WORDS.findall(text)
        text = "".join(chunks)
        cache_writes: list[tuple[str, int]] = []
        if reply.usage is None and api == "messages":
            reply, usage, cache_writes = self._anthropic_cache_usage(reply, body, chunks)
        elif reply.usage is None and body.get("cachedContent"):
            with self._lock:
                cached = self._gemini_caches.get(str(body["cachedContent"]))
            if cached is None:
                message = f"CachedContent not found (or expired): {body['cachedContent']}"
                await self._send_error(writer, "gemini", Reply(status=400, message=message), None)
                return True
            reply = dataclasses.replace(reply, cached_tokens=cached)
            usage = (cached + _count_words(body), max(1, len(chunks)))
        else:
            usage = reply.usage or (_count_words(body), max(1, len(chunks)))
        response_model = reply.model or model
        builder = _Builder(provider, api, response_model, text, chunks, usage, reply, body)
        if not stream:
            self._cache_written(cache_writes)
            await _send_json(writer, 200, builder.whole(), reply.headers)
            return True
        head, content, tail = builder.events()
        delay = reply.chunk_delay_s if reply.chunk_delay_s is not None else self.chunk_delay_s
        await _start_stream(writer, reply.headers)
        for event in head:
            await _write_chunk(writer, event)
        # The reply has started: from now on the prefix is read from the cache.
        self._cache_written(cache_writes)
        think_s = reply.think_s
        if not think_s and self.latency is not None:
            with self._lock:
                think_s = self.latency.draw()
        if think_s and not await _think(reader, think_s):
            with self._lock:
                self._hung_up.append(call)
            return False
        for index, event in enumerate(content):
            if reply.cut_after is not None and index >= reply.cut_after:
                writer.transport.abort()  # drop the connection: no terminal chunk
                return False
            if reply.truncate_after is not None and index >= reply.truncate_after:
                break
            if reply.stall_after is not None and index >= reply.stall_after:
                await _wait_for_hang_up(reader)
                return False
            if reply.stream_error is not None and index >= reply.error_after:
                await _write_chunk(writer, builder.error_event(reply.stream_error))
                break
            if reply.malformed_after is not None and index >= reply.malformed_after:
                await _write_chunk(writer, b'data: {"broken": \n\n')
                break
            if delay:
                await asyncio.sleep(delay)
            await _write_chunk(writer, event)
        else:
            if reply.cut_after is not None:
                writer.transport.abort()
                return False
            if reply.stream_error is not None:
                await _write_chunk(writer, builder.error_event(reply.stream_error))
            elif reply.malformed_after is not None:
                await _write_chunk(writer, b'data: {"broken": \n\n')
            elif reply.truncate_after is None:
                for event in tail:
                    await _write_chunk(writer, event)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _create_gemini_cache(
        self, writer: asyncio.StreamWriter, body: dict[str, Any]
    ) -> None:
        """``cachedContents.create``: keep the context's token count under a new name."""
        texts = [
            str(part.get("text", ""))
            for content in [body.get("systemInstruction") or {}, *(body.get("contents") or [])]
            for part in content.get("parts") or []
        ]
        tokens = sum(fake_tokens(text) for text in texts)
        with self._lock:
            self._gemini_cache_bodies.append(body)
            refused = self.refuse_gemini_caches
            name = f"cachedContents/fake-{len(self._gemini_cache_bodies)}"
        if refused or tokens < GEMINI_MIN_CACHED_TOKENS:
            message = (
                f"Cached content is too small. total_token_count={tokens}, "
                f"min_total_token_count={GEMINI_MIN_CACHED_TOKENS}"
                if not refused
                else f"Model {body.get('model')} does not support explicit caching"
            )
            await self._send_error(writer, "gemini", Reply(status=400, message=message), None)
            return
        with self._lock:
            self._gemini_caches[name] = tokens
        ttl_s = float(str(body.get("ttl", "3600s")).rstrip("s") or 3600)
        expires = datetime.fromtimestamp(time.time() + ttl_s, UTC)
        await _send_json(
            writer,
            200,
            {
                "name": name,
                "model": body.get("model"),
                "expireTime": expires.isoformat().replace("+00:00", "Z"),
                "usageMetadata": {"totalTokenCount": tokens},
            },
        )

    async def _upload(self, req: _Request, writer: asyncio.StreamWriter) -> None:
        """The Gemini Files API's resumable upload: start, then chunks up to ``finalize``."""
        command = req.headers.get("x-goog-upload-command", "")
        if command == "start":
            meta = json.loads(req.body or b"{}").get("file") or {}
            upload_id = f"u{len(self._uploading) + len(self._uploaded) + 1}"
            media_type = req.headers.get("x-goog-upload-header-content-type", "")
            with self._lock:
                self._uploading[upload_id] = (
                    str(meta.get("displayName") or meta.get("display_name") or ""),
                    media_type or str(meta.get("mimeType") or meta.get("mime_type") or ""),
                    bytearray(),
                )
            headers = {
                "x-goog-upload-url": f"{self.url}/upload/v1beta/files?upload_id={upload_id}",
                "x-goog-upload-status": "active",
            }
            await _send_json(writer, 200, {}, headers)
            return
        upload_id = (req.query.get("upload_id") or [""])[0]
        with self._lock:
            pending = self._uploading.get(upload_id)
        if pending is None or not command.startswith("upload"):
            await _send_json(writer, 400, {"error": {"message": "unknown upload"}})
            return
        name, media_type, data = pending
        offset = int(req.headers.get("x-goog-upload-offset", "0"))
        if offset != len(data):
            await _send_json(writer, 400, {"error": {"message": f"offset {offset} != {len(data)}"}})
            return
        data.extend(req.body)
        if "finalize" not in command:
            await _send_json(writer, 200, {}, {"x-goog-upload-status": "active"})
            return
        file_id = hashlib.sha256(bytes(data)).hexdigest()[:12]
        uri = f"{self.url}/v1beta/files/{file_id}"
        with self._lock:
            del self._uploading[upload_id]
            self._uploaded[uri] = ReceivedFile("upload", media_type, bytes(data), name or None)
        answer = {
            "file": {
                "name": f"files/{file_id}",
                "displayName": name,
                "mimeType": media_type,
                "sizeBytes": str(len(data)),
                "uri": uri,
                "state": "ACTIVE",
            }
        }
        await _send_json(writer, 200, answer, {"x-goog-upload-status": "final"})

    def _received_files(self, api: str, body: dict[str, Any]) -> Iterator[ReceivedFile]:
        """The files of a request, read from each API's own part shapes."""
        if api == "messages":
            for message in body.get("messages") or []:
                for block in _parts(message.get("content")):
                    source = block.get("source") or {}
                    if block.get("type") not in ("image", "document"):
                        continue
                    if source.get("type") == "base64":
                        data = base64.b64decode(source.get("data", ""), validate=True)
                    elif source.get("type") == "text":
                        data = str(source.get("data", "")).encode()
                    else:
                        continue
                    yield ReceivedFile(
                        block["type"], str(source.get("media_type")), data, block.get("title")
                    )
        elif api == "chat":
            for message in body.get("messages") or []:
                for part in _parts(message.get("content")):
                    if part.get("type") == "image_url":
                        media_type, data = _data_url(str((part.get("image_url") or {}).get("url")))
                        yield ReceivedFile("image_url", media_type, data)
                    elif part.get("type") == "file":
                        file = part.get("file") or {}
                        media_type, data = _data_url(str(file.get("file_data")))
                        yield ReceivedFile("file", media_type, data, file.get("filename"))
        elif api == "responses":
            items = body.get("input")
            for item in items if isinstance(items, list) else []:
                for part in _parts(item.get("content") if isinstance(item, dict) else None):
                    if part.get("type") == "input_image":
                        media_type, data = _data_url(str(part.get("image_url")))
                        yield ReceivedFile("input_image", media_type, data)
                    elif part.get("type") == "input_file":
                        media_type, data = _data_url(str(part.get("file_data")))
                        yield ReceivedFile("input_file", media_type, data, part.get("filename"))
        elif api == "generate":
            for content in body.get("contents") or []:
                for part in _parts(content.get("parts")):
                    inline = part.get("inlineData") or part.get("inline_data")
                    if inline:
                        # google-genai sends URL-safe base64 without padding; the API takes both.
                        encoded = str(inline.get("data", ""))
                        data = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
                        media_type = str(inline.get("mimeType") or inline.get("mime_type"))
                        yield ReceivedFile("inline_data", media_type, data)
                    file_data = part.get("fileData") or part.get("file_data") or {}
                    uri = file_data.get("fileUri") or file_data.get("file_uri")
                    if uri:
                        with self._lock:
                            stored = self._uploaded.get(uri)
                        if stored is not None:
                            yield dataclasses.replace(stored, part="file_data")

    def _anthropic_cache_usage(
        self, reply: Reply, body: dict[str, Any], chunks: list[str]
    ) -> tuple[Reply, tuple[int, int], list[tuple[str, int]]]:
        """Usage of a request with cache breakpoints, as Anthropic accounts it.

        Returns the reply with its cache fields set, (uncached input, output),
        and the prefixes this request writes (visible once its reply starts).
        """
        model = str(body.get("model", ""))
        digest = hashlib.sha256(model.encode())
        seen = 0
        breakpoints: list[tuple[str, int]] = []
        for text, marked in _anthropic_blocks(body):
            digest.update(text.encode())
            seen += fake_tokens(text)
            if marked and seen >= ANTHROPIC_MIN_CACHED_TOKENS:
                breakpoints.append((digest.copy().hexdigest(), seen))
        total = seen
        with self._lock:
            read = max(
                (tokens for key, tokens in breakpoints if key in self._anthropic_cache), default=0
            )
        last = breakpoints[-1][1] if breakpoints else 0
        written = max(0, last - read)
        writes = [(key, tokens) for key, tokens in breakpoints if tokens > read]
        reply = dataclasses.replace(reply, cached_tokens=read, cache_write_tokens=written)
        return reply, (total - read - written, max(1, len(chunks))), writes

    def _cache_written(self, writes: list[tuple[str, int]]) -> None:
        with self._lock:
            self._anthropic_cache.update(writes)

    def _route(self, req: _Request, body: dict[str, Any]) -> tuple[str, str, str, bool] | None:
        if req.method != "POST":
            return None
        if req.path.endswith("/chat/completions"):
            return ("openai", "chat", str(body.get("model", "")), bool(body.get("stream")))
        if req.path.endswith("/responses"):
            return ("openai", "responses", str(body.get("model", "")), bool(body.get("stream")))
        if req.path.endswith("/v1/messages"):
            return ("anthropic", "messages", str(body.get("model", "")), bool(body.get("stream")))
        match = _GEMINI_PATH.match(req.path)
        if match and match["method"] in ("streamGenerateContent", "generateContent"):
            return (
                "gemini",
                "generate",
                match["model"],
                match["method"] == "streamGenerateContent",
            )
        return None

    def _take(self, provider: str, model: str, call: RecordedCall) -> Reply:
        with self._lock:
            self._calls.append(call)
            queue = self._queues.get(provider, [])
            for i, (wanted, reply) in enumerate(queue):
                if wanted is None or wanted == model:
                    del queue[i]
                    return reply
        return Reply()

    async def _send_error(
        self, writer: asyncio.StreamWriter, provider: str, reply: Reply, credential: str | None
    ) -> None:
        message = reply.message or f"fake {provider} error {reply.status}"
        if reply.echo_credential:
            message = f"{message} (Incorrect API key provided: {credential})"
        if reply.html:
            phrase = _status_line(reply.status).decode().split(" ", 2)[2].strip()
            page = (
                f"<html>\r\n<head><title>{reply.status} {phrase}</title></head>\r\n<body>\r\n"
                f"<center><h1>{reply.status} {phrase}</h1></center>\r\n"
                f"<hr><center>{message}</center>\r\n</body>\r\n</html>\r\n"
            )
            await _send_bytes(writer, reply.status, page.encode(), "text/html", reply.headers)
            return
        body = reply.body
        if body is None:
            if provider == "anthropic":
                kind = _ANTHROPIC_ERROR.get(reply.status, "api_error")
                body = {"type": "error", "error": {"type": kind, "message": message}}
            elif provider == "gemini":
                status = _GEMINI_STATUS.get(reply.status, "UNKNOWN")
                body = {"error": {"code": reply.status, "message": message, "status": status}}
            else:
                body = {"error": {"message": message, "type": "fake_error", "code": None}}
        await _send_json(writer, reply.status, body, reply.headers)


# --- wire formats ----------------------------------------------------------------------


class _Builder:
    """Builds one provider's success payloads, split into head / content / tail events."""

    def __init__(
        self,
        provider: str,
        api: str,
        model: str,
        text: str,
        chunks: list[str],
        usage: tuple[int, int],
        reply: Reply,
        body: dict[str, Any],
    ) -> None:
        self.provider, self.api, self.model = provider, api, model
        self.text, self.chunks, self.usage = text, chunks, usage
        self.reply, self.body = reply, body
        self.created = int(time.time())

    def tool_uses(self, prefix: str) -> list[tuple[str, ToolUse]]:
        """The scripted tool calls with their ids (``prefix`` + index unless scripted)."""
        return [
            (use.id or f"{prefix}{i}", use) for i, use in enumerate(self.reply.tool_calls or [])
        ]

    def error_event(self, kind: str) -> bytes:
        """An error inside a stream that began with 200, in this API's own shape."""
        message = f"fake {kind} in the middle of the stream"
        if self.api == "messages":
            return _sse(
                {"type": "error", "error": {"type": kind, "message": message}}, event="error"
            )
        if self.api == "responses":
            failed = self._response_object("failed")
            failed["error"] = {"code": kind, "message": message}
            return _sse(
                {"type": "response.failed", "sequence_number": 999_999, "response": failed},
                event="response.failed",
            )
        if self.api == "chat":
            return _sse({"error": {"message": message, "type": kind, "code": kind}})
        code = next((c for c, name in _GEMINI_STATUS.items() if name == kind), 500)
        return _sse({"error": {"code": code, "message": message, "status": kind}}, crlf=True)

    def events(self) -> tuple[list[bytes], list[bytes], list[bytes]]:
        if self.api == "chat":
            return self._chat_events()
        if self.api == "responses":
            return self._responses_events()
        if self.api == "messages":
            return self._anthropic_events()
        return self._gemini_events()

    def whole(self) -> dict[str, Any]:
        inp, out = self.usage
        if self.api == "chat":
            return {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": self.text},
                        "finish_reason": self.reply.finish_reason or "stop",
                    }
                ],
                "usage": self._chat_usage(),
            }
        if self.api == "responses":
            return self._response_object("completed")
        if self.api == "messages":
            return {
                "id": "msg_fake",
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [{"type": "text", "text": self.text}],
                "stop_reason": self.reply.finish_reason or "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": inp, "output_tokens": out},
            }
        return self._gemini_chunk(self.text, finish=True)

    def _chat_usage(self) -> dict[str, Any]:
        inp, out = self.usage
        return {
            "prompt_tokens": inp,
            "completion_tokens": out,
            "total_tokens": inp + out,
            "prompt_tokens_details": {"cached_tokens": self.reply.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reply.reasoning_tokens},
        }

    # OpenAI Chat Completions: data-only SSE, finish chunk, usage chunk, [DONE].
    def _chat_events(self) -> tuple[list[bytes], list[bytes], list[bytes]]:
        def chunk(choices: list[dict[str, Any]], usage: Any = None) -> bytes:
            payload: dict[str, Any] = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": choices,
            }
            if usage is not None:
                payload["usage"] = usage
            return _sse(payload)

        head = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])]
        content = [
            chunk([{"index": 0, "delta": {"content": c}, "finish_reason": None}])
            for c in self.chunks
        ]
        if self.reply.refusal is not None:
            content = [chunk([{"index": 0, "delta": {"refusal": self.reply.refusal}}])]
        tail = []
        for i, (call_id, use) in enumerate(self.tool_uses("call_fake_")):
            start = {
                "index": i,
                "id": call_id,
                "type": "function",
                "function": {"name": use.name, "arguments": ""},
            }
            tail.append(chunk([{"index": 0, "delta": {"tool_calls": [start]}}]))
            arguments = use.json_arguments()
            half = len(arguments) // 2
            for piece in (arguments[:half], arguments[half:]):
                more = {"index": i, "function": {"arguments": piece}}
                tail.append(chunk([{"index": 0, "delta": {"tool_calls": [more]}}]))
        default = "tool_calls" if self.reply.tool_calls else "stop"
        finish = self.reply.finish_reason or default
        tail.append(chunk([{"index": 0, "delta": {}, "finish_reason": finish}]))
        options = self.body.get("stream_options") or {}
        if options.get("include_usage"):
            tail.append(chunk([], self._chat_usage()))
        tail.append(b"data: [DONE]\n\n")
        return head, content, tail

    def _response_object(self, status: str) -> dict[str, Any]:
        inp, out = self.usage
        obj: dict[str, Any] = {
            "id": "resp_fake",
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": [],
            "parallel_tool_calls": False,
            "tool_choice": "auto",
            "tools": [],
        }
        if status not in ("in_progress", "failed"):
            obj["output"] = [
                {
                    "type": "message",
                    "id": "msg_fake",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": self.text, "annotations": []}],
                },
                *(
                    self._function_call_item(call_id, use)
                    for call_id, use in self.tool_uses("call_fake_")
                ),
            ]
            obj["usage"] = {
                "input_tokens": inp,
                "output_tokens": out,
                "total_tokens": inp + out,
                "input_tokens_details": {"cached_tokens": self.reply.cached_tokens},
                "output_tokens_details": {"reasoning_tokens": self.reply.reasoning_tokens},
            }
        if status == "incomplete":
            obj["incomplete_details"] = {"reason": self.reply.finish_reason}
        return obj

    def _function_call_item(self, call_id: str, use: ToolUse) -> dict[str, Any]:
        return {
            "type": "function_call",
            "id": f"fc_{call_id}",
            "call_id": call_id,
            "name": use.name,
            "arguments": use.json_arguments(),
            "status": "completed",
        }

    # OpenAI Responses: typed events with a sequence number.
    def _responses_events(self) -> tuple[list[bytes], list[bytes], list[bytes]]:
        seq = iter(range(1_000_000))

        def ev(kind: str, **data: Any) -> bytes:
            return _sse({"type": kind, "sequence_number": next(seq), **data}, event=kind)

        head = [
            ev("response.created", response=self._response_object("in_progress")),
            ev("response.in_progress", response=self._response_object("in_progress")),
            ev(
                "response.output_item.added",
                output_index=0,
                item={
                    "type": "message",
                    "id": "msg_fake",
                    "status": "in_progress",
                    "role": "assistant",
                    "content": [],
                },
            ),
            ev(
                "response.content_part.added",
                item_id="msg_fake",
                output_index=0,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": []},
            ),
        ]
        for thought in self.reply.thinking or []:
            head.append(
                ev(
                    "response.reasoning_summary_text.delta",
                    item_id="rs_fake",
                    output_index=0,
                    summary_index=0,
                    delta=thought,
                )
            )
        content = [
            ev(
                "response.output_text.delta",
                item_id="msg_fake",
                output_index=0,
                content_index=0,
                delta=c,
                logprobs=[],
            )
            for c in self.chunks
        ]
        if self.reply.refusal is not None:
            content = [
                ev(
                    "response.refusal.delta",
                    item_id="msg_fake",
                    output_index=0,
                    content_index=0,
                    delta=self.reply.refusal,
                )
            ]
        finish = self.reply.finish_reason
        terminal = "response.incomplete" if finish else "response.completed"
        tail = [
            ev(
                "response.output_text.done",
                item_id="msg_fake",
                output_index=0,
                content_index=0,
                text=self.text,
                logprobs=[],
            )
        ]
        for index, (call_id, use) in enumerate(self.tool_uses("call_fake_"), start=1):
            done = self._function_call_item(call_id, use)
            started = {**done, "arguments": "", "status": "in_progress"}
            arguments = use.json_arguments()
            tail += [
                ev("response.output_item.added", output_index=index, item=started),
                ev(
                    "response.function_call_arguments.delta",
                    item_id=done["id"],
                    output_index=index,
                    delta=arguments,
                ),
                ev(
                    "response.function_call_arguments.done",
                    item_id=done["id"],
                    output_index=index,
                    name=use.name,
                    arguments=arguments,
                ),
                ev("response.output_item.done", output_index=index, item=done),
            ]
        tail.append(
            ev(terminal, response=self._response_object("incomplete" if finish else "completed"))
        )
        return head, content, tail

    # Anthropic Messages: named events from message_start to message_stop.
    def _anthropic_events(self) -> tuple[list[bytes], list[bytes], list[bytes]]:
        inp, out = self.usage

        def ev(kind: str, **data: Any) -> bytes:
            return _sse({"type": kind, **data}, event=kind)

        head = [
            ev(
                "message_start",
                message={
                    "id": "msg_fake",
                    "type": "message",
                    "role": "assistant",
                    "model": self.model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": inp,
                        "output_tokens": 1,
                        "cache_creation_input_tokens": self.reply.cache_write_tokens,
                        "cache_read_input_tokens": self.reply.cached_tokens,
                    },
                },
            ),
        ]
        text_index = 0
        if self.reply.thinking:
            block = {"type": "thinking", "thinking": "", "signature": ""}
            head.append(ev("content_block_start", index=0, content_block=block))
            for thought in self.reply.thinking:
                delta = {"type": "thinking_delta", "thinking": thought}
                head.append(ev("content_block_delta", index=0, delta=delta))
            delta = {"type": "signature_delta", "signature": "fake-signature"}
            head.append(ev("content_block_delta", index=0, delta=delta))
            head.append(ev("content_block_stop", index=0))
            text_index = 1
        head += [
            ev("content_block_start", index=text_index, content_block={"type": "text", "text": ""}),
            ev("ping"),
        ]
        content = [
            ev("content_block_delta", index=text_index, delta={"type": "text_delta", "text": c})
            for c in self.chunks
        ]
        tail = [ev("content_block_stop", index=text_index)]
        for index, (call_id, use) in enumerate(self.tool_uses("toolu_fake_"), start=text_index + 1):
            block = {"type": "tool_use", "id": call_id, "name": use.name, "input": {}}
            tail.append(ev("content_block_start", index=index, content_block=block))
            arguments = use.json_arguments()
            half = len(arguments) // 2
            for piece in (arguments[:half], arguments[half:]):
                delta = {"type": "input_json_delta", "partial_json": piece}
                tail.append(ev("content_block_delta", index=index, delta=delta))
            tail.append(ev("content_block_stop", index=index))
        default = "tool_use" if self.reply.tool_calls else "end_turn"
        tail += [
            ev(
                "message_delta",
                delta={
                    "stop_reason": self.reply.finish_reason or default,
                    "stop_sequence": None,
                },
                usage={"output_tokens": out},
            ),
            ev("message_stop"),
        ]
        return head, content, tail

    def _gemini_chunk(self, text: str, *, finish: bool) -> dict[str, Any]:
        inp, out = self.usage
        candidate: dict[str, Any] = {
            "content": {"parts": [{"text": text}], "role": "model"},
            "index": 0,
        }
        usage: dict[str, Any] = {"promptTokenCount": inp}
        if finish:
            candidate["finishReason"] = self.reply.finish_reason or "STOP"
            usage.update({"candidatesTokenCount": out, "totalTokenCount": inp + out})
            if self.reply.cached_tokens:
                usage["cachedContentTokenCount"] = self.reply.cached_tokens
            if self.reply.reasoning_tokens:
                usage["thoughtsTokenCount"] = self.reply.reasoning_tokens
        return {
            "candidates": [candidate],
            "usageMetadata": usage,
            "modelVersion": self.model,
            "responseId": "fake-response",
        }

    # Gemini: data-only SSE; the last chunk carries finishReason and the full usage.
    def _gemini_events(self) -> tuple[list[bytes], list[bytes], list[bytes]]:
        if self.reply.block_reason is not None:
            blocked = {
                "promptFeedback": {
                    "blockReason": self.reply.block_reason,
                    "blockReasonMessage": "the prompt was blocked by the fake's safety filter",
                },
                "usageMetadata": {"promptTokenCount": self.usage[0]},
                "modelVersion": self.model,
            }
            return [], [], [_sse(blocked, crlf=True)]
        head = []
        for thought in self.reply.thinking or []:
            chunk = self._gemini_chunk(thought, finish=False)
            chunk["candidates"][0]["content"]["parts"][0]["thought"] = True
            head.append(_sse(chunk, crlf=True))
        content = [_sse(self._gemini_chunk(c, finish=False), crlf=True) for c in self.chunks]
        tail = []
        if self.reply.tool_calls:
            # Parallel calls arrive together, as parts of one chunk.
            chunk = self._gemini_chunk("", finish=False)
            chunk["candidates"][0]["content"]["parts"] = [
                {
                    "functionCall": {
                        "name": use.name,
                        "args": use.object_arguments(),
                        **({"id": use.id} if use.id else {}),
                    },
                    **({"thoughtSignature": use.signature} if use.signature else {}),
                }
                for use in self.reply.tool_calls
            ]
            tail.append(_sse(chunk, crlf=True))
        tail.append(_sse(self._gemini_chunk("", finish=True), crlf=True))
        return head, content, tail


async def _think(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Wait ``seconds``; False when the client hung up meanwhile."""
    hang_up = asyncio.ensure_future(reader.read(1))
    done, _ = await asyncio.wait({hang_up}, timeout=seconds)
    if not done:
        hang_up.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hang_up
        return True
    try:
        return bool(hang_up.result())  # b"": the client closed the connection
    except (ConnectionError, OSError):
        return False


async def _wait_for_hang_up(reader: asyncio.StreamReader) -> None:
    """Never answer; return once the client gives up (or the server stops)."""
    with contextlib.suppress(Exception):
        while await reader.read(1024):
            pass


def _parts(content: Any) -> Iterator[dict[str, Any]]:
    for part in content if isinstance(content, list) else []:
        if isinstance(part, dict):
            yield part


def _data_url(url: str) -> tuple[str, bytes]:
    """(media type, bytes) of a ``data:TYPE;base64,...`` URL, as OpenAI's APIs take files."""
    head, _, data = url.partition(",")
    if not head.startswith("data:") or not head.endswith(";base64"):
        raise ValueError(f"not a base64 data URL: {url[:40]!r}")
    return head[5:-7], base64.b64decode(data, validate=True)


def _sse(data: Any, *, event: str | None = None, crlf: bool = False) -> bytes:
    nl = "\r\n" if crlf else "\n"
    head = f"event: {event}{nl}" if event else ""
    return f"{head}data: {json.dumps(data)}{nl}{nl}".encode()


def _prompt_text(api: str, body: dict[str, Any]) -> str:
    """The last user message's text, in any of the four request shapes."""

    def flatten(content: Any) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(
                str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content
            )
        return ""

    if api in ("chat", "messages"):
        for message in reversed(body.get("messages") or []):
            if message.get("role") == "user":
                return flatten(message.get("content"))
        return ""
    if api == "responses":
        items = body.get("input")
        if isinstance(items, str):
            return items
        for item in reversed(items or []):
            if isinstance(item, dict) and item.get("role") == "user":
                return flatten(item.get("content"))
        return ""
    for content in reversed(body.get("contents") or []):
        if content.get("role", "user") == "user":
            return flatten(content.get("parts"))
    return ""


def _wants_json(api: str, body: dict[str, Any]) -> bool:
    if api == "chat":
        return (body.get("response_format") or {}).get("type") in ("json_object", "json_schema")
    if api == "responses":
        fmt = ((body.get("text") or {}).get("format") or {}).get("type")
        return fmt in ("json_object", "json_schema")
    if api == "messages":
        system = body.get("system") or ""
        return isinstance(system, str) and "JSON" in system
    config = body.get("generationConfig") or {}
    return config.get("responseMimeType") == "application/json"


def _default_text(provider: str, api: str, model: str, body: dict[str, Any]) -> str:
    """Deterministic: the same request always gets the same reply."""
    prompt = _prompt_text(api, body)
    if _wants_json(api, body):
        return json.dumps({"provider": provider, "model": model, "echo": prompt})
    return f"[{provider}/{model}] you said: {prompt}"


def _anthropic_blocks(body: dict[str, Any]) -> Iterator[tuple[str, bool]]:
    """The text blocks of a Messages request in prompt order, with their breakpoints."""

    def blocks(content: Any) -> Iterator[tuple[str, bool]]:
        if isinstance(content, str):
            yield content, False
            return
        for block in content or []:
            if isinstance(block, dict):
                yield str(block.get("text", "")), bool(block.get("cache_control"))

    yield from blocks(body.get("system"))
    for message in body.get("messages") or []:
        yield from blocks(message.get("content"))


def _count_words(body: dict[str, Any]) -> int:
    """A stable stand-in for prompt token counting."""
    return max(1, len(re.findall(r"\w+", json.dumps(body))) // 4)


def _credential(req: _Request) -> str | None:
    auth = req.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    for name in ("x-api-key", "x-goog-api-key"):
        if req.headers.get(name):
            return req.headers[name]
    keys = req.query.get("key")
    return keys[0] if keys else None


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    parts = urlsplit(target)
    return _Request(method, parts.path, parse_qs(parts.query), headers, body, target)


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


def _header_lines(headers: Iterator[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}: {v}\r\n".encode() for k, v in headers)


async def _send_json(
    writer: asyncio.StreamWriter,
    status: int,
    payload: Any,
    extra: Mapping[str, str] | None = None,
) -> None:
    await _send_bytes(writer, status, json.dumps(payload).encode(), "application/json", extra)


async def _send_bytes(
    writer: asyncio.StreamWriter,
    status: int,
    data: bytes,
    content_type: str,
    extra: Mapping[str, str] | None = None,
) -> None:
    headers = {
        "content-type": content_type,
        "content-length": str(len(data)),
        "connection": "keep-alive",
        **(extra or {}),
    }
    writer.write(_status_line(status) + _header_lines(iter(headers.items())) + b"\r\n" + data)
    await writer.drain()


async def _start_stream(writer: asyncio.StreamWriter, extra: Mapping[str, str]) -> None:
    headers = {
        "content-type": "text/event-stream",
        "transfer-encoding": "chunked",
        "cache-control": "no-cache",
        "connection": "keep-alive",
        **extra,
    }
    writer.write(_status_line(200) + _header_lines(iter(headers.items())) + b"\r\n")
    await writer.drain()


async def _write_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()
