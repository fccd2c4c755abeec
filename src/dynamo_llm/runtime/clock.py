"""Injected time.

Everything that waits or measures time (the mocker's scheduler, timeouts, latency metrics) takes
a :class:`Clock`, so tests can run in simulated time with :class:`FakeClock`.

A clock offers three things: ``now()`` (monotonic seconds), ``await sleep(seconds)`` and
``call_at(when, callback)``, a one-shot timer whose handle can be cancelled. Timers are what the
request path uses (an inactivity window is one timer per request, not a task per item).

:class:`FakeClock` never moves on its own. ``await clock.advance(dt)`` moves it forward, firing
every timer that falls due in order and letting the woken tasks run before the next one fires;
``clock.autojump()`` starts a background task that jumps to the next timer whenever the event
loop has nothing else to do (trio's ``MockClock(autojump_threshold=0)``), which makes a whole
simulated load run finish at once and exactly.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Protocol

_monotonic = time.monotonic


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic time, sleeping and one-shot timers."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle: ...


class SystemClock:
    """The event loop's monotonic clock.

    ``now()`` is ``time.monotonic()``, which is what asyncio's own loops measure time with, so
    ``call_at(now() + d)`` fires after ``d`` seconds. It is read on every token: going through
    ``asyncio.get_running_loop().time()`` would cost a ``getpid()`` system call each time on
    Python 3.11 (the running-loop check guards against forks). ``now`` is the builtin itself,
    not a method that calls it: one Python-level call per reading instead of two.
    """

    __slots__ = ()

    now = staticmethod(_monotonic)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        return asyncio.get_running_loop().call_at(when, callback)


class _FakeTimer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Simulated time for tests: it only moves when told to (or when autojumping)."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._timers: list[tuple[float, int, _FakeTimer]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        timer = _FakeTimer(when, callback)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        timer = self.call_at(self._now + seconds, wake)
        try:
            await fut
        finally:
            timer.cancel()

    def next_deadline(self) -> float | None:
        """When the earliest pending timer is due, or None."""
        self._drop_cancelled()
        return self._timers[0][0] if self._timers else None

    def pending_timers(self) -> int:
        self._drop_cancelled()
        return sum(1 for _, _, t in self._timers if not t.cancelled)

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, firing due timers in order and settling after each."""
        target = self._now + seconds
        await settle()
        while True:
            self._drop_cancelled()
            if not self._timers or self._timers[0][0] > target:
                break
            when, _, timer = heapq.heappop(self._timers)
            self._now = max(self._now, when)
            timer.callback()
            await settle()
        self._now = max(self._now, target)
        await settle()

    @asynccontextmanager
    async def autojump(self) -> AsyncIterator[None]:
        """Jump to the next timer whenever the event loop is idle, for the duration of the block."""
        task = asyncio.create_task(self._autojump_loop())
        try:
            yield
        finally:
            task.cancel()
            # wait() does not re-raise the task's own cancellation, but does propagate ours.
            await asyncio.wait([task])

    async def _autojump_loop(self) -> None:
        while True:
            await settle()
            deadline = self.next_deadline()
            if deadline is None:
                # Nothing scheduled in simulated time: let real I/O or new work happen.
                await asyncio.sleep(0.001)
                continue
            await self.advance(max(0.0, deadline - self._now))

    def _drop_cancelled(self) -> None:
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)


async def settle(max_rounds: int = 10_000) -> None:
    """Yield to the event loop until no other callback is ready to run.

    Uses the loop's ready queue where the loop exposes it (CPython's selector loops do); elsewhere
    it yields a fixed number of times.
    """
    loop = asyncio.get_running_loop()
    ready = getattr(loop, "_ready", None)
    if ready is None:
        for _ in range(100):
            await asyncio.sleep(0)
        return
    quiet = 0
    for _ in range(max_rounds):
        await asyncio.sleep(0)
        if len(ready) == 0:
            quiet += 1
            if quiet >= 2:
                return
        else:
            quiet = 0
