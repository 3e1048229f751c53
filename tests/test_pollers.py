"""Seeing every worker on a task queue, whichever partition its polls wait on.

`llmmixer run` starts a worker of its own only when nobody polls the queue,
and the tests wait for a started worker to poll before they crash anything.
Both ask :func:`poller_identities`, which must see a worker even when the
server keeps its polls on a partition other than the root.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

from temporalio import activity
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.client import Client
from temporalio.worker import PollerBehaviorSimpleMaximum, Worker

from llmmixer.client.pollers import poller_identities


@activity.defn(name="pollers.noop")
async def noop() -> None:
    return None


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[None]:
    task = asyncio.create_task(worker.run())
    try:
        yield
    finally:
        await worker.shutdown()
        await task


async def test_every_worker_is_seen_even_when_its_polls_wait_on_another_partition(
    client: Client,
) -> None:
    queue = f"tq-{uuid.uuid4().hex[:12]}"
    # The first worker's default pollers take the partitions' forwarding
    # slots; each later worker has a single poll, parked on whichever
    # partition the server picked, which is the root only one time in four.
    names = ["busy", "single-1", "single-2", "single-3"]
    # One client each: the SDK allows one worker per queue on a client.
    clients = [
        await Client.connect(client.service_client.config.target_host, namespace=client.namespace)
        for _ in names
    ]
    workers = [
        Worker(
            own_client,
            task_queue=queue,
            activities=[noop],
            identity=name,
            activity_task_poller_behavior=PollerBehaviorSimpleMaximum(5 if name == "busy" else 1),
        )
        for name, own_client in zip(names, clients, strict=True)
    ]
    async with contextlib.AsyncExitStack() as stack:
        for worker in workers:
            await stack.enter_async_context(running(worker))
        seen: set[str] = set()
        for _ in range(100):
            seen = await poller_identities(client, queue, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY)
            if seen >= set(names):
                break
            await asyncio.sleep(0.1)
        assert seen == set(names)


async def test_a_queue_nobody_polls_has_no_pollers(client: Client) -> None:
    queue = f"tq-{uuid.uuid4().hex[:12]}"
    assert await poller_identities(client, queue) == set()
