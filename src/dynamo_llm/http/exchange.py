"""One request's lifecycle state, and the handler phase.

An :class:`Exchange` bundles what every phase of one inference request shares: the engine
context, the connection, the outcome record, the disconnect monitor, the watchdog, and a
:class:`Waker`. Everything that can end a phase early (the client hanging up, a time limit, the
context stopped from elsewhere) calls ``waker.wake()``. No task is started to watch for any of
these and nothing is polled.

The handler phase's work runs in the handler's own task, not in a task of its own (a task costs
its creation, a scheduling and a done-callback wake-up per request). While it runs, the waker
holds an :class:`Interrupt`: a wake-up schedules one look at the state (on the loop's next
turn, as a woken handler would have looked), and if that says the phase must end, the handler's
task is cancelled in place, at most once, as ``asyncio.timeout`` does it (``Task.cancel`` then
``uncancel``): the work unwinds where it is waiting, its cleanup runs, and the phase raises what
ended it. A cancellation from outside (the server's) is told apart by the task's cancel count and
propagates as before.

The stream phase's pump keeps a task of its own (:mod:`.stream`): it is resumed once per
item, and every resumption of a coroutine resumes each coroutine that awaits it, so in the
handler's task each item would pass through the server's whole chain of frames (granian's
watcher, the adapter, the router of routes, the handler, the stream phase): more per stream than
the task costs. The handler sleeps beside it on :meth:`Waker.wait`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from ..metrics import RequestRecord
from ..runtime.context import EngineContext
from ..runtime.watchdog import Watchdog
from .connection import Connection
from .disconnect import DisconnectMonitor, error_for_stop

__all__ = ["ClientGone", "Exchange", "Interrupt", "Waker"]

T = TypeVar("T")


class ClientGone(Exception):
    """The client went away; nothing more is written. Never reaches a client."""


class Interrupt:
    """Cancels the current task in place, at most once, when a look at the state (``decide``)
    says the phase it runs must end; ``decide`` returns what ends it (and does what must be done
    at that moment), or None.

    A wake-up only schedules the look (``loop.call_soon``): it then runs while the task is
    suspended, after every callback of the same event (a watchdog kills the context, then says
    it expired), even when the wake-up came from inside the task (its work stopped the context).
    """

    __slots__ = ("_cancelling", "_decide", "_scheduled", "_task", "active", "outcome")

    def __init__(self, decide: Callable[[], Exception | None]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._decide = decide
        self._cancelling = task.cancelling()
        self._scheduled = False
        self.active = True
        self.outcome: Exception | None = None

    def __call__(self) -> None:
        if not self._scheduled and self.outcome is None:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._look)

    def _look(self) -> None:
        self._scheduled = False
        if self.active and self.outcome is None:
            outcome = self._decide()
            if outcome is not None:
                self.outcome = outcome
                self._task.cancel()

    def end(self) -> bool:
        """Stop looking. True when this interrupt cancelled the task and nobody else did: the
        cancellation in flight, if any, is this one's to drop."""
        self.active = False
        if self.outcome is None:
            return False
        return self._task.uncancel() <= self._cancelling


class Waker:
    """Where the events that can end a phase are sent: while ``interrupt`` is set (the handler
    phase), ``wake()`` calls it; otherwise ``await wait()`` returns after the next ``wake()``
    (the stream phase, whose handler sleeps beside its pump)."""

    __slots__ = ("_fut", "interrupt")

    def __init__(self) -> None:
        self._fut: asyncio.Future[None] | None = None
        self.interrupt: Interrupt | None = None

    def wake(self, *_: Any) -> None:
        interrupt = self.interrupt
        if interrupt is not None:
            interrupt()
            return
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
    """Everything that can end a phase wakes it: it interrupts the handler phase's work, or
    wakes the stream phase's handler."""

    @property
    def request_id(self) -> str:
        """The request id (the client's ``X-Request-Id``, or a fresh one), sent back in
        ``X-Request-Id`` with every answer."""
        return self.ctx.id

    async def run_interruptible(
        self, work: Coroutine[Any, Any, T], decide: Callable[[], Exception | None]
    ) -> tuple[T | None, Exception | None]:
        """Run ``work`` in this task until it ends or ``decide`` (see :class:`Interrupt`) ends it.

        Returns the work's result and None, or None and what ended it (the work's own end, or
        its error, is then dropped, as the cleanup of a cancelled task's would be). ``decide`` is
        also asked once before the work starts; the work is not started if it says stop. The
        work's own error propagates; so does a cancellation from outside.
        """
        outcome = decide()
        if outcome is not None:
            work.close()
            return None, outcome
        interrupt = Interrupt(decide)
        waker = self.waker
        waker.interrupt = interrupt
        try:
            result = await work
        except BaseException:
            waker.interrupt = None
            if interrupt.end():
                return None, interrupt.outcome
            raise
        waker.interrupt = None
        if interrupt.end():
            return None, interrupt.outcome  # it swallowed the cancellation: what ended it stands
        return result, None

    async def handler_phase(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` holding the armed connection handle (SPEC §3, phase 1).

        Returns the work's result (or raises its error) once it finishes. If the client goes
        away first, the handle is released armed (the monitor kills the context and counts the
        disconnect), the work is cancelled where it waits, and :class:`ClientGone` is raised. A
        time limit or a stop from elsewhere ends the work the same way but raises the matching
        error. Cancelled from outside, the work is cancelled with it and the handle left armed.
        """
        handle = self.monitor.connection
        try:
            result, ended = await self.run_interruptible(work, self._handler_phase_ended)
        except Exception:  # the work's error (a cancellation from outside leaves it armed)
            handle.disarm()
            handle.release()
            raise
        if ended is not None:
            raise ended
        handle.disarm()
        handle.release()
        return result  # type: ignore[return-value]  # None only with ``ended``

    def _handler_phase_ended(self) -> Exception | None:
        handle = self.monitor.connection
        if self.conn.is_disconnected:
            handle.release()  # still armed: the monitor kills the context and counts it
            self.record.mark_error("cancelled")
            return ClientGone()
        if self.watchdog.expired is not None or self.ctx.is_stopped:
            error = self.watchdog.expired or error_for_stop(self.ctx.reason)
            handle.disarm()
            handle.release()
            return error
        return None
