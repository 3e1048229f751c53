"""What the large-payload tests send through a run: a big reply and a spec that echoes it.

Shared by tests/test_large_payloads.py (the local payload store) and
tests/test_payload_s3.py (the S3 one), so both stores are tested with the same
text and the same run.
"""

from __future__ import annotations

import uuid
from typing import Any

FIVE_MB = 5 * 1024 * 1024


def big_text(size: int = FIVE_MB) -> str:
    """``size`` characters of varied text between a unique head and ``<<TAIL>>``.

    Varied (not one repeated byte) so compression is realistic; the unique head
    and the tail make a cut or a mix-up of two runs visible.
    """
    line = "".join(
        f"line {n:07d}: the quick brown fox jumps over the lazy dog\n" for n in range(64)
    )
    body = (line * (size // len(line) + 1))[: size - 20]
    return f"<<HEAD {uuid.uuid4().hex[:6]}>>" + body[: size - 40] + "<<TAIL>>"


def chunked(text: str, size: int = 256 * 1024) -> list[str]:
    """``text`` as the fake provider's stream chunks."""
    return [text[i : i + size] for i in range(0, len(text), size)]


def two_step_spec(name: str = "big") -> dict[str, Any]:
    """``big`` writes the long reply; ``echo`` gets it whole in its prompt."""
    return {
        "name": name,
        "defaults": {"retry": {"max_attempts": 1}},
        "steps": [
            {"id": "big", "provider": "openai", "model": "gpt-4.1-mini", "prompt": "write a lot"},
            {
                "id": "echo",
                "provider": "openai",
                "model": "gpt-4.1-mini",
                "needs": ["big"],
                "prompt": "Summarise:\n{{steps.big.output}}",
            },
        ],
        "output": "{{steps.echo.output}}",
    }
