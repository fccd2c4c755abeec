"""Small helpers for structured concurrency: every task started is awaited."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from .clock import Clock


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until its cleanup has run.

    ``asyncio.wait`` does not re-raise the task's own ``CancelledError`` but does propagate a
    cancellation of the caller, so neither is swallowed. An error the task ended with (it may
    have failed just before it was cancelled, e.g. a worker's timeout racing the client's
    hang-up) is the caller's to drop: it is taken, so asyncio does not log it as "never
    retrieved" when the task is freed.
    """
    if not task.done():
        task.cancel()
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()


class Periodic:
    """``step()`` every ``interval`` seconds of ``clock``, in one task this object owns.

    The first step runs at once with ``immediately``, else after one interval; the next interval
    starts when a step ends, so steps never overlap. :meth:`aclose` cancels and awaits the task.
    """

    def __init__(
        self,
        step: Callable[[], Awaitable[object]],
        clock: Clock,
        interval: float,
        *,
        name: str,
        immediately: bool = False,
    ) -> None:
        if interval <= 0:
            raise ValueError("the interval must be positive")
        self._step = step
        self._clock = clock
        self.interval = interval
        self._name = name
        self._immediately = immediately
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def aclose(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def _run(self) -> None:
        if not self._immediately:
            await self._clock.sleep(self.interval)
        while True:
            await self._step()
            await self._clock.sleep(self.interval)
