"""Client-disconnect detection: the two-handle design (Dynamo's ``disconnect.rs``).

A request has two phases, and each has its own handle.

1. **Handler phase**: a unary request, and the part of a streaming request before the SSE body
   exists. The work runs in its own task; the handler awaits it holding the *connection handle*,
   which is created **armed**. If the client goes away while the handler waits, the handler
   releases the handle still armed: it reports "closed unexpectedly". When the work finishes
   normally the handler **disarms** it first, and its release reports "closed gracefully".
2. **Stream phase**: a streaming request once the SSE body exists. The *stream handle* is created
   **disabled** and armed by :func:`~dynamo_llm.http.stream.monitor_for_disconnects` when the body
   starts. It is disarmed when the source ends or fails (a backend error or a timeout is not a
   disconnect), so if the body is abandoned first, because the client went away, its release
   reports "closed unexpectedly".

The :class:`DisconnectMonitor` takes the reports in order, the connection handle's first, then the
stream handle's. On "closed unexpectedly" (or a handle dropped without a word) it logs a warning,
counts ``disconnected_clients`` and ``model_cancellation_total``, and **kills** the engine
context, so the engine learns of the hang-up at once. It acts at most once per request, so a
client that leaves in the instant between the two phases is still counted once. In Rust a
background task awaits two one-shot channels; here the handles call the monitor directly when
released, which costs nothing per request until something happens.

The stream phase itself, the pump and what ends it, is :mod:`~dynamo_llm.http.stream`.
"""

from __future__ import annotations

import enum
import logging

from ..errors import Cancelled, DynamoError, ResponseTimeout, ServerShuttingDown
from ..metrics import Metrics
from ..runtime.context import EngineContext, StopReason

log = logging.getLogger("dynamo_llm.http.disconnect")


class HandleStatus(enum.Enum):
    CLOSED_UNEXPECTEDLY = "closed_unexpectedly"
    CLOSED_GRACEFULLY = "closed_gracefully"
    DISABLED = "disabled"


class ConnectionHandle:
    """Reports its status to the monitor exactly once, when released (or collected)."""

    __slots__ = ("_monitor", "_released", "_slot", "status")

    def __init__(self, monitor: DisconnectMonitor, slot: int, status: HandleStatus) -> None:
        self._monitor = monitor
        self._slot = slot
        self._released = False
        self.status = status

    def arm(self) -> None:
        self.status = HandleStatus.CLOSED_UNEXPECTEDLY

    def disarm(self) -> None:
        self.status = HandleStatus.CLOSED_GRACEFULLY

    @property
    def is_armed(self) -> bool:
        return self.status is HandleStatus.CLOSED_UNEXPECTEDLY

    @property
    def is_released(self) -> bool:
        return self._released

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._monitor._receive(self._slot, self.status)

    def __del__(self) -> None:
        # A handle that vanished without a word counts as closed unexpectedly, like a dropped
        # one-shot sender in Dynamo. Normal code always releases explicitly.
        if not self._released:
            self._released = True
            self._monitor._receive(self._slot, HandleStatus.CLOSED_UNEXPECTEDLY)


class DisconnectMonitor:
    """Waits on the connection handle, then the stream handle; fires at most once."""

    __slots__ = (
        "_ctx",
        "_labels",
        "_metrics",
        "_pending",
        "_turn",
        "connection",
        "fired",
        "stream",
    )

    def __init__(
        self, ctx: EngineContext, metrics: Metrics, model: str, endpoint: str, request_type: str
    ) -> None:
        self._ctx = ctx
        self._metrics = metrics
        self._labels = (model, endpoint, request_type)
        self._turn = 0
        self._pending: list[HandleStatus | None] = [None, None]
        self.fired = False
        self.connection = ConnectionHandle(self, 0, HandleStatus.CLOSED_UNEXPECTEDLY)
        self.stream = ConnectionHandle(self, 1, HandleStatus.DISABLED)

    def _receive(self, slot: int, status: HandleStatus) -> None:
        self._pending[slot] = status
        while self._turn < 2:
            current = self._pending[self._turn]
            if current is None:
                return
            which = "Connection" if self._turn == 0 else "Stream"
            self._turn += 1
            if current is HandleStatus.CLOSED_UNEXPECTEDLY:
                self._fire(which)

    def _fire(self, which: str) -> None:
        if self.fired:
            return
        self.fired = True
        log.warning(
            "%s closed unexpectedly; issuing cancellation for request %s", which, self._ctx.id
        )
        self._metrics.disconnected_clients.labels().inc()
        self._metrics.model_cancellation_total.labels(*self._labels).inc()
        self._ctx.kill(StopReason.CLIENT_DISCONNECT)

    def release_all(self) -> None:
        """Release both handles in order (the handler's ``finally``)."""
        self.connection.release()
        self.stream.release()


def error_for_stop(reason: StopReason | None) -> DynamoError:
    """What a request stopped from elsewhere ends with."""
    if reason in (StopReason.INACTIVITY_TIMEOUT, StopReason.DEADLINE):
        return ResponseTimeout()
    if reason is StopReason.SHUTDOWN:
        return ServerShuttingDown()
    return Cancelled()
