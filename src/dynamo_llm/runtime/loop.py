"""The process's event loop: uvloop (libuv, in C) unless asyncio's own is asked for.

Every frontend process runs one loop for its server, app and engines, and most of a relayed
request's fixed cost is that loop's work: tasks, futures, handles, the selector, socket reads
and writes. uvloop does that work in C; asyncio's pure-Python loop stays available
(``--event-loop asyncio``) for debugging and as the baseline the benchmarks compare against.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")

LOOPS = ("uvloop", "asyncio")
"""The event loops a process can run, the default first."""


def run(main: Coroutine[Any, Any, T], loop: str = LOOPS[0]) -> T:
    """``asyncio.run(main)`` on the named loop (one of :data:`LOOPS`)."""
    if loop == "uvloop":
        return uvloop.run(main)
    if loop == "asyncio":
        return asyncio.run(main)
    raise ValueError(f"event loop must be one of {LOOPS}, not {loop!r}")
