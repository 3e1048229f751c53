"""Provider keys and endpoints, read once on the worker from the contract's variables.

Only these variables are read (contract section 3): ``ANTHROPIC_API_KEY``,
``ANTHROPIC_BASE_URL``, ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``,
``GEMINI_API_KEY`` (or ``GOOGLE_API_KEY`` when it is unset),
``GOOGLE_GEMINI_BASE_URL``. The mapping is passed in rather than read from
``os.environ`` here so tests and ``llmmixer doctor`` can inspect any
environment without touching the process's own.

A per-step ``base_url`` (from the spec) only receives the worker's key when it
points at the same origin as the worker's configured endpoint. Otherwise a spec
could send the key to any server it names; a local OpenAI-compatible server
(Ollama, vLLM) needs no key anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from llmmixer.activities.contracts import ErrorType
from llmmixer.activities.providers.base import ProviderConfig, ProviderError

__all__ = ["DEFAULT_BASE_URLS", "ProviderSettings"]

# The SDKs' own defaults, written out so a client never falls back to reading
# the process environment behind our back.
DEFAULT_BASE_URLS: Mapping[str, str] = {
    "anthropic": "https://api.anthropic.com",
    "openai": "https://api.openai.com/v1",
    "gemini": "https://generativelanguage.googleapis.com/",
}


def _value(environ: Mapping[str, str], name: str) -> str | None:
    raw = environ.get(name)
    if raw is None:
        return None
    raw = raw.strip()
    return raw or None


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return (parts.scheme.lower(), parts.netloc.lower())


def _display_url(url: str) -> str:
    """A base URL without userinfo or query string, which could carry a token."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True)
class ProviderSettings:
    """The worker's provider credentials and endpoints (keys never in ``repr``)."""

    anthropic_api_key: str | None = field(default=None, repr=False)
    anthropic_base_url: str | None = None
    openai_api_key: str | None = field(default=None, repr=False)
    openai_base_url: str | None = None
    gemini_api_key: str | None = field(default=None, repr=False)
    gemini_base_url: str | None = None
    # Which variable the Gemini key came from, for ``describe``.
    gemini_key_variable: str = "GEMINI_API_KEY"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ProviderSettings:
        """Read the contract's variables from ``environ`` (blank values count as unset)."""
        gemini_key = _value(environ, "GEMINI_API_KEY")
        gemini_var = "GEMINI_API_KEY"
        if gemini_key is None:
            gemini_key = _value(environ, "GOOGLE_API_KEY")
            if gemini_key is not None:
                gemini_var = "GOOGLE_API_KEY"
        return cls(
            anthropic_api_key=_value(environ, "ANTHROPIC_API_KEY"),
            anthropic_base_url=_value(environ, "ANTHROPIC_BASE_URL"),
            openai_api_key=_value(environ, "OPENAI_API_KEY"),
            openai_base_url=_value(environ, "OPENAI_BASE_URL"),
            gemini_api_key=gemini_key,
            gemini_base_url=_value(environ, "GOOGLE_GEMINI_BASE_URL"),
            gemini_key_variable=gemini_var,
        )

    def _pair(self, provider: str) -> tuple[str | None, str | None]:
        if provider == "anthropic":
            return self.anthropic_api_key, self.anthropic_base_url
        if provider == "openai":
            return self.openai_api_key, self.openai_base_url
        if provider == "gemini":
            return self.gemini_api_key, self.gemini_base_url
        raise ValueError(f"unknown provider {provider!r}: use one of anthropic, openai, gemini")

    def config_for(
        self, provider: str, base_url_override: str | None = None, timeout_s: float = 600.0
    ) -> ProviderConfig:
        """The client configuration for one call.

        ``base_url_override`` is the step's own endpoint; when its origin
        differs from the worker's endpoint for ``provider`` the config carries
        no key (see the module docstring). For Anthropic and Gemini, which
        need a key, that raises ``ProviderError(AUTH)`` saying which variable
        to set on the worker instead.
        """
        key, base_url = self._pair(provider)
        if base_url_override:
            worker_url = base_url or DEFAULT_BASE_URLS[provider]
            if _origin(base_url_override) != _origin(worker_url):
                if key is not None and provider != "openai":
                    # Only OpenAI-compatible servers commonly run without a key.
                    var = (
                        "ANTHROPIC_BASE_URL"
                        if provider == "anthropic"
                        else ("GOOGLE_GEMINI_BASE_URL")
                    )
                    raise ProviderError(
                        ErrorType.AUTH,
                        f"the step's base_url {_display_url(base_url_override)} is not the "
                        f"worker's {provider} endpoint, so the worker's key is not sent there: "
                        f"set {var} on the worker to use that endpoint",
                    )
                key = None
            base_url = base_url_override
        return ProviderConfig(
            provider=provider, api_key=key, base_url=base_url, timeout_s=timeout_s
        )

    def secrets(self) -> tuple[str, ...]:
        """Every configured key, for redaction of error messages."""
        keys = (self.anthropic_api_key, self.openai_api_key, self.gemini_api_key)
        return tuple(k for k in keys if k)

    def describe(self) -> dict[str, dict[str, Any]]:
        """What is configured per provider, without any key value.

        ``{"openai": {"key_variable": "OPENAI_API_KEY", "key_set": True,
        "base_url": "https://api.openai.com/v1", "base_url_default": True}, ...}``
        """
        out: dict[str, dict[str, Any]] = {}
        variables = {
            "anthropic": "ANTHROPIC_API_KEY",
            "openai": "OPENAI_API_KEY",
            "gemini": self.gemini_key_variable,
        }
        for provider in ("anthropic", "openai", "gemini"):
            key, base_url = self._pair(provider)
            out[provider] = {
                "key_variable": variables[provider],
                "key_set": key is not None,
                "base_url": _display_url(base_url or DEFAULT_BASE_URLS[provider]),
                "base_url_default": base_url is None,
            }
        return out
