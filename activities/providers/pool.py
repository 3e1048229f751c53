"""One SDK client per provider configuration, per worker.

SDK clients own connection pools, so they are built once and reused across
activity executions. Each distinct :class:`ProviderConfig` (provider, key,
base URL, timeout, keyless) gets its own adapter: two endpoints or two keys
never share a client. All state lives on the pool instance, which the worker
creates and passes into its class-based activities.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

from llmmixer.activities.providers.base import ProviderAdapter, ProviderConfig
from llmmixer.core.providers import PROVIDER_SPECS, resolve

__all__ = ["AdapterFactory", "ProviderPool", "default_factories"]

log = logging.getLogger(__name__)

AdapterFactory = Callable[[ProviderConfig, tuple[str, ...]], ProviderAdapter]


def _factory(adapter: str) -> AdapterFactory:
    def build(config: ProviderConfig, secrets: tuple[str, ...]) -> ProviderAdapter:
        built: ProviderAdapter = resolve(adapter)(config, secrets=secrets)
        return built

    return build


def default_factories() -> dict[str, AdapterFactory]:
    """The registry's adapters (each SDK is imported on first use of its provider)."""
    return {spec.name: _factory(spec.adapter) for spec in PROVIDER_SPECS}


class ProviderPool:
    """Adapters keyed by configuration; build with the worker, close on shutdown.

    ``secrets`` are every key the worker knows (``ProviderSettings.secrets()``):
    each adapter redacts all of them from its error messages, not only its own.
    """

    def __init__(
        self,
        *,
        secrets: Iterable[str] = (),
        factories: Mapping[str, AdapterFactory] | None = None,
    ) -> None:
        self._secrets = tuple(s for s in secrets if s)
        self._factories = dict(factories) if factories is not None else default_factories()
        self._adapters: dict[ProviderConfig, ProviderAdapter] = {}

    def get(self, config: ProviderConfig) -> ProviderAdapter:
        """The adapter for ``config``, built on first use.

        Raises ``ProviderError(AUTH)`` when the config has no key its provider
        needs (nothing is cached then, so setting the key and restarting the
        worker is enough), and ``ValueError`` for an unknown provider.
        """
        adapter = self._adapters.get(config)
        if adapter is not None:
            return adapter
        factory = self._factories.get(config.provider)
        if factory is None:
            raise ValueError(
                f"unknown provider {config.provider!r}: use one of {', '.join(self._factories)}"
            )
        adapter = factory(config, self._secrets)
        self._adapters[config] = adapter
        log.info("built %s client for %r", config.provider, config)
        return adapter

    def providers(self) -> list[str]:
        """The provider names this pool can build adapters for, in registry order."""
        return list(self._factories)

    def __len__(self) -> int:
        return len(self._adapters)

    async def aclose(self) -> None:
        """Close every SDK client; the pool can be reused afterwards (clients are rebuilt)."""
        adapters, self._adapters = list(self._adapters.values()), {}
        for adapter in adapters:
            try:
                await adapter.aclose()
            except Exception:  # closing must go on for the others
                log.warning("closing a %s client failed", adapter.provider, exc_info=True)
