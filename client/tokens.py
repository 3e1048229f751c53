"""Counting a prompt's tokens before a run, offline.

OpenAI models are counted exactly with ``tiktoken`` and the encoding the
model uses (``o200k_base`` for gpt-4o, gpt-4.1, gpt-5 and the o-series,
``cl100k_base`` for gpt-4 and gpt-3.5). tiktoken normally downloads those
files on first use; llmmixer ships them (``client/data/*.tiktoken.gz``,
byte for byte the files OpenAI publishes, checked against the SHA-256 that
tiktoken itself expects), so counting works without a network, in CI and in
an air-gapped deployment.

Anthropic and Gemini publish no offline tokenizer. Their counts are an
approximation, labelled as one: the ``o200k_base`` count times a factor per
provider (``APPROXIMATION_FACTORS``), with a spread around it that the
estimate's bounds take in.

Where the factors come from: they are set by hand, not measured. llmmixer
has not calibrated them against the providers' own counters (Anthropic's
``POST /v1/messages/count_tokens``, Gemini's ``models.countTokens``), which
need a network and a key that ``estimate`` does not use. Claude's current
tokenizer is known to split English prose and code into more tokens than
``o200k_base`` does, hence 1.2; Gemini's comes out close to it, hence 1.0.
The label says "uncalibrated" so nobody mistakes the middle value for a
count, and ``APPROXIMATION_SPREAD`` (+-25%) is what the minimum and maximum
allow for. For a forecast you bill against, compare a few of your own
prompts with those endpoints.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import math
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from llmmixer.core.attachments import IMAGE_TYPES, TEXT_TYPE, image_dimensions, pdf_page_count

if TYPE_CHECKING:
    import tiktoken

__all__ = [
    "APPROXIMATION_FACTORS",
    "APPROXIMATION_SPREAD",
    "TokenCount",
    "count_tokens",
    "file_tokens",
    "image_tokens",
]

# The SHA-256 of each uncompressed file, as tiktoken's own constructors check them.
_ENCODINGS: dict[str, str] = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}
# Split patterns and special tokens of those encodings, as tiktoken defines them
# (tiktoken_ext/openai_public.py); an encoding's pattern never changes.
_PATTERNS: dict[str, str] = {
    "o200k_base": "|".join(
        [
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]
    ),
    "cl100k_base": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
        r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
    ),
}
_SPECIAL: dict[str, dict[str, int]] = {
    "o200k_base": {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    "cl100k_base": {
        "<|endoftext|>": 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276,
    },
}
# Chat framing OpenAI adds around messages (its cookbook's count for current
# chat models): per message 3 tokens plus its role's name (one token for
# system, user and assistant alike), and 3 once for the reply's start.
_PER_MESSAGE = 3 + 1
_REPLY_PRIMING = 3

# Provider -> tokens per o200k_base token, for providers without an offline
# tokenizer: set by hand, not measured (see the module's docstring). Claude's
# tokenizer splits English prose and code into more tokens than o200k_base
# does; Gemini's is close to it.
APPROXIMATION_FACTORS: dict[str, float] = {"anthropic": 1.2, "gemini": 1.0}
# How far an approximate count may be off either way; the estimate's minimum
# and maximum use count/(1+spread) and count*(1+spread).
APPROXIMATION_SPREAD = 0.25


@dataclass(frozen=True)
class TokenCount:
    """A prompt's input tokens: exact (low == expected == high) or approximate."""

    low: int
    expected: int
    high: int
    method: str  # "o200k_base", "cl100k_base", or "≈ o200k_base x1.2 (uncalibrated approximation)"

    @property
    def exact(self) -> bool:
        return self.low == self.high

    def __add__(self, other: TokenCount) -> TokenCount:
        return TokenCount(
            self.low + other.low,
            self.expected + other.expected,
            self.high + other.high,
            self.method if self.method == other.method else f"{self.method}; {other.method}",
        )


@functools.cache
def encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken encoding from the files llmmixer ships; no network."""
    # Imported here: only `estimate` and `run --dry-run` pay for it.
    import tiktoken

    expected = _ENCODINGS.get(name)
    if expected is None:
        raise ValueError(f"encoding {name!r}: llmmixer ships {', '.join(_ENCODINGS)}")
    packed = resources.files("llmmixer.client").joinpath(f"data/{name}.tiktoken.gz").read_bytes()
    data = gzip.decompress(packed)
    if hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(
            f"llmmixer/client/data/{name}.tiktoken.gz is not the file OpenAI publishes "
            "(SHA-256 differs): reinstall llmmixer"
        )
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in data.splitlines() if line)
    }
    return tiktoken.Encoding(
        name=name,
        pat_str=_PATTERNS[name],
        mergeable_ranks=ranks,
        special_tokens=_SPECIAL[name],
    )


def openai_encoding_name(model: str) -> str:
    """The encoding ``model`` uses; ``o200k_base`` for a name tiktoken does not know."""
    import tiktoken.model

    try:
        name = tiktoken.model.encoding_name_for_model(model)
    except KeyError:
        return "o200k_base"
    return name if name in _ENCODINGS else "o200k_base"


def _raw(text: str, name: str) -> int:
    # Special-token text in a prompt is counted as the plain text it is.
    return len(encoding(name).encode(text, disallowed_special=()))


def count_tokens(provider: str, model: str, system: str | None, messages: list[str]) -> TokenCount:
    """The input tokens of one call: its system text and its messages' contents."""
    if provider == "openai":
        name = openai_encoding_name(model)
        parts = ([system] if system else []) + messages
        total = sum(_raw(part, name) + _PER_MESSAGE for part in parts) + _REPLY_PRIMING
        return TokenCount(total, total, total, name)
    factor = APPROXIMATION_FACTORS.get(provider, 1.0)
    base = sum(_raw(part, "o200k_base") for part in ([system] if system else []) + messages)
    expected = math.ceil(base * factor)
    return TokenCount(
        math.floor(expected / (1 + APPROXIMATION_SPREAD)),
        expected,
        math.ceil(expected * (1 + APPROXIMATION_SPREAD)),
        f"≈ o200k_base x{factor:g} (uncalibrated approximation)",
    )


