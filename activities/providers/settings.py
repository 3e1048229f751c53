"""Provider keys and endpoints, read once on the worker from the contract's variables.

Only these variables are read: each provider's key and endpoint variables as
the provider registry declares them (``ANTHROPIC_API_KEY``,
``ANTHROPIC_BASE_URL``, ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``,
``GEMINI_API_KEY`` (or ``GOOGLE_API_KEY`` when it is unset),
``GOOGLE_GEMINI_BASE_URL``), ``LLMMIXER_ALLOWED_BASE_URLS`` and
``LLMMIXER_RATE_LIMITS``. The mapping
is passed in rather than read from ``os.environ`` here so tests and
``llmmixer doctor`` can inspect any environment without touching the
process's own.

Where a key may go: only to the endpoint the worker's environment configures
for its provider (or the SDK's default). A spec or a plan is not trusted with
more. A step's own ``base_url`` that is that same endpoint keeps the key; any
other is called only when the operator lists it in
``LLMMIXER_ALLOWED_BASE_URLS``, and then without any key (a local
OpenAI-compatible server needs none). "The same endpoint" means the same
scheme, host, port and path: another path on the worker's host is another
server as far as keys go (a shared gateway routes paths to different owners).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from llmmixer.activities.providers.base import ProviderConfig, ProviderError
from llmmixer.core.contracts import ErrorType
from llmmixer.core.endpoints import Endpoint as _Endpoint
from llmmixer.core.endpoints import display_url as _display_url
from llmmixer.core.endpoints import parse_endpoint as _endpoint
from llmmixer.core.providers import PROVIDER_SPECS, provider_spec
from llmmixer.runtime.settings import ProviderEnv, RateLimitRule

__all__ = [
    "ALLOWED_BASE_URLS_VARIABLE",
    "ProviderAccess",
    "ProviderSettings",
]

ALLOWED_BASE_URLS_VARIABLE = "LLMMIXER_ALLOWED_BASE_URLS"


def _value(environ: Mapping[str, str], name: str) -> str | None:
    raw = environ.get(name)
    if raw is None:
        return None
    raw = raw.strip()
    return raw or None


@dataclass(frozen=True)
class ProviderAccess:
    """One provider's key and endpoint on this worker (the key never in ``repr``)."""

    api_key: str | None = field(default=None, repr=False)
    #: None: the SDK's default endpoint (the registry's ``default_base_url``).
    base_url: str | None = None
    #: Which variable the key came from (or would), for ``describe``.
    key_variable: str | None = None


