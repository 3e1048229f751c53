"""The search attributes llmmixer runs keep current, by name and Temporal type.

One table read by every side: the embedded server registers them at start
(``temporal server start-dev --search-attribute Name=Type``), ``llmmixer
setup`` registers them on a namespace, a worker checks that its namespace has
them, and ``MixerWorkflow`` upserts them (``workflows/search.py``). Ops teams
find runs with them in the Temporal CLI and Web UI::

    temporal workflow list --query 'LlmmixerState="waiting" AND ExecutionStatus="Running"'
"""

from __future__ import annotations

from typing import Literal

SearchAttributeType = Literal["Keyword", "KeywordList", "Double", "Int"]

SPEC = "LlmmixerSpec"  # the spec's name
STATE = "LlmmixerState"  # running, waiting, completed, failed, cancelled
WAITING_STEPS = "LlmmixerWaitingSteps"  # steps waiting for a person
PROVIDERS = "LlmmixerProviders"  # providers the run has called
COST_USD = "LlmmixerCostUsd"  # spent so far (models without a price count 0)
TOKENS = "LlmmixerTokens"  # input + output tokens so far
FORK_OF = "LlmmixerForkOf"  # the run a fork started from

SEARCH_ATTRIBUTES: dict[str, SearchAttributeType] = {
    SPEC: "Keyword",
    STATE: "Keyword",
    WAITING_STEPS: "KeywordList",
    PROVIDERS: "KeywordList",
    COST_USD: "Double",
    TOKENS: "Int",
    FORK_OF: "Keyword",
}

# The local activity a run asks, once at its start, which of them its
# namespace has; history records the answer, so replay upserts the same.
SEARCH_ATTRIBUTES_ACTIVITY = "llmmixer.search_attributes_registered"
