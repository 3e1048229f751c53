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
(``llmmixer codec-server``, ``runtime/codec_server.py``; also ``python -m
llmmixer.workers.storage codec-server``) to show anything: ``temporal workflow
result --codec-endpoint http://127.0.0.1:8089`` and, in the Web UI, Settings → Codec Server →
``http://127.0.0.1:8089``. It decrypts for whoever reaches it, so without
``LLMMIXER_CODEC_TOKEN`` it serves loopback only, to loopback ``Host`` names.

The codec runs before external storage, so stored payloads are compressed and
encrypted as well; the key never leaves the processes that hold it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import re
import secrets
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from temporalio.api.common.v1 import Payload
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
    "DEFAULT_THRESHOLD",
    "AesGcmCodec",
    "CodecChain",
    "FileSystemStorageDriver",
    "LazyAioboto3Client",
    "PayloadKeyError",
    "PayloadSettings",
    "PayloadStoreError",
    "ZlibCodec",
    "build_data_converter",
    "codec_for",
    "external_storage_for",
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