@dataclass(frozen=True)
class ProviderSettings:
    """The worker's provider credentials and endpoints (keys never in ``repr``).

    ``access`` maps a registry name to its :class:`ProviderAccess`; a provider
    missing from it has no key and the default endpoint.
    """

    access: Mapping[str, ProviderAccess] = field(default_factory=dict)
    #: Other servers a step's ``base_url`` may name (``LLMMIXER_ALLOWED_BASE_URLS``),
    #: normalised; they are called without any key. ``llmmixer doctor`` shows them.
    allowed_base_urls: tuple[str, ...] = ()
    #: Requests and tokens per minute per provider/model (``LLMMIXER_RATE_LIMITS``).
    rate_limits: tuple[RateLimitRule, ...] = ()

    def __post_init__(self) -> None:
        # Constructed directly (tests, embedders) the list is held to the same rules,
        # by the same parser as the variable: two parsers could disagree on a server.
        allowed = {ALLOWED_BASE_URLS_VARIABLE: ",".join(self.allowed_base_urls)}
        object.__setattr__(
            self, "allowed_base_urls", ProviderEnv.from_env(allowed).allowed_base_urls
        )
        for provider in self.access:
            provider_spec(provider)
        object.__setattr__(self, "access", MappingProxyType(dict(self.access)))

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ProviderSettings:
        """Read the contract's variables from ``environ`` (blank values count as unset).

        A bad ``LLMMIXER_ALLOWED_BASE_URLS`` raises ``SettingsError`` naming it, so
        a worker refuses to start rather than guess what the operator meant.
        """
        access: dict[str, ProviderAccess] = {}
        for spec in PROVIDER_SPECS:
            key, variable = None, spec.key_variables[0]
            for candidate in spec.key_variables:
                key = _value(environ, candidate)
                if key is not None:
                    variable = candidate
                    break
            access[spec.name] = ProviderAccess(
                api_key=key,
                base_url=_value(environ, spec.base_url_variable),
                key_variable=variable,
            )
        env = ProviderEnv.from_env(environ)
        return cls(
            access=access, allowed_base_urls=env.allowed_base_urls, rate_limits=env.rate_limits
        )

    def access_for(self, provider: str) -> ProviderAccess:
        """``provider``'s key and endpoint; ``ValueError`` for a name the registry lacks."""
        provider_spec(provider)
        return self.access.get(provider, ProviderAccess())

    def api_key(self, provider: str) -> str | None:
        return self.access_for(provider).api_key

    def base_url(self, provider: str) -> str | None:
        """The endpoint the worker's environment sets for ``provider``, or None (default)."""
        return self.access_for(provider).base_url

    def key_variable(self, provider: str) -> str:
        """The variable ``provider``'s key came from, or the first one it is read from."""
        return self.access_for(provider).key_variable or provider_spec(provider).key_variables[0]

    def _pair(self, provider: str) -> tuple[str | None, str | None]:
        access = self.access_for(provider)
        return access.api_key, access.base_url

    def _worker_url(self, provider: str) -> str:
        return self._pair(provider)[1] or provider_spec(provider).default_base_url

    def config_for(
        self, provider: str, base_url_override: str | None = None, timeout_s: float = 600.0
    ) -> ProviderConfig:
        """The client configuration for one call.

        ``base_url_override`` is the step's own endpoint (``base_url`` of the
        step or of a fallback target). When it is the worker's endpoint for
        ``provider`` the call is as if it were unset (with the worker's key).
        When the operator lists it in ``LLMMIXER_ALLOWED_BASE_URLS`` the config
        is ``keyless``: no key at all goes there. Otherwise it raises a
        non-retryable ``ProviderError(REJECTED)`` naming that variable.
        """
        key, base_url = self._pair(provider)
        if base_url_override and not self._is_worker_endpoint(provider, base_url_override):
            self._require_allowed(provider, base_url_override)
            return ProviderConfig(
                provider=provider, base_url=base_url_override, timeout_s=timeout_s, keyless=True
            )
        return ProviderConfig(
            provider=provider, api_key=key, base_url=base_url, timeout_s=timeout_s
        )

    def _is_worker_endpoint(self, provider: str, url: str) -> bool:
        worker_url = self._worker_url(provider)
        try:
            return _endpoint(url) == _endpoint(worker_url)
        except ValueError:
            # A worker endpoint outside the strict form is the operator's own
            # choice; a step matches it only by spelling it the same.
            return url.rstrip("/") == worker_url.rstrip("/")

    def _require_allowed(self, provider: str, url: str) -> None:
        try:
            wanted = _endpoint(url)
        except ValueError as error:
            raise ProviderError(
                ErrorType.REJECTED,
                f"the step's base_url {_display_url(url)} is not a plain http(s) URL ({error}); "
                "fix the step's base_url",
            ) from None
        if any(_endpoint(entry).covers(wanted) for entry in self.allowed_base_urls):
            return
        worker_url = self._worker_url(provider)
        endpoint_variable = provider_spec(provider).base_url_variable
        origin = _Endpoint(wanted.scheme, wanted.host, wanted.port, "").text()
        raise ProviderError(
            ErrorType.REJECTED,
            f"the step's base_url {wanted.text()} is not this worker's {provider} endpoint "
            f"({_display_url(worker_url)}) and is not listed in {ALLOWED_BASE_URLS_VARIABLE}. "
            f"To call that server without the worker's key, the worker's operator adds it to "
            f"{ALLOWED_BASE_URLS_VARIABLE} (e.g. {ALLOWED_BASE_URLS_VARIABLE}={origin}); to "
            f"send the worker's key there, the operator sets {endpoint_variable} "
            "instead. A spec or plan cannot choose where a key goes",
        )

    def secrets(self) -> tuple[str, ...]:
        """Every configured key, for redaction of error messages."""
        return tuple(a.api_key for a in self.access.values() if a.api_key)

    def describe(self) -> dict[str, dict[str, Any]]:
        """What is configured per provider, without any key value.

        ``{"openai": {"key_variable": "OPENAI_API_KEY", "key_set": True,
        "base_url": "https://api.openai.com/v1", "base_url_default": True}, ...}``
        """
        out: dict[str, dict[str, Any]] = {}
        for spec in PROVIDER_SPECS:
            key, base_url = self._pair(spec.name)
            out[spec.name] = {
                "key_variable": self.key_variable(spec.name),
                "key_set": key is not None,
                "base_url": _display_url(base_url or spec.default_base_url),
                "base_url_default": base_url is None,
            }
        return out
