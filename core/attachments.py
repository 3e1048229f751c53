"""Files as inputs: typed by their content, described without their bytes.

A file input is untrusted: its name says nothing about what it is (a
``diagram.png`` may be a PDF or an executable), so its type comes from its
first bytes. Only the types every provider can be sent are accepted: PNG,
JPEG, GIF and WEBP images, PDF documents, and UTF-8 text.

Pure (no I/O): the client reads files and stores their bytes, the worker
loads them back; both type and describe them here.
"""

from __future__ import annotations

import hashlib

from llmmixer.core.contracts import Attachment

__all__ = [
    "DOCUMENT_TYPES",
    "IMAGE_TYPES",
    "MEDIA_TYPES",
    "TEXT_TYPE",
    "UnsupportedFile",
    "describe_file",
    "sniff_media_type",
]

IMAGE_TYPES: tuple[str, ...] = ("image/png", "image/jpeg", "image/gif", "image/webp")
DOCUMENT_TYPES: tuple[str, ...] = ("application/pdf",)
TEXT_TYPE = "text/plain"
MEDIA_TYPES: tuple[str, ...] = (*IMAGE_TYPES, *DOCUMENT_TYPES, TEXT_TYPE)

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"%PDF-", "application/pdf"),
)


class UnsupportedFile(ValueError):
    """The bytes are none of ``MEDIA_TYPES``; the message says which are."""


def sniff_media_type(data: bytes) -> str | None:
    """The media type the bytes are, or None when they are none llmmixer sends.

    Text is UTF-8 without NUL bytes; anything else unrecognised is refused
    rather than sent as something it is not.
    """
    for magic, media_type in _MAGIC:
        if data.startswith(magic):
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if b"\x00" in data:
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return TEXT_TYPE


def describe_file(name: str, data: bytes, *, declared: str | None = None) -> Attachment:
    """An ``Attachment`` for ``data`` (no ``ref`` yet): typed by content, hashed, sized.

    ``declared`` (a media type the sender claims, e.g. over HTTP) must agree
    with the content; it is never trusted on its own.
    """
    media_type = sniff_media_type(data)
    if media_type is None:
        raise UnsupportedFile(
            f"{name!r} is none of the file types llmmixer sends ({', '.join(MEDIA_TYPES)}): "
            "convert it, e.g. to PNG or PDF"
        )
    if declared is not None and declared.split(";")[0].strip().lower() != media_type:
        raise UnsupportedFile(
            f"{name!r} was declared {declared} but its content is {media_type}: "
            f"send it as {media_type} (the type is read from the content)"
        )
    return Attachment(
        name=_safe_name(name),
        media_type=media_type,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _safe_name(name: str) -> str:
    # Only the last path part, printable, bounded: the name reaches prompts,
    # the page and provider uploads, never the file system.
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(ch for ch in base if ch.isprintable()).strip()
    return cleaned[:200] or "file"
