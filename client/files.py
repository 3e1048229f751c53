"""File inputs: read (or received), typed by content, and put in the payload store.

A file input reaches a run in one of three shapes, and leaves here in one:

    {"file": "diagram.png"}          a path: read by this process (CLI, Python), relative
                                     to the spec's file; never by ``llmmixer serve``
    {"file": {"name": ..., "media_type": ..., "data": BASE64}}
                                     the bytes themselves (the HTTP API, Python)
    File(name, data)                 the Python API's own type
    -> {"file": {"name", "media_type", "size", "sha256", "ref"}}
                                     what the run sees: ``ref`` is the payload store's
                                     reference, so history never holds the bytes

The bytes go through the client's own data converter with a threshold of 0,
so whatever ``LLMMIXER_PAYLOAD_*`` configures (the directory or S3, zlib,
AES-GCM) applies to them as to any large payload, and the worker reads them
back through its converter. With the store off (``LLMMIXER_PAYLOAD_STORE=off``)
there is nowhere else to keep them: files up to the payload threshold then
travel inside the reference (so inside history), larger ones are refused.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from temporalio.converter import DataConverter

from llmmixer.core.attachments import UnsupportedFile, describe_file
from llmmixer.core.contracts import Attachment
from llmmixer.core.validation import SPEC_LOCATION, SpecError, SpecIssue
from llmmixer.runtime.settings import PayloadEnv

__all__ = [
    "File",
    "describe_inputs",
    "has_file_inputs",
    "max_attachment_bytes",
    "read_file_inputs",
    "spec_dir",
    "store_inputs",
]


@dataclasses.dataclass(frozen=True)
class File:
    """A file input from Python: ``mixer.start(spec, inputs={"diagram": File.read("a.png")})``."""

    name: str
    data: bytes

    @classmethod
    def read(cls, path: str | Path, *, max_bytes: int | None = None) -> File:
        """The file at ``path``; ``SpecError`` when it cannot be read or is too large."""
        return cls(Path(path).name, _read_path(Path(path), "file", max_bytes))


def max_attachment_bytes(environ: Mapping[str, str] | None = None) -> int:
    """``LLMMIXER_MAX_ATTACHMENT_BYTES``: the largest file input a client accepts."""
    return PayloadEnv.from_env(environ).max_attachment_bytes


def has_file_inputs(inputs: Mapping[str, Any], *, stored_too: bool = False) -> bool:
    """Whether any input is a file not in the payload store yet (or any file at all)."""
    return any(
        _is_file(value) and (stored_too or not _is_stored(value)) for value in inputs.values()
    )


def spec_dir(source: object) -> Path | None:
    """The directory a spec's relative file paths are read from: its file's, else none (cwd)."""
    if isinstance(source, Path):
        return source.parent
    if isinstance(source, str) and "\n" not in source and Path(source).suffix in _SPEC_SUFFIXES:
        return Path(source).parent
    return None


_SPEC_SUFFIXES = {".yaml", ".yml", ".json"}


def _is_file(value: object) -> bool:
    return isinstance(value, File) or (isinstance(value, Mapping) and "file" in value)


def _is_stored(value: object) -> bool:
    file = value.get("file") if isinstance(value, Mapping) else None
    return isinstance(file, Mapping) and bool(file.get("ref")) and "data" not in file


async def store_inputs(
    inputs: Mapping[str, Any],
    converter: DataConverter,
    *,
    base_dir: Path | None = None,
    read_paths: bool = True,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """``inputs`` with every file input read, typed and stored: ``{"file": Attachment}``.

    ``read_paths=False`` (``llmmixer serve``): a path is refused, never read.
    Raises ``SpecError`` naming the input.
    """
    limit = max_attachment_bytes() if max_bytes is None else max_bytes
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if not _is_file(value):
            out[key] = value
            continue
        name, data, declared = _bytes_of(key, value, base_dir, read_paths, limit, storing=True)
        if data is None:
            out[key] = value  # already stored
            continue
        attachment = _describe(key, name, data, declared)
        stored = attachment.model_copy(update={"ref": await _store(key, data, converter)})
        out[key] = {"file": stored.model_dump()}
    return out


def describe_inputs(
    inputs: Mapping[str, Any],
    *,
    base_dir: Path | None = None,
    read_paths: bool = True,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """``inputs`` with file inputs described but not stored (``validate``, ``estimate``).

    A described file has an empty ``ref``: a run cannot start with it.
    """
    limit = max_attachment_bytes() if max_bytes is None else max_bytes
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if not _is_file(value):
            out[key] = value
            continue
        name, data, declared = _bytes_of(key, value, base_dir, read_paths, limit, storing=False)
        out[key] = (
            value if data is None else {"file": _describe(key, name, data, declared).model_dump()}
        )
    return out


def read_file_inputs(
    inputs: Mapping[str, Any], *, base_dir: Path | None = None, max_bytes: int | None = None
) -> dict[str, bytes]:
    """The bytes of each file input this process can read (a path, ``File``, inline data).

    For ``estimate``, which reads an image's size and a PDF's pages from them;
    a file it cannot read here (stored, described, too large) is left out.
    """
    limit = max_attachment_bytes() if max_bytes is None else max_bytes
    found: dict[str, bytes] = {}
    for key, value in inputs.items():
        if not _is_file(value):
            continue
        try:
            _, data, _ = _bytes_of(key, value, base_dir, True, limit, storing=False)
        except SpecError:
            continue  # validation already said what is wrong with it
        if data is not None:
            found[key] = data
    return found


# ---- internals ---------------------------------------------------------------------


def _refused(key: str, message: str) -> SpecError:
    return SpecError([SpecIssue(SPEC_LOCATION, f"inputs.{key}", message)])


def _describe(key: str, name: str, data: bytes, declared: str | None) -> Attachment:
    try:
        return describe_file(name, data, declared=declared)
    except UnsupportedFile as error:
        raise _refused(key, str(error)) from None


def _bytes_of(
    key: str,
    value: object,
    base_dir: Path | None,
    read_paths: bool,
    limit: int,
    *,
    storing: bool,
) -> tuple[str, bytes | None, str | None]:
    """(name, bytes or None when already stored, declared media type)."""
    if isinstance(value, File):
        _check_size(key, len(value.data), limit)
        return value.name, value.data, None
    assert isinstance(value, Mapping)
    extra = set(value) - {"file"}
    if extra:
        raise _refused(key, f"a file input is only `file`; remove {', '.join(sorted(extra))}")
    file = value["file"]
    if isinstance(file, str):
        if not read_paths:
            raise _refused(
                key,
                "a file input over HTTP carries its bytes, it never names a path on the "
                'server: send {"file": {"name": ..., "media_type": ..., "data": BASE64}}',
            )
        path = Path(file).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return path.name, _read_path(path, f"inputs.{key}", limit, key=key), None
    if isinstance(file, Mapping) and "sha256" in file and "data" not in file:
        if not read_paths:
            # A reference reads the payload store: only this process writes them.
            raise _refused(
                key,
                "over HTTP a file input carries its bytes, not a stored reference: send "
                '{"file": {"name": ..., "media_type": ..., "data": BASE64}}',
            )
        if not file.get("ref") and storing:
            raise _refused(
                key,
                "this file was only described (llmmixer validate), never stored: give its "
                "path or bytes to start a run",
            )
        try:
            Attachment.model_validate(file)
        except ValueError:
            raise _refused(
                key, "a stored file needs name, media_type, size, sha256 and ref"
            ) from None
        # Stored already (a re-run's inputs, a spec from a run's history), or
        # described (enough to validate).
        return str(file.get("name", "")), None, None
    if isinstance(file, Mapping) and isinstance(file.get("data"), str):
        unknown = set(file) - {"name", "media_type", "data"}
        if unknown:
            raise _refused(
                key, f"unknown field(s) {', '.join(sorted(unknown))}: use name, media_type, data"
            )
        encoded = str(file["data"])
        # Refuse by the encoded length before decoding anything large.
        _check_size(key, len(encoded) * 3 // 4 - 2, limit)
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise _refused(key, "`data` is not base64: encode the file's bytes as base64") from None
        _check_size(key, len(data), limit)
        declared = file.get("media_type")
        return str(file.get("name") or key), data, str(declared) if declared else None
    raise _refused(
        key,
        'write a file input as {"file": PATH} or {"file": {"name": ..., "media_type": ..., '
        '"data": BASE64}}',
    )


def _check_size(key: str, size: int, limit: int) -> None:
    if size > limit:
        raise _refused(
            key,
            f"the file is {size} bytes, over the {limit}-byte limit of "
            "LLMMIXER_MAX_ATTACHMENT_BYTES: send a smaller file or raise the limit",
        )


def _read_path(path: Path, field: str, limit: int | None, *, key: str = "file") -> bytes:
    limit = max_attachment_bytes() if limit is None else limit
    try:
        with path.open("rb") as stream:
            # Never more than the limit: `--input x=@/dev/zero` must not fill memory.
            data = stream.read(limit + 1)
    except OSError as error:
        raise SpecError(
            [SpecIssue(SPEC_LOCATION, field, f"cannot read {path}: {error.strerror}")]
        ) from None
    _check_size(key, len(data), limit)
    return data


async def _store(key: str, data: bytes, converter: DataConverter) -> str:
    storage = converter.external_storage
    if storage is not None:
        # Threshold 0: every file goes to the store, however small.
        converter = dataclasses.replace(
            converter, external_storage=dataclasses.replace(storage, payload_size_threshold=0)
        )
    else:
        limit = PayloadEnv.from_env().threshold_bytes
        if len(data) >= limit:
            raise _refused(
                key,
                f"the file is {len(data)} bytes and LLMMIXER_PAYLOAD_STORE is off, so it would "
                "be kept in the run's history: turn the payload store on (unset "
                "LLMMIXER_PAYLOAD_STORE) or send a file under "
                f"{limit} bytes",
            )
    [payload] = await converter.encode([data])
    return base64.b64encode(payload.SerializeToString()).decode("ascii")
