"""A worker asks the namespace for llmmixer's search attributes, not every run the server.

Every run asks at its start (a local activity), and the operator API behind
the answer is rate-limited, tightly on Temporal Cloud: a worker reuses a
complete answer for a while, and never an incomplete one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from llmmixer.activities.search import ANSWER_TTL_S, SearchAttributeCheck
from llmmixer.client.setup import register_search_attributes
from llmmixer.core.search import SEARCH_ATTRIBUTES


class CountingOperator:
    """The real operator service, with the list calls counted."""

    def __init__(self, client: Client) -> None:
        self.real = client.operator_service
        self.calls = 0

    async def list_search_attributes(self, request: ListSearchAttributesRequest) -> Any:
        self.calls += 1
        return await self.real.list_search_attributes(request)


@dataclasses.dataclass
class CountingClient:
    """What the activity reads of its client: the namespace and the operator service."""

    namespace: str
    operator_service: CountingOperator


def counting(client: Client, namespace: str) -> tuple[ActivityEnvironment, CountingOperator]:
    operator = CountingOperator(client)
    environment = ActivityEnvironment(CountingClient(namespace, operator))  # type: ignore[arg-type]
    environment.info = dataclasses.replace(environment.info, workflow_namespace=namespace)
    return environment, operator


@dataclasses.dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_complete_answer_is_reused_for_a_while_then_asked_again(client: Client) -> None:
    await register_search_attributes(client, client.namespace)
    environment, operator = counting(client, client.namespace)
    clock = Clock()
    check = SearchAttributeCheck(clock=clock)

    for _ in range(5):  # five runs starting within the interval
        assert sorted(await environment.run(check.registered)) == sorted(SEARCH_ATTRIBUTES)
    assert operator.calls == 1

    clock.now += ANSWER_TTL_S + 1
    assert sorted(await environment.run(check.registered)) == sorted(SEARCH_ATTRIBUTES)
    assert operator.calls == 2


async def test_an_incomplete_answer_is_asked_again_at_once(client: Client) -> None:
    # A namespace nobody ran `llmmixer setup` on: the next run must see the
    # attributes as soon as someone does.
    environment, operator = counting(client, "nowhere")
    check = SearchAttributeCheck(clock=Clock())
    assert await environment.run(check.registered) == []
    assert await environment.run(check.registered) == []
    assert operator.calls == 2
