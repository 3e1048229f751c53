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
import re
import struct

from llmmixer.core.contracts import Attachment

__all__ = [
    "DOCUMENT_TYPES",
    "IMAGE_TYPES",
    "MEDIA_TYPES",
    "TEXT_TYPE",
    "UnsupportedFile",
    "describe_file",
    "image_dimensions",
    "pdf_page_count",
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


# ---- sizes, for the cost estimate ------------------------------------------------------

# JPEG start-of-frame markers (baseline, progressive, ...): not DHT (C4),
# JPG (C8) or DAC (CC), which share the range.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# A page object, not the `/Pages` tree that holds them.
_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) in pixels from a PNG, JPEG, GIF or WEBP header, or None.

    Read from the header alone, without decoding the image: a file that is
    not one of those types, or whose header is cut short, gives None.
    """
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
            width, height = struct.unpack(">II", data[16:24])
            return width, height
        if data[:6] in (b"GIF87a", b"GIF89a"):
            width, height = struct.unpack("<HH", data[6:10])
            return width, height
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_dimensions(data)
        if data.startswith(b"\xff\xd8"):
            return _jpeg_dimensions(data)
    except struct.error:
        return None
    return None


def _webp_dimensions(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and data[20:21] == b"\x2f":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    index = 2
    while index + 4 <= len(data):
        if data[index] != 0xFF:
            return None
        marker = data[index + 1]
        if marker == 0xFF:  # fill byte
            index += 1
            continue
        if marker in (0x01, *range(0xD0, 0xDA)):  # markers without a length
            index += 2
            continue
        (length,) = struct.unpack(">H", data[index + 2 : index + 4])
        if marker in _JPEG_FRAMES:
            height, width = struct.unpack(">HH", data[index + 5 : index + 9])
            return width, height
        index += 2 + length
    return None


def pdf_page_count(data: bytes) -> int | None:
    """How many page objects a PDF's bytes name, or None when none are readable.

    An approximation: pages in compressed object streams are not seen.
    """
    if not data.startswith(b"%PDF-"):
        return None
    pages = len(_PDF_PAGE.findall(data))
    return pages or None
