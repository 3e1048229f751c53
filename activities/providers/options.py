"""The activity's side of ``provider_options``: refuse before any request is built.

The schemas and the rules live in :mod:`llmmixer.core.provider_options`, where
``validate`` and the plan check read them too; here a broken rule becomes the
non-retryable ``ProviderError(REJECTED)`` a step fails with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

from llmmixer.activities.providers.base import ProviderError
from llmmixer.core.contracts import ErrorType
from llmmixer.core.provider_options import model_name_issue, provider_option_issues

__all__ = ["OptionsCheck", "check_provider_options", "checked_provider_options"]

_S = TypeVar("_S", bound=BaseModel)


def check_provider_options(
    provider: str, options: Mapping[str, Any], model: str | None = None
) -> None:
    """Raise a non-retryable ``ProviderError(REJECTED)`` listing every issue, if any.

    With ``model``, a model name that would change the request's path is one too.
    """
    problem = model_name_issue(provider, model) if model is not None else None
    if problem is not None:
        raise ProviderError(ErrorType.REJECTED, problem)
    issues = provider_option_issues(provider, options)
    if issues:
        raise ProviderError(
            ErrorType.REJECTED,
            f"invalid {provider} provider_options: "
            + "; ".join(f"{path}: {message}" for path, message in issues),
        )


def checked_provider_options(provider: str, model: type[_S], options: Mapping[str, Any]) -> _S:
    """``options`` parsed as ``model``, or a non-retryable ``ProviderError(REJECTED)``.

    Called before any request is built: an option the schema does not know
    never reaches an SDK.
    """
    check_provider_options(provider, options)
    return model.model_validate(dict(options))


class OptionsCheck:
    """``check_provider_options`` and ``checked_provider_options``, the usual case remembered.

    Most calls carry no ``provider_options``. For them the registry look-up
    (an import), the schema and its validation of ``{}`` give the same answer
    every time, yet cost every call more than building its request did; so
    the first success per provider is kept. Held by one worker or adapter
    instance (never module state); a failure is not kept, so it is raised
    again with its message, and options that were given are always checked.
    """

    def __init__(self) -> None:
        self._checked: set[str] = set()
        self._parsed: dict[tuple[str, type[BaseModel]], BaseModel] = {}

    def check(self, provider: str, options: Mapping[str, Any], model: str | None = None) -> None:
        """:func:`check_provider_options`."""
        if options or provider not in self._checked:
            check_provider_options(provider, options, model)
            if not options:
                self._checked.add(provider)
            return
        problem = model_name_issue(provider, model) if model is not None else None
        if problem is not None:
            raise ProviderError(ErrorType.REJECTED, problem)

    def parsed(self, provider: str, model: type[_S], options: Mapping[str, Any]) -> _S:
        """:func:`checked_provider_options`; the models are frozen, so one is shared."""
        if options:
            return checked_provider_options(provider, model, options)
        kept = self._parsed.get((provider, model))
        if isinstance(kept, model):
            return kept
        parsed = checked_provider_options(provider, model, options)
        self._parsed[(provider, model)] = parsed
        return parsed
