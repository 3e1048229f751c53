"""One way to run a server in ``async with``: ``start()`` on entry, ``stop()`` on exit.

The HTTP servers and the embedded Temporal server each start and stop the same
way; subclasses write ``start`` and ``stop`` (``stop`` must be safe to call
twice and after a failed ``start``), and this base gives them the context
manager.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self


class Service(ABC):
    """Something that runs between ``start()`` and ``stop()``, usable as ``async with``."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
