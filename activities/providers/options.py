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

__all__ = ["check_provider_options", "checked_provider_options"]

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
