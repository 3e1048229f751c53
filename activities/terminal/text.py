"""What a command prints, made fit to keep and show: ANSI stripped, bounded.

Output is decoded as UTF-8, stripped of ANSI escape sequences and control
characters, has ``\\r\\n`` and lone ``\\r`` turned into ``\\n``
(``clean_terminal_text``, or ``TextCleaner`` for bytes read in chunks), and is
bounded to a byte limit as head + marker + tail (``BoundedOutput``,
``bound_text``). Redaction happens between the two, in the runner.
"""

from __future__ import annotations

import codecs
import re

__all__ = ["BoundedOutput", "TextCleaner", "bound_text", "clean_terminal_text"]

# ECMA-48 sequences terminals understand: OSC (titles, hyperlinks) ended by BEL
# or ST; DCS/SOS/PM/APC strings ended by ST; CSI (colours, cursor moves);
# nF escapes (charset selection like ESC ( B); two-byte Fe/Fp/Fs escapes; and
# the 8-bit CSI that some programs emit.
_ANSI_RE = re.compile(
    r"""
    \x1b\][^\x07\x1b]*(?:\x07|\x1b\\)        # OSC ... BEL | ST
  | \x1b[PX^_][^\x1b]*\x1b\\                 # DCS / SOS / PM / APC ... ST
  | \x1b\[[0-?]*[ -/]*[@-~]                  # CSI
  | \x9b[0-?]*[ -/]*[@-~]                    # 8-bit CSI
  | \x1b[ -/]+[0-~]                          # nF: ESC ( B and friends
  | \x1b[0-~]                                # two-byte escapes
    """,
    re.VERBOSE,
)
# The start of a sequence cut off by the end of a read.
_ANSI_UNFINISHED_RE = re.compile(
    r"""
    \x1b(?:
        \][^\x07\x1b]*\x1b?                   # OSC, maybe the ESC of its ST
      | [PX^_][^\x1b]*\x1b?                   # DCS / SOS / PM / APC
      | \[[0-?]*[ -/]*                        # CSI
      | [ -/]*                                # nF, or a lone ESC
    )
  | \x9b[0-?]*[ -/]*
    """,
    re.VERBOSE,
)
_CR_RUN_LF_RE = re.compile(r"\r+\n")
# What a terminal would not show as text. Tab and newline stay; \r is handled
# before this runs.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# A sequence may be cut by a read boundary; hold back an unfinished one up to
# this length (long OSC hyperlinks) before giving up and emitting it stripped.
_MAX_PENDING_ESCAPE = 4096
# How far the kept tail may grow past its budget before it is cut back: about
# one read, so trimming stays rare and a flood of small chunks linear.
_TRIM_SLACK_BYTES = 64 * 1024


def clean_terminal_text(text: str) -> str:
    """Strip ANSI sequences and control characters, normalise line endings."""
    text = _ANSI_RE.sub("", text)
    # A pty turns "\n" into "\r\n", so a program's own "\r\n" arrives as
    # "\r\r\n": any run of "\r" before "\n" is one line ending.
    text = _CR_RUN_LF_RE.sub("\n", text).replace("\r", "\n")
    return _CONTROL_RE.sub("", text)


class TextCleaner:
    """Incremental ``clean_terminal_text`` over raw bytes read in chunks.

    Bytes arrive split at arbitrary points: in the middle of a UTF-8 character,
    of an escape sequence, or between ``\\r`` and ``\\n``. Each of those is held
    back until the next chunk decides it.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def feed(self, data: bytes) -> str:
        text = self._pending + self._decoder.decode(data)
        self._pending = ""
        cut = len(text)
        esc = max(text.rfind("\x1b"), text.rfind("\x9b"))
        if (
            esc >= 0
            and len(text) - esc < _MAX_PENDING_ESCAPE
            and _ANSI_UNFINISHED_RE.fullmatch(text, esc) is not None
        ):
            cut = esc
        while cut > 0 and text[cut - 1] == "\r":
            cut -= 1  # "\r" then "\n" in the next chunk is one line ending
        self._pending = text[cut:]
        return clean_terminal_text(text[:cut])

    def flush(self) -> str:
        text = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return clean_terminal_text(text)


class BoundedOutput:
    """Keeps the first and last ``limit / 2`` bytes of the text, counts the rest."""

    def __init__(self, limit: int) -> None:
        self._limit = max(limit, 0)
        self._head_budget = self._limit // 2
        self._tail_budget = self._limit - self._head_budget
        self._head = bytearray()
        self._tail = bytearray()
        self._dropped = 0

    def append(self, text: str) -> None:
        data = text.encode("utf-8")
        room = self._head_budget - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if not data:
            return
        self._tail += data
        # Trim in batches so a flood of small chunks stays linear.
        if len(self._tail) > 2 * self._tail_budget + _TRIM_SLACK_BYTES:
            self._trim()

    def _trim(self) -> None:
        excess = len(self._tail) - self._tail_budget
        if excess > 0:
            del self._tail[:excess]
            self._dropped += excess

    @property
    def dropped(self) -> int:
        self._trim()
        return self._dropped

    def text(self) -> str:
        self._trim()
        # A cut may split a UTF-8 character; "ignore" drops only that fragment.
        head = self._head.decode("utf-8", errors="ignore")
        tail = self._tail.decode("utf-8", errors="ignore")
        if not self._dropped:
            return head + tail
        return f"{head}\n[... {self._dropped} bytes truncated ...]\n{tail}"


def bound_text(text: str, limit_bytes: int) -> str:
    """``text`` cut to about ``limit_bytes`` of UTF-8 as head + marker + tail."""
    bounded = BoundedOutput(limit_bytes)
    bounded.append(text)
    return bounded.text()
