"""Which of llmmixer's search attributes the worker's namespace has.

Asked once at the start of each run (a local activity; history records the
answer, so a replay upserts exactly what the run did). A namespace without
them is not an error: the worker warns once, naming the command that
registers them, and its runs go on without search attributes.
"""

from __future__ import annotations

import logging

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


class SearchAttributeCheck:
    """One per worker: remembers whether it has warned already."""

    def __init__(self) -> None:
        self._warned = False

    @activity.defn(name=SEARCH_ATTRIBUTES_ACTIVITY)
    async def registered(self) -> list[str]:
        """The names of llmmixer's attributes that the namespace has, with their types."""
        client = activity.client()
        namespace = activity.info().workflow_namespace or client.namespace
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
            self._warn_once(namespace, "missing or of another type", missing)
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
