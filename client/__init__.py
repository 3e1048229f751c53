"""Starting, watching and steering runs: ``MixerClient``, the CLI, the HTTP API."""

from llmmixer.client.mixer import InterventionRefused, MixerClient, MixerHandle, RunFailed

__all__ = ["InterventionRefused", "MixerClient", "MixerHandle", "RunFailed"]
