"""Small helpers for Temporal addresses: parse, classify, probe, pick a port.

``llmmixer run`` decides between "use the server at TEMPORAL_ADDRESS", "start
the embedded server there" and "fail" with these (docs/cli.md, `llmmixer run`): only a
loopback address that nothing listens on gets an embedded server; anything
else that does not answer is an error, never a silent local fallback.

Everything here is pure except :func:`is_listening` (one TCP connect, async)
and :func:`free_port` (one bind), and neither resolves names through DNS on
behalf of :func:`is_loopback`: whether an address is "local" is decided from
its text alone, so a hosts-file entry can never turn a remote server into a
local one.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from llmmixer.runtime.http_guard import is_loopback_name

__all__ = [
    "AddressError",
    "format_address",
    "free_port",
    "is_listening",
    "is_loopback",
    "parse_address",
]


class AddressError(ValueError):
    """A Temporal address that is not ``host:port``; the message says the fix."""


def _strip_brackets(host: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (or ``[v6-host]:port``) into ``(host, port)``.

    The host comes back without brackets (``"[::1]:7233"`` -> ``("::1", 7233)``)
    so it can go straight to ``socket`` or ``--ip``; :func:`format_address`
    puts them back. A port is required, as it is for Temporal's own clients:
    guessing 7233 would hide a typo in TEMPORAL_ADDRESS.
    """
    text = address.strip()
    example = "for example 127.0.0.1:7233 or [::1]:7233"
    if not text or "/" in text or "@" in text:
        raise AddressError(f"invalid Temporal address {address!r}: expected host:port, {example}")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise AddressError(
                f"invalid Temporal address {address!r}: expected [ipv6-host]:port, {example}"
            )
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise AddressError(
                f"invalid Temporal address {address!r}: the port is missing, {example}"
            )
        if ":" in host:
            raise AddressError(
                f"invalid Temporal address {address!r}: put an IPv6 host in brackets, {example}"
            )
    if not host:
        raise AddressError(f"invalid Temporal address {address!r}: the host is missing, {example}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise AddressError(
            f"invalid Temporal address {address!r}: the port must be a number "
            f"from 1 to 65535, {example}"
        )
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 host (the inverse of :func:`parse_address`)."""
    bare = _strip_brackets(host)
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def is_loopback(host: str) -> bool:
    """True for ``localhost``, ``127.0.0.0/8``, ``::1`` (bracketed or not).

    Names other than ``localhost`` are never resolved: see the module docstring.
    """
    return is_loopback_name(_strip_brackets(host.strip()))


# A probe is a bounded question by nature, so the bound is part of its signature.
async def is_listening(host: str, port: int, timeout: float = 1.0) -> bool:  # noqa: ASYNC109
    """Whether something accepts TCP connections on ``host:port`` within ``timeout`` seconds.

    A refused, unreachable or slow connect is ``False``; this answers "is a port
    taken", not "is it Temporal" (the embedded server does a gRPC check for that).
    """
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(_strip_brackets(host), port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    # The peer may reset the connection as we close it; the answer is already known.
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it).

    There is an unavoidable window between this returning and the caller
    binding the port; callers that start a server must still handle "in use".
    """
    bare = _strip_brackets(host)
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((bare, 0))
        port: int = sock.getsockname()[1]
        return port
