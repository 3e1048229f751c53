"""What a base URL is, strictly: the one parser for endpoints keys may go to.

The worker's settings (``LLMMIXER_ALLOWED_BASE_URLS``, read by
``runtime/settings.py``) and the provider layer (which decides whether a
step's ``base_url`` is the worker's endpoint, an allowed one, or neither)
must agree on which server a URL names; two parsers would let one of them be
fooled where the other is not. Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

__all__ = ["Endpoint", "display_url", "parse_endpoint"]

# Characters a plain URL needs. Anything else (backslashes, spaces, controls,
# non-ASCII, '#') is where URL parsers disagree about the host, so a URL with
# one is refused rather than interpreted.
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?\[\]@!$&'()*+,;=%]+")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Endpoint:
    """A base URL reduced to what decides which server gets the request."""

    scheme: str
    host: str
    port: int
    path: str  # no trailing slash; "" for the root

    def covers(self, other: Endpoint) -> bool:
        """Whether ``other`` is this endpoint or lies under its path."""
        if (self.scheme, self.host, self.port) != (other.scheme, other.host, other.port):
            return False
        return not self.path or other.path == self.path or other.path.startswith(self.path + "/")

    def text(self) -> str:
        default = _DEFAULT_PORTS[self.scheme] == self.port
        netloc = self.host if default else f"{self.host}:{self.port}"
        return f"{self.scheme}://{netloc}{self.path}"


def parse_endpoint(url: str) -> Endpoint:
    """Parse a base URL strictly; ``ValueError`` says what is wrong with it."""
    if not _URL_CHARS.fullmatch(url):
        raise ValueError("it has characters a plain http(s) URL does not (spaces, '\\', '#', ...)")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("it must start with http:// or https://")
    if "@" in parts.netloc:
        raise ValueError("it must not carry a user name or password")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError("it has no host")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        raise ValueError("its port is not a number") from None
    segments = parts.path.split("/")
    if "%" in parts.path or "." in segments or ".." in segments:
        raise ValueError("its path must not have '.', '..' or %-escapes")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return Endpoint(scheme, host, port, parts.path.rstrip("/"))


def display_url(url: str) -> str:
    """A base URL without userinfo or query string, which could carry a token."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        return "(unparseable URL)"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
