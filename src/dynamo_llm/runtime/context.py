"""The engine context: one per request, shared by every hop that works on it.

State only moves forward, ``LIVE -> STOPPED -> KILLED``:

- ``stop_generating()`` / ``stop()`` is graceful: the engine should stop producing, and items it
  already produced may still be delivered.
- ``kill()`` is hard: stop and do not drain.

Every control is idempotent; the first one records the :class:`StopReason`. A control first
propagates to the linked children, in the order they were linked, and then sets this context's
state, so by the time anyone sees the parent stopped, every child already is. Linking a child to
a parent that is already stopped or killed stops or kills the child at once (Dynamo's
``link_child`` does not, and its callers had to re-check).

Waiters (``await stopped()``, ``await killed()``) and callbacks (``on_stop``) are created only
when somebody asks, so a request that is never cancelled pays for none of them.

One signal goes the other way, up from a child to its parents: ``keep_alive()``, an engine
saying it is still working on the request although it produced nothing (the router moved it to
another worker). Time limits on silence watching the context (``on_keep_alive``) start over, so
the HTTP layer's safety net does not cut a request the router is busy saving.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable

from .ids import new_request_id


class StopReason(enum.StrEnum):
    CLIENT_DISCONNECT = "client_disconnect"
    INACTIVITY_TIMEOUT = "inactivity_timeout"
    DEADLINE = "deadline"
    SHUTDOWN = "shutdown"
    EXPLICIT = "explicit"


class ContextState(enum.IntEnum):
    LIVE = 0
    STOPPED = 1
    KILLED = 2


StopCallback = Callable[["EngineContext"], None]


class EngineContext:
    """Cancellation state of one request (or one sub-request), with linked children."""

    __slots__ = (
        "_callbacks",
        "_children",
        "_keep_alive_callbacks",
        "_killed_waiters",
        "_parent",
        "_stopped_waiters",
        "id",
        "reason",
        "state",
    )

    def __init__(self, request_id: str | None = None) -> None:
        self.id: str = request_id if request_id is not None else new_request_id()
        self.state = ContextState.LIVE
        self.reason: StopReason | None = None
        self._children: list[EngineContext] | None = None
        self._stopped_waiters: list[asyncio.Future[None]] | None = None
        self._killed_waiters: list[asyncio.Future[None]] | None = None
        self._callbacks: list[StopCallback] | None = None
        self._parent: EngineContext | None = None
        self._keep_alive_callbacks: list[Callable[[], None]] | None = None

    def __repr__(self) -> str:
        return f"EngineContext(id={self.id!r}, state={self.state.name}, reason={self.reason})"

    @property
    def is_stopped(self) -> bool:
        """True once stopped or killed."""
        return self.state is not ContextState.LIVE

    @property
    def is_killed(self) -> bool:
        return self.state is ContextState.KILLED

    def stop_generating(self, reason: StopReason = StopReason.EXPLICIT) -> None:
        """Graceful stop: produce no more, items already produced may still be delivered."""
        self._advance(ContextState.STOPPED, reason)

    def stop(self, reason: StopReason = StopReason.EXPLICIT) -> None:
        """Alias of :meth:`stop_generating`."""
        self._advance(ContextState.STOPPED, reason)

    def kill(self, reason: StopReason = StopReason.EXPLICIT) -> None:
        """Hard stop: stop and do not drain."""
        self._advance(ContextState.KILLED, reason)

    async def stopped(self) -> None:
        """Return once stopped or killed (at once if already)."""
        if self.state is ContextState.LIVE:
            fut = asyncio.get_running_loop().create_future()
            if self._stopped_waiters is None:
                self._stopped_waiters = []
            self._stopped_waiters.append(fut)
            await fut

    async def killed(self) -> None:
        """Return once killed (at once if already)."""
        if self.state is not ContextState.KILLED:
            fut = asyncio.get_running_loop().create_future()
            if self._killed_waiters is None:
                self._killed_waiters = []
            self._killed_waiters.append(fut)
            await fut

    def on_stop(self, callback: StopCallback) -> Callable[[], None]:
        """Call ``callback(ctx)`` synchronously each time the state moves forward.

        Called at once if the context is already stopped. Returns a function that unregisters it.
        """
        if self._callbacks is None:
            self._callbacks = []
        self._callbacks.append(callback)
        if self.state is not ContextState.LIVE:
            callback(self)

        def remove() -> None:
            if self._callbacks is not None and callback in self._callbacks:
                self._callbacks.remove(callback)

        return remove

    def keep_alive(self) -> None:
        """The engine is still working on the request though it produced nothing (it moved the
        request to another worker): tell whoever times this context's silence, and its parents'.
        """
        ctx: EngineContext | None = self
        while ctx is not None:
            ctx._fire_keep_alive()
            ctx = ctx._parent

    def hold(self) -> None:
        """The frontend holds the request's engine back on purpose (its client is not reading):
        tell whoever times the silence of this context or of any linked child, so that nobody
        takes the pause for a silent engine or worker."""
        pending: list[EngineContext] = [self]
        while pending:
            ctx = pending.pop()
            ctx._fire_keep_alive()
            if ctx._children:
                pending.extend(ctx._children)

    def _fire_keep_alive(self) -> None:
        if self._keep_alive_callbacks:
            for callback in list(self._keep_alive_callbacks):
                callback()

    def on_keep_alive(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` on every :meth:`keep_alive` of this context or of a linked child.
        Returns a function that unregisters it."""
        if self._keep_alive_callbacks is None:
            self._keep_alive_callbacks = []
        self._keep_alive_callbacks.append(callback)

        def remove() -> None:
            if self._keep_alive_callbacks is not None and callback in self._keep_alive_callbacks:
                self._keep_alive_callbacks.remove(callback)

        return remove

    def link_child(self, child: EngineContext) -> None:
        """Make ``child`` follow this context (stopped or killed at once if this one is)."""
        if self._children is None:
            self._children = []
        self._children.append(child)
        child._parent = self
        if self.state is ContextState.KILLED:
            child.kill(self.reason or StopReason.EXPLICIT)
        elif self.state is ContextState.STOPPED:
            child.stop(self.reason or StopReason.EXPLICIT)

    def unlink_child(self, child: EngineContext) -> None:
        """Forget a finished child so a long-lived parent does not accumulate them."""
        if self._children is not None:
            with contextlib.suppress(ValueError):
                self._children.remove(child)
        if child._parent is self:
            child._parent = None

    def _advance(self, target: ContextState, reason: StopReason) -> None:
        if self.state >= target:
            return
        for child in list(self._children or ()):
            child._advance(target, reason)
        if self.state >= target:  # a child's callback may have advanced us already
            return
        if self.reason is None:
            self.reason = reason
        self.state = target
        if self._stopped_waiters:
            waiters, self._stopped_waiters = self._stopped_waiters, None
            _wake(waiters)
        if target is ContextState.KILLED and self._killed_waiters:
            waiters, self._killed_waiters = self._killed_waiters, None
            _wake(waiters)
        if self._callbacks:
            for callback in list(self._callbacks):
                callback(self)


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for fut in waiters:
        if not fut.done():
            fut.set_result(None)
