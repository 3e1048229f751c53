"""Redaction of secrets from any text before it is recorded anywhere.

Its own module, free of SDK imports, because everything that records text
(errors, logs, spans, the CLI) needs it and must not pay for importing every
provider SDK. What counts as a secret (names, key shapes, values in an
environment) is defined once, in ``llmmixer.core.secrets``.
"""

from __future__ import annotations

from collections.abc import Iterable

from llmmixer.core.secrets import (
    MIN_SECRET_CHARS,
    PREFIXED_SECRET_SHAPES,
    SECRET_SHAPES,
)

__all__ = ["REDACTED", "StreamRedactor", "redact"]

REDACTED = "[REDACTED]"
# A streamed token (a key being printed) longer than this is not held back
# waiting for its end; shapes longer than this are not real keys.
_MAX_HELD_TOKEN_CHARS = 1024


def _usable(secrets: Iterable[str | None]) -> list[str]:
    # Longest first, so that a key containing another never leaves a fragment.
    return sorted({s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True)


def _redact_sorted(text: str, ordered: list[str]) -> str:
    for secret in ordered:
        if secret in text:
            text = text.replace(secret, REDACTED)
    text = SECRET_SHAPES.sub(REDACTED, text)
    for shape in PREFIXED_SECRET_SHAPES:
        text = shape.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Remove the given secrets and anything shaped like a key from ``text``.

    Longer secrets are replaced first so that a key containing another never
    leaves a fragment behind. Values shorter than 4 characters are ignored:
    replacing them would shred ordinary text and they are not real keys.
    """
    return _redact_sorted(text, _usable(secrets))


class StreamRedactor:
    """``redact`` over text that arrives in pieces (a command's output).

    A secret may be split across two reads; redacting each piece alone would
    let both halves through. So each piece is released only up to where no
    secret can straddle the cut: the longest tail that begins one of the
    known secrets is held back, and so is a trailing unfinished token (for
    key *shapes*), until more text or ``flush``. ``release_token`` lets the
    caller show a quiet command's pending prompt without waiting for more.
    """

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self._secrets = _usable(secrets)
        self._pending = ""

    @property
    def can_release(self) -> bool:
        """Whether ``release_token`` would release anything."""
        return bool(self._pending) and self._secret_cut(self._pending) > 0

    def feed(self, text: str) -> str:
        """Add text; return the redacted part that is safe to release now."""
        text = self._pending + text
        cut = min(self._secret_cut(text), self._token_cut(text))
        self._pending = text[cut:]
        return _redact_sorted(text[:cut], self._secrets)

    def release_token(self) -> str:
        """Release a held token, keeping only a tail that may begin a known secret."""
        text = self._pending
        cut = self._secret_cut(text)
        self._pending = text[cut:]
        return _redact_sorted(text[:cut], self._secrets)

    def flush(self) -> str:
        """The end of the stream: release everything, redacted."""
        text, self._pending = self._pending, ""
        return _redact_sorted(text, self._secrets)

    def _secret_cut(self, text: str) -> int:
        """Where the longest tail of ``text`` that is a proper prefix of a secret starts."""
        best = len(text)
        for secret in self._secrets:
            # Only tails shorter than the secret can be an unfinished copy of it.
            start = max(len(text) - len(secret) + 1, 0)
            first = secret[0]
            index = text.find(first, start)
            while index != -1 and index < best:
                if secret.startswith(text[index:]):
                    best = index
                    break
                index = text.find(first, index + 1)
        return best

    @staticmethod
    def _token_cut(text: str) -> int:
        """Where the trailing run of non-whitespace starts (bounded)."""
        end = len(text)
        index = end
        limit = max(end - _MAX_HELD_TOKEN_CHARS, 0)
        while index > limit and not text[index - 1].isspace():
            index -= 1
        return end if index == limit and limit > 0 else index