# ---- files ------------------------------------------------------------------------------

# Each provider's published rule for an image (documentation, not measured):
# Anthropic scales an image so its long edge is at most 1568 px and it
# costs at most ~1600 tokens, then charges width*height/750; OpenAI (high
# detail, what `auto` picks for a large image) fits it in 2048x2048, scales
# its short side to 768, and charges 85 plus 170 per 512-px tile; Gemini
# charges 258 for an image of at most 384 px a side, else 258 per 768-px tile.
_ANTHROPIC_LONG_EDGE = 1568
_ANTHROPIC_MAX_IMAGE = 1600
_OPENAI_BASE, _OPENAI_TILE = 85, 170
_GEMINI_TILE = 258
# A PDF page: Anthropic and OpenAI send its text and an image of it (1500 to
# 3000 tokens, Anthropic's documentation); Gemini 258 per page. Without a
# page count, a page is assumed per this many bytes.
_PDF_PAGE_TOKENS: dict[str, tuple[int, int, int]] = {
    "anthropic": (1500, 2250, 3000),
    "openai": (1500, 2250, 3000),
    "gemini": (258, 258, 258),
}
_PDF_BYTES_PER_PAGE = 50_000


def image_tokens(provider: str, width: int, height: int) -> int:
    """What one image of ``width`` x ``height`` pixels costs ``provider``, by its published rule."""
    if width <= 0 or height <= 0:
        return 0
    if provider == "anthropic":
        scale = min(
            1.0,
            _ANTHROPIC_LONG_EDGE / max(width, height),
            math.sqrt(_ANTHROPIC_MAX_IMAGE * 750 / (width * height)),
        )
        return min(_ANTHROPIC_MAX_IMAGE, math.ceil(width * scale * height * scale / 750))
    if provider == "openai":
        fit = min(1.0, 2048 / max(width, height))
        w, h = width * fit, height * fit
        short = min(1.0, 768 / min(w, h))
        tiles = math.ceil(w * short / 512) * math.ceil(h * short / 512)
        return _OPENAI_BASE + _OPENAI_TILE * tiles
    if width <= 384 and height <= 384:
        return _GEMINI_TILE
    return _GEMINI_TILE * math.ceil(width / 768) * math.ceil(height / 768)


# An image whose size cannot be read: from a 1x1 image to the most the
# provider's rule allows (Gemini's has no bound: a 3072x3072 image is assumed).
_UNKNOWN_IMAGE: dict[str, tuple[int, int]] = {
    "anthropic": (1, _ANTHROPIC_MAX_IMAGE),
    "openai": (_OPENAI_BASE + _OPENAI_TILE, _OPENAI_BASE + _OPENAI_TILE * 8),
    "gemini": (_GEMINI_TILE, _GEMINI_TILE * 16),
}


def file_tokens(
    provider: str,
    model: str,
    media_type: str,
    size: int,
    data: bytes | None,
) -> TokenCount:
    """The input tokens of one file sent to ``provider``, labelled as the approximation it is.

    ``data`` (the file's bytes, when this process has them) gives an image's
    width and height and a PDF's page count; without it, an image spans the
    provider's smallest to largest charge and a PDF is assumed a page per 50 KB.
    """
    family = provider if provider in _UNKNOWN_IMAGE else "openai"
    if media_type in IMAGE_TYPES:
        dimensions = image_dimensions(data) if data is not None else None
        if dimensions is None:
            low, high = _UNKNOWN_IMAGE[family]
            return TokenCount(low, high, high, f"≈ image of unknown size ({family}'s rule)")
        tokens = image_tokens(family, *dimensions)
        width, height = dimensions
        return TokenCount(
            tokens, tokens, tokens, f"≈ {width}x{height} image ({family}'s published rule)"
        )
    if media_type == TEXT_TYPE and data is not None:
        text = data.decode("utf-8", errors="replace")
        return count_tokens(provider, model, None, [text])
    if media_type == TEXT_TYPE:
        return TokenCount(
            size // 6, size // 4, size // 2, "≈ text file of known size, ~4 bytes a token"
        )
    pages = pdf_page_count(data) if data is not None else None
    method = f"≈ {pages} PDF page(s)" if pages else "≈ PDF pages guessed from its size"
    count = pages or max(1, math.ceil(size / _PDF_BYTES_PER_PAGE))
    low, expected, high = _PDF_PAGE_TOKENS[family]
    return TokenCount(
        count * low, count * expected, count * high, f"{method} ({family}'s per-page rule)"
    )
