"""Which workers poll a task queue, across all of its partitions.

Temporal splits a normal task queue into partitions (four by default, the dev
server included). ``DescribeTaskQueue`` on the queue's name reports only the
root partition, and a poll waiting on another partition reaches the root only
while that partition's single forwarding slot is free. With two or more
workers one of them can therefore stay invisible at the root for as long as it
likes, so "is anyone polling?" must ask every partition.
"""

from __future__ import annotations

import asyncio

from temporalio.api.enums.v1 import TaskQueueKind, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

__all__ = ["DEFAULT_PARTITIONS", "poller_identities"]

# The server's default (`matching.numTaskqueueReadPartitions`). Asking for a
# partition the server does not have returns no pollers, not an error, so a
# cluster configured with fewer costs nothing; one configured with more is
# still seen through its root, which receives forwarded polls.
DEFAULT_PARTITIONS = 4


def _partition_names(task_queue: str, partitions: int) -> list[str]:
    # `/_sys/<queue>/<n>` is how the server itself names partition n > 0.
    return [task_queue] + [f"/_sys/{task_queue}/{n}" for n in range(1, partitions)]


async def poller_identities(
    client: Client,
    task_queue: str,
    task_queue_type: TaskQueueType.ValueType = TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
    *,
    partitions: int = DEFAULT_PARTITIONS,
) -> set[str]:
    """Identities of the workers that recently polled ``task_queue`` on any partition."""
    answers = await asyncio.gather(
        *(
            client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=client.namespace,
                    task_queue=TaskQueue(name=name, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL),
                    task_queue_type=task_queue_type,
                )
            )
            for name in _partition_names(task_queue, partitions)
        )
    )
    return {poller.identity for answer in answers for poller in answer.pollers}
