"""A started command as the runner sees it, whichever way it was started.

``Child`` holds the command's pid (also its process-group id: it is a
session leader), the fd its output is read from and the fd its input is
written to, all non-blocking and driven by the event loop. ``pty_child.py``
and ``pipe_child.py`` build one; ``start_in_thread`` is how both fork off
the event loop. ``reap`` waits for the command to exit; ``dispose`` reaps it
if need be and closes every fd the runner opened for it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

__all__ = [
    "READ_SIZE",
    "Child",
    "TerminalMode",
    "dispose",
    "reap",
    "start_in_thread",
    "wait_fd",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

TerminalMode = Literal["pty", "pipe"]

READ_SIZE = 64 * 1024
_EOF = b"\x04"  # VEOF in a cooked terminal: what Ctrl-D sends


class Child:
    """A started child: pid (= process group id), output fd and input fd."""

    def __init__(
        self,
        *,
        pid: int,
        read_fd: int,
        write_fd: int,
        mode: TerminalMode,
        closer: Callable[[], None],
        poller: Callable[[], int | None],
        releaser: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.pid = pid
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.mode = mode
        self._closer = closer
        self._poller = poller
        self._releaser = releaser
        self.returncode: int | None = None
        self.input_closed = False

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._poller()
        return self.returncode

    async def read(self) -> bytes:
        """The next chunk of output; ``b""`` once nobody holds the other end."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return os.read(self.read_fd, READ_SIZE)
            except BlockingIOError:
                await wait_fd(loop, self.read_fd, writable=False)
            except OSError as exc:
                # Linux reports a pty whose every slave fd is closed as EIO.
                if exc.errno == errno.EIO:
                    return b""
                raise

    async def write(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view and not self.input_closed:
            try:
                written = os.write(self.write_fd, view)
            except BlockingIOError:
                await wait_fd(loop, self.write_fd, writable=True)
                continue
            except (BrokenPipeError, OSError) as exc:
                # The child stopped reading (closed stdin or exited): what it
                # no longer wants cannot matter, and the exit code tells the rest.
                log.debug("command %s stopped accepting input: %s", self.pid, exc)
                return
            view = view[written:]

    async def end_input(self, text_sent: str | None) -> None:
        """Tell the child no more input will come (EOF)."""
        if self.input_closed:
            return
        if self.mode == "pipe":
            os.close(self.write_fd)
            self.input_closed = True
            return
        # A cooked terminal needs an empty line for EOF: a pending partial line
        # takes one Ctrl-D to flush and a second one to signal end of input.
        await self.write(_EOF if not text_sent or text_sent.endswith("\n") else _EOF * 2)

    async def release(self) -> None:
        """Once the group is dead and the child reaped: let go of any helper."""
        if self._releaser is not None:
            await self._releaser()

    def close(self) -> None:
        self._closer()


async def wait_fd(loop: asyncio.AbstractEventLoop, fd: int, *, writable: bool) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def start_in_thread(start: Callable[[], _T], discard: Callable[[_T], None]) -> _T:
    """``start()`` in a thread; what it started is discarded if we are cancelled meanwhile.

    Forking blocks for as long as the kernel takes to copy the worker (and,
    until the child's exec, so does ``subprocess``): on the event loop that
    would stop every heartbeat and stream of the worker with it.
    """
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, start)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:

        def cleanup(done: asyncio.Future[_T]) -> None:
            if not done.cancelled() and done.exception() is None:
                discard(done.result())

        future.add_done_callback(cleanup)
        raise


def dispose(child: Child) -> None:
    """Reap the (already SIGKILLed) child if still needed and close our fds."""
    for _ in range(100):
        if child.poll() is not None:
            break
        # Only reached when cancelled twice or the child is stuck in the
        # kernel: a short blocking wait beats leaving a zombie behind.
        time.sleep(0.01)
    loop = asyncio.get_running_loop()
    # Unregister before closing: the fd number may be reused at once.
    loop.remove_reader(child.read_fd)
    if not child.input_closed:
        loop.remove_writer(child.write_fd)
    child.close()


async def reap(child: Child, *, timeout_s: float) -> int | None:
    """Wait for the direct child to exit, polling (it is not asyncio's child)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while child.poll() is None:
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return child.returncode
