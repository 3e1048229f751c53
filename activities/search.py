"""Which of llmmixer's search attributes the worker's namespace has.

Asked once at the start of each run (a local activity; history records the
answer, so a replay upserts exactly what the run did); a worker reuses a
namespace's complete answer for ``ANSWER_TTL_S``. A namespace without
them is not an error: the worker warns once, naming the command that
registers them, and its runs go on without search attributes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from temporalio import activity
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.service import RPCError

from llmmixer.core.search import SEARCH_ATTRIBUTES, SEARCH_ATTRIBUTES_ACTIVITY

__all__ = ["INDEXED_TYPES", "SearchAttributeCheck"]

log = logging.getLogger("llmmixer.search")

# core/search.py's type names as the operator API spells them.
INDEXED_TYPES: dict[str, IndexedValueType.ValueType] = {
    "Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
    "KeywordList": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST,
    "Double": IndexedValueType.INDEXED_VALUE_TYPE_DOUBLE,
    "Int": IndexedValueType.INDEXED_VALUE_TYPE_INT,
}


# How long a worker trusts a namespace's complete answer. Every run asks at
# its start, and the operator API is rate-limited (tightly on Temporal
# Cloud); attributes registered by `llmmixer setup` are registered for good,
# so reusing a complete answer for a while loses nothing. An incomplete one
# is never reused: runs see `setup` take effect at once.
ANSWER_TTL_S = 30.0


class SearchAttributeCheck:
    """One per worker: remembers whether it has warned already, and recent answers."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._warned = False
        self._clock = clock
        self._complete: dict[str, float] = {}  # namespace -> when it had them all

    @activity.defn(name=SEARCH_ATTRIBUTES_ACTIVITY)
    async def registered(self) -> list[str]:
        """The names of llmmixer's attributes that the namespace has, with their types."""
        client = activity.client()
        namespace = activity.info().workflow_namespace or client.namespace
        seen = self._complete.get(namespace)
        if seen is not None and self._clock() - seen < ANSWER_TTL_S:
            return list(SEARCH_ATTRIBUTES)
        try:
            response = await client.operator_service.list_search_attributes(
                ListSearchAttributesRequest(namespace=namespace)
            )
        except RPCError as error:
            self._warn_once(
                namespace, f"cannot list them ({error.message})", list(SEARCH_ATTRIBUTES)
            )
            return []
        have = response.custom_attributes
        found = [
            name
            for name, kind in SEARCH_ATTRIBUTES.items()
            if have.get(name) == INDEXED_TYPES[kind]
        ]
        missing = [name for name in SEARCH_ATTRIBUTES if name not in found]
        if missing:
            self._complete.pop(namespace, None)
            self._warn_once(namespace, "missing or of another type", missing)
        else:
            self._complete[namespace] = self._clock()
        return found

    def _warn_once(self, namespace: str, why: str, names: list[str]) -> None:
        if self._warned:
            return
        self._warned = True
        log.warning(
            "namespace %r: search attributes %s: %s; runs go on without them. "
            "Register them with `llmmixer setup` (TEMPORAL_NAMESPACE=%s)",
            namespace,
            ", ".join(names),
            why,
            namespace,
        )
