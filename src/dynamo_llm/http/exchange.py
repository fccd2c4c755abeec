"""One request's lifecycle state, and the handler phase.

An :class:`Exchange` bundles what every phase of one inference request shares: the engine
context, the connection, the outcome record, the disconnect monitor, the watchdog, and a
:class:`Waker`, the single future the handler sleeps on. Everything that can end a phase early
(the work finishing, the client hanging up, a time limit, the context stopped from elsewhere)
calls ``waker.wake()``; the handler then looks at the state and decides, in a fixed order. No
task is started to watch for any of these and nothing is polled.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, TypeVar

from ..metrics import RequestRecord
from ..runtime.context import EngineContext
from ..runtime.tasks import cancel_and_wait
from ..runtime.watchdog import Watchdog
from .connection import Connection
from .disconnect import DisconnectMonitor, error_for_stop

__all__ = ["ClientGone", "Exchange", "Waker"]

T = TypeVar("T")


class ClientGone(Exception):
    """The client went away; nothing more is written. Never reaches a client."""


class Waker:
    """A reusable wake-up: ``await wait()`` returns after the next ``wake()``."""

    __slots__ = ("_fut",)

    def __init__(self) -> None:
        self._fut: asyncio.Future[None] | None = None

    def wake(self, *_: Any) -> None:
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def wait(self) -> None:
        self._fut = asyncio.get_running_loop().create_future()
        try:
            await self._fut
        finally:
            self._fut = None


@dataclass(slots=True, eq=False, kw_only=True)
class Exchange:
    """What the phases of one admitted inference request share (see the module docstring)."""

    ctx: EngineContext
    """The request's engine context: stopping or killing it reaches every engine serving the
    request; its id is the request id."""

    conn: Connection
    """The client's connection: where the answer goes, and what says the client went away."""

    record: RequestRecord
    """The outcome record (counters, gauges, latencies); marked as the request ends, released
    by the handler's ``finally``."""

    monitor: DisconnectMonitor
    """The disconnect monitor and its two handles (connection, then stream)."""

    watchdog: Watchdog
    """Every time limit of the request (inactivity, first token, deadline), on one timer."""

    waker: Waker
    """The one future the handler sleeps on; everything that can end a phase wakes it."""

    @property
    def request_id(self) -> str:
        """The request id (the client's ``X-Request-Id``, or a fresh one), sent back in
        ``X-Request-Id`` with every answer."""
        return self.ctx.id

    async def handler_phase(self, work: asyncio.Task[T]) -> T:
        """Await ``work`` holding the armed connection handle (SPEC §3, phase 1).

        Returns the work's result (or raises its error) once it finishes. If the client goes
        away first, the handle is released armed (the monitor kills the context and counts the
        disconnect), the work is cancelled and awaited, and :class:`ClientGone` is raised. A time
        limit or a stop from elsewhere ends the work the same way but raises the matching error.
        """
        handle = self.monitor.connection
        waker = self.waker
        work.add_done_callback(waker.wake)
        try:
            while True:
                if work.done():
                    handle.disarm()
                    handle.release()
                    return work.result()
                if self.conn.is_disconnected:
                    handle.release()  # still armed: the monitor fires
                    self.record.mark_error("cancelled")
                    await cancel_and_wait(work)
                    raise ClientGone
                if self.watchdog.expired is not None or self.ctx.is_stopped:
                    error = self.watchdog.expired or error_for_stop(self.ctx.reason)
                    handle.disarm()
                    handle.release()
                    await cancel_and_wait(work)
                    raise error
                await waker.wait()
        finally:
            work.remove_done_callback(waker.wake)
            if not work.done():  # we are being cancelled ourselves: take the work with us
                work.cancel()
                await asyncio.wait([work])
