"""Large payloads and payload encryption: the data converter's storage and codecs.

A 5 MB model output is larger than a Temporal payload may be (the server
refuses blobs over 2 MB), so payloads at or above a threshold are kept outside
history by ``temporalio.converter.ExternalStorage``; history then holds a small
reference. Where they go::

    LLMMIXER_PAYLOAD_STORE            fs (default) | s3 | off
    LLMMIXER_PAYLOAD_DIR              fs: the directory (default $LLMMIXER_HOME/payloads)
    LLMMIXER_PAYLOAD_S3_BUCKET        setting it selects s3 (the SDK's S3 driver; needs
                                      `pip install 'llmmixer[s3]'`); credentials, region
                                      and endpoint from the usual AWS_* variables
    LLMMIXER_PAYLOAD_THRESHOLD_BYTES  payloads this large or larger leave history (262144)

The filesystem store suits the embedded server and a single host: every
client and worker that reads a run must see the same directory. Several hosts
share S3 instead (or a shared volume). With S3 on, the directory is still read,
so runs stored there before the switch stay readable.

Codecs, both off by default::

    LLMMIXER_PAYLOAD_COMPRESS=1   zlib-compress payloads of at least the threshold size
    LLMMIXER_PAYLOAD_KEY          AES-256-GCM encrypt every payload; base64 or hex of
                                  32 random bytes. Comma-separated keys rotate: the first
                                  encrypts, all decrypt.

Compression only touches payloads at or above the threshold, so the workflow's
result and ``progress`` answer, kept below it (docs/interventions.md), stay plain JSON
for ``temporal workflow result/query``. Encryption applies to every payload:
that is its point, and then the Temporal CLI and Web UI need the codec server
(``llmmixer codec-server``, also ``python -m llmmixer.workers.storage
codec-server``) to show anything: ``temporal workflow result --codec-endpoint
http://127.0.0.1:8089`` and, in the Web UI, Settings → Codec Server →
``http://127.0.0.1:8089``. It decrypts for whoever reaches it, so without
``LLMMIXER_CODEC_TOKEN`` it serves loopback only, to loopback ``Host`` names.

The codec runs before external storage, so stored payloads are compressed and
encrypted as well; the key never leaves the processes that hold it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
import sys
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.contrib.aws.s3driver import S3StorageDriver, S3StorageDriverClient
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import (
    DataConverter,
    ExternalStorage,
    PayloadCodec,
    StorageDriver,
    StorageDriverClaim,
    StorageDriverRetrieveContext,
    StorageDriverSelectContext,
    StorageDriverStoreContext,
)

from llmmixer.runtime.home import default_home
from llmmixer.runtime.settings import ConnectionEnv, PayloadEnv

__all__ = [
    "CODEC_TOKEN_ENV",
    "DEFAULT_THRESHOLD",
    "AesGcmCodec",
    "CodecChain",
    "CodecServerRefused",
    "FileSystemStorageDriver",
    "LazyAioboto3Client",
    "PayloadKeyError",
    "PayloadSettings",
    "PayloadStoreError",
    "ZlibCodec",
    "build_data_converter",
    "codec_app",
    "codec_for",
    "codec_server_command",
    "external_storage_for",
    "serve_codec",
]

DEFAULT_THRESHOLD = 256 * 1024
_ENCRYPTED = b"binary/encrypted"
_COMPRESSED = b"binary/zlib"
_KEY_ID = "encryption-key-id"
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class PayloadKeyError(ValueError):
    """No key of ``LLMMIXER_PAYLOAD_KEY`` opens a payload, or a codec was given none."""


class PayloadStoreError(RuntimeError):
    """A stored payload cannot be read; the message says where it was looked for."""


# ---- settings --------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PayloadSettings:
    store: Literal["fs", "s3", "off"] = "fs"
    directory: Path | None = None
    s3_bucket: str | None = None
    threshold: int = DEFAULT_THRESHOLD
    compress: bool = False
    keys: tuple[bytes, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PayloadSettings:
        """From the settings tree; ``SettingsError`` names every bad variable."""
        env = os.environ if environ is None else environ
        payloads = PayloadEnv.from_env(env)
        home = ConnectionEnv.from_env(env).home
        return cls(
            store=payloads.store or ("s3" if payloads.s3_bucket else "fs"),
            directory=payloads.directory or (home or default_home(env)) / "payloads",
            s3_bucket=payloads.s3_bucket,
            threshold=payloads.threshold_bytes,
            compress=payloads.compress,
            keys=payloads.keys,
        )


def build_data_converter(
    environ: Mapping[str, str] | None = None, *, settings: PayloadSettings | None = None
) -> DataConverter:
    """The pydantic JSON converter, plus external storage and codecs as configured."""
    settings = settings or PayloadSettings.from_env(environ)
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=codec_for(settings),
        external_storage=external_storage_for(settings),
    )


def codec_for(settings: PayloadSettings) -> PayloadCodec | None:
    codecs: list[PayloadCodec] = []
    if settings.compress:
        codecs.append(ZlibCodec(min_size=settings.threshold))
    if settings.keys:
        codecs.append(AesGcmCodec(settings.keys))
    if not codecs:
        return None
    return codecs[0] if len(codecs) == 1 else CodecChain(codecs)


def external_storage_for(
    settings: PayloadSettings, *, s3_client: S3StorageDriverClient | None = None
) -> ExternalStorage | None:
    if settings.store == "off":
        return None
    assert settings.directory is not None
    local = FileSystemStorageDriver(settings.directory)
    if settings.store == "fs":
        return ExternalStorage(drivers=[local], payload_size_threshold=settings.threshold)
    assert settings.s3_bucket is not None
    s3 = S3StorageDriver(client=s3_client or LazyAioboto3Client(), bucket=settings.s3_bucket)

    def to_s3(_context: StorageDriverSelectContext, _payload: Payload) -> StorageDriver:
        return s3

    return ExternalStorage(
        drivers=[s3, local], driver_selector=to_s3, payload_size_threshold=settings.threshold
    )


# ---- the filesystem driver ---------------------------------------------------------


class FileSystemStorageDriver(StorageDriver):
    """Content-addressed files: ``<root>/sha256/<2 hex>/<64 hex>``.

    The claim is only the digest, so a forged history cannot make a reader
    open any other file; the bytes read are checked against it. The directory
    is private (0700), like the SQLite file: payloads hold prompts and outputs.
    """

    def __init__(self, root: Path, *, driver_name: str = "llmmixer.fs") -> None:
        self.root = Path(root)
        self._name = driver_name

    def name(self) -> str:
        return self._name

    def type(self) -> str:
        return "llmmixer.fs"

    def _path(self, digest: str) -> Path:
        return self.root / "sha256" / digest[:2] / digest

    async def store(
        self, context: StorageDriverStoreContext, payloads: Sequence[Payload]
    ) -> list[StorageDriverClaim]:
        blobs = [payload.SerializeToString() for payload in payloads]
        # File I/O off the event loop: the worker's loop also serves heartbeats.
        return await asyncio.to_thread(self._store_all, blobs)

    def _store_all(self, blobs: list[bytes]) -> list[StorageDriverClaim]:
        claims = []
        for blob in blobs:
            digest = hashlib.sha256(blob).hexdigest()
            path = self._path(digest)
            if not path.exists():
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(self.root, 0o700)
                tmp = path.with_name(f".{digest}.{secrets.token_hex(4)}.tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(blob)
                # Atomic: a reader never sees half a payload, and two writers of
                # the same content both end with the same whole file.
                os.replace(tmp, path)
            claims.append(StorageDriverClaim(claim_data={"sha256": digest}))
        return claims

    async def retrieve(
        self, context: StorageDriverRetrieveContext, claims: Sequence[StorageDriverClaim]
    ) -> list[Payload]:
        digests = [str(claim.claim_data.get("sha256", "")) for claim in claims]
        return await asyncio.to_thread(self._retrieve_all, digests)

    def _retrieve_all(self, digests: list[str]) -> list[Payload]:
        payloads = []
        for digest in digests:
            if not _HEX_DIGEST.match(digest):
                raise PayloadStoreError(f"malformed payload reference {digest[:80]!r}")
            path = self._path(digest)
            try:
                blob = path.read_bytes()
            except FileNotFoundError:
                raise PayloadStoreError(
                    f"payload sha256:{digest[:16]}… is not in {self.root}: it was stored by a "
                    "process with another LLMMIXER_HOME / LLMMIXER_PAYLOAD_DIR or on another "
                    "host; point this one at the same directory, or share payloads through "
                    "S3 (LLMMIXER_PAYLOAD_S3_BUCKET)"
                ) from None
            if hashlib.sha256(blob).hexdigest() != digest:
                raise PayloadStoreError(f"payload file {path} is corrupt (digest mismatch)")
            payload = Payload()
            payload.ParseFromString(blob)
            payloads.append(payload)
        return payloads


class LazyAioboto3Client(S3StorageDriverClient):
    """An ``S3StorageDriverClient`` that opens its aioboto3 client on first use.

    The SDK's adapter wants an open client, which lives in an ``async with``;
    a data converter is built before any event loop runs, so the client is
    opened lazily and kept for the life of the process.
    """

    def __init__(self) -> None:
        self._inner: S3StorageDriverClient | None = None
        self._stack = contextlib.AsyncExitStack()
        self._lock: asyncio.Lock | None = None

    async def _client(self) -> S3StorageDriverClient:
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if self._inner is None:
                try:
                    import aioboto3  # type: ignore[import-not-found,unused-ignore]
                    from temporalio.contrib.aws.s3driver.aioboto3 import new_aioboto3_client
                except ImportError as error:
                    raise PayloadStoreError(
                        "LLMMIXER_PAYLOAD_S3_BUCKET needs the S3 extra: pip install 'llmmixer[s3]'"
                    ) from error
                s3 = await self._stack.enter_async_context(aioboto3.Session().client("s3"))
                self._inner = new_aioboto3_client(s3)
            return self._inner

    async def put_object(self, *, bucket: str, key: str, data: bytes) -> None:
        await (await self._client()).put_object(bucket=bucket, key=key, data=data)

    async def object_exists(self, *, bucket: str, key: str) -> bool:
        return await (await self._client()).object_exists(bucket=bucket, key=key)

    async def get_object(self, *, bucket: str, key: str) -> bytes:
        return await (await self._client()).get_object(bucket=bucket, key=key)


# ---- codecs ----------------------------------------------------------------------


class ZlibCodec(PayloadCodec):
    """Compress payloads of at least ``min_size`` bytes; smaller ones pass as they are."""

    def __init__(self, *, min_size: int = DEFAULT_THRESHOLD, level: int = 6) -> None:
        self.min_size = min_size
        self.level = level

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for payload in payloads:
            if payload.ByteSize() < self.min_size:
                out.append(payload)
                continue
            data = zlib.compress(payload.SerializeToString(), self.level)
            out.append(Payload(metadata={"encoding": _COMPRESSED}, data=data))
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for payload in payloads:
            if payload.metadata.get("encoding") != _COMPRESSED:
                out.append(payload)
                continue
            inner = Payload()
            inner.ParseFromString(zlib.decompress(payload.data))
            out.append(inner)
        return out


class AesGcmCodec(PayloadCodec):
    """AES-256-GCM over the whole serialized payload (its metadata included).

    The first key encrypts; every key decrypts, chosen by the key id in the
    payload's metadata (the first 8 bytes of the key's SHA-256, never the key).
    """

    def __init__(self, keys: Sequence[bytes]) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if not keys:
            raise PayloadKeyError("AesGcmCodec needs at least one key")
        self._ciphers = {_key_id(key): AESGCM(key) for key in keys}
        self._current = _key_id(keys[0])

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        cipher = self._ciphers[self._current]
        out = []
        for payload in payloads:
            nonce = os.urandom(12)
            sealed = cipher.encrypt(nonce, payload.SerializeToString(), None)
            out.append(
                Payload(
                    metadata={"encoding": _ENCRYPTED, _KEY_ID: self._current.encode()},
                    data=nonce + sealed,
                )
            )
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        from cryptography.exceptions import InvalidTag

        out = []
        for payload in payloads:
            if payload.metadata.get("encoding") != _ENCRYPTED:
                out.append(payload)
                continue
            key_id = payload.metadata.get(_KEY_ID, b"").decode("ascii", "replace")
            cipher = self._ciphers.get(key_id)
            if cipher is None:
                raise PayloadKeyError(
                    f"payload was encrypted with key id {key_id!r}, which is not among "
                    "LLMMIXER_PAYLOAD_KEY's keys: add that key (comma-separated) to read it"
                )
            try:
                plain = cipher.decrypt(payload.data[:12], payload.data[12:], None)
            except InvalidTag:
                raise PayloadKeyError(
                    f"payload with key id {key_id!r} failed authentication (tampered or wrong key)"
                ) from None
            inner = Payload()
            inner.ParseFromString(plain)
            out.append(inner)
        return out


def _key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


class CodecChain(PayloadCodec):
    """Codecs applied in order on encode, in reverse on decode."""

    def __init__(self, codecs: Sequence[PayloadCodec]) -> None:
        self.codecs = list(codecs)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = list(payloads)
        for codec in self.codecs:
            out = await codec.encode(out)
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = list(payloads)
        for codec in reversed(self.codecs):
            out = await codec.decode(out)
        return out


# ---- the codec server (Temporal CLI --codec-endpoint, Web UI "Codec Server") -------

CODEC_TOKEN_ENV = "LLMMIXER_CODEC_TOKEN"
DEFAULT_CODEC_PORT = 8089
DEFAULT_CODEC_ORIGIN = "http://localhost:8233"
_CODEC_MAX_BODY = 64 * 1024 * 1024


class CodecServerRefused(ValueError):
    """A codec server configuration that would expose every payload; the message says the fix."""


def codec_app(
    codec: PayloadCodec, *, allow_origin: str = DEFAULT_CODEC_ORIGIN, token: str | None = None
) -> Callable[..., Awaitable[None]]:
    """The codec server as an ASGI app: ``POST .../encode`` and ``POST .../decode``.

    Whoever can call ``/decode`` reads every payload, so the app follows
    ``llmmixer serve``'s rule (``llmmixer.runtime.http_guard``): without a token
    only a loopback ``Host`` is answered, and a browser may post only from
    ``allow_origin`` (the Web UI) or the server's own origin; with a token,
    every request but the CORS preflight must carry it.
    """
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    from llmmixer.runtime.http_guard import GuardPolicy, RequestGuard, bearer_matches

    def error(status: int, message: str) -> Response:
        return JSONResponse({"error": message}, status_code=status)

    async def endpoint(scope: Any, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        response = await answer(request)
        await response(scope, receive, send)

    async def answer(request: Request) -> Response:
        if request.method == "OPTIONS":
            return JSONResponse({})  # the browser's preflight carries no credentials
        if token is not None and not bearer_matches(request.headers.get("authorization"), token):
            return error(
                401, f"missing or wrong token: send `Authorization: Bearer ${CODEC_TOKEN_ENV}`"
            )
        path = request.url.path.rstrip("/")
        if request.method != "POST" or not path.endswith(("/encode", "/decode")):
            return error(404, "POST /encode or /decode")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > _CODEC_MAX_BODY:
            return error(413, f"the body is over {_CODEC_MAX_BODY} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > _CODEC_MAX_BODY:
                return error(413, f"the body is over {_CODEC_MAX_BODY} bytes")
        payloads = Payloads()
        try:
            json_format.Parse(bytes(body), payloads)
        except (json_format.ParseError, UnicodeDecodeError) as parse_error:
            return error(400, f'the body must be {{"payloads": [...]}}: {parse_error}')
        if path.endswith("/encode"):
            result = await codec.encode(list(payloads.payloads))
        else:
            result = await codec.decode(list(payloads.payloads))
        return Response(
            json_format.MessageToJson(Payloads(payloads=result)),
            media_type="application/json",
        )

    guarded = RequestGuard(
        endpoint,
        policy=GuardPolicy(
            token_variable=CODEC_TOKEN_ENV,
            token_set=token is not None,
            allowed_origins=frozenset({allow_origin}),
            hint="give that address to --codec-endpoint or the Web UI's Codec Server setting",
        ),
        respond=lambda refusal: error(refusal.status, refusal.message),
    )
    cors = [
        (b"access-control-allow-origin", allow_origin.encode("latin-1")),
        (b"access-control-allow-methods", b"POST, OPTIONS"),
        (b"access-control-allow-headers", b"content-type, x-namespace, authorization"),
        (b"access-control-allow-credentials", b"true"),
        (b"vary", b"Origin"),
    ]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # no lifespan, no websockets

        async def send_with_cors(message: Any) -> None:
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
    """Serve :func:`codec_app` (Temporal's codec server protocol) until cancelled.

    Bodies are ``{"payloads": [...]}`` in protobuf JSON. ``allow_origin`` is
    the Web UI's origin (CORS). Without ``token`` only a loopback ``host`` is
    accepted (:class:`CodecServerRefused` otherwise); a token shorter than 16
    characters raises ``TokenError``. ``ready(port)`` is called once the port
    is bound.
    """
    import socket

    import uvicorn

    from llmmixer.runtime.address import is_loopback
    from llmmixer.runtime.http_guard import check_token

    token = check_token(CODEC_TOKEN_ENV, token)
    if token is None and not is_loopback(host):
        raise CodecServerRefused(
            f"refusing to serve the codec on {host}: whoever reaches it can decrypt every "
            f"payload. Set {CODEC_TOKEN_ENV} to a long random secret (the Temporal CLI sends "
            f'it with --codec-auth "Bearer $TOKEN"), or serve on 127.0.0.1'
        )
    bare = host[1:-1] if host.startswith("[") else host
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bare, port))
        # Listening from here on: a client that connects before uvicorn runs waits
        # in the backlog, so `ready` can be told at once.
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    config = uvicorn.Config(
        codec_app(codec, allow_origin=allow_origin, token=token),
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    if ready is not None:
        ready(sock.getsockname()[1])
    try:
        await asyncio.shield(serving)
    except asyncio.CancelledError:
        # Close the listening socket and open connections before going.
        server.should_exit = True
        await serving
        raise
    finally:
        sock.close()


async def codec_server_command(host: str, port: int, allow_origin: str) -> int:
    """``llmmixer codec-server`` (and ``python -m llmmixer.workers.storage codec-server``)."""
    from llmmixer.runtime.http_guard import TokenError

    codec = codec_for(PayloadSettings.from_env())
    if codec is None:
        print(
            "no codec configured: set LLMMIXER_PAYLOAD_KEY (and/or LLMMIXER_PAYLOAD_COMPRESS=1) "
            "as the workers have it",
            file=sys.stderr,
        )
        return 2
    token = os.environ.get(CODEC_TOKEN_ENV) or None
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


if __name__ == "__main__":
    sys.exit(codec_main())
