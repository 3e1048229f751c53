"""Redaction of secrets from any text before it is recorded anywhere.

Its own module, free of SDK imports, because everything that records text
(errors, logs, spans, the CLI) needs it and must not pay for importing every
provider SDK.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[REDACTED]"
# Shapes of keys that must never be recorded even when they are not the
# configured one (a provider echoing some other key, a key pasted in a prompt).
_GENERIC_SECRETS = re.compile(
    r"sk-[A-Za-z0-9][A-Za-z0-9_\-]{7,}"  # OpenAI, Anthropic (sk-ant-...)
    r"|AIza[0-9A-Za-z_\-]{20,}"  # Google API keys
)
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/\-]{8,}=*")
_KEY_PARAM = re.compile(r"(?i)([?&](?:key|api_key|api-key)=)[^&\s\"']+")


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Remove the given secrets and anything shaped like a provider key from ``text``.

    Longer secrets are replaced first so that a key containing another never
    leaves a fragment behind. Values shorter than 4 characters are ignored:
    replacing them would shred ordinary text and they are not real keys.
    """
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = _GENERIC_SECRETS.sub(REDACTED, text)
    text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
    return _KEY_PARAM.sub(lambda m: m.group(1) + REDACTED, text)
