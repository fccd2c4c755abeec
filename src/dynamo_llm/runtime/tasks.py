"""Small helpers for structured concurrency: every task started is awaited."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until its cleanup has run.

    ``asyncio.wait`` does not re-raise the task's own ``CancelledError`` but does propagate a
    cancellation of the caller, so neither is swallowed.
    """
    if not task.done():
        task.cancel()
    await asyncio.wait([task])
