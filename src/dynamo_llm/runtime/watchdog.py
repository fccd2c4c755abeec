"""Time limits on a stream of items (SPEC §4), for a request or for one attempt.

The HTTP layer watches each request (inactivity window ``2 x DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS``)
and the router watches each attempt on a worker (the raw value, so it fires first and the worker
is quarantined). Three limits, each optional:

- **inactivity**: no item for the window. The window restarts on every item, so a slow but live
  stream is never cut.
- **first token**: no item within ``DYN_HTTP_FIRST_TOKEN_TIMEOUT_SECS`` of dispatch.
- **deadline**: the whole request exceeds ``DYN_HTTP_REQUEST_TIMEOUT_SECS``.

A ``keep_alive()`` of the context (the router moved the request to another worker, SPEC §9)
restarts the inactivity and first-token windows but not the deadline: the engine is working on
the request, and its own per-attempt timer watches the new attempt. Without it the HTTP layer's
net (twice the router's limit, measured from the last item) would fire about when the new
attempt's own limit does, and could cut a request the router was about to save.

One clock timer serves all three. An item only records the time (``touch()``); the timer, when it
fires, checks whether the silence is real and otherwise re-arms itself for the next possible
expiry. So a 100-token stream costs one timer, not a hundred. On expiry the watchdog kills the
context with the matching reason and calls ``on_expire`` (the HTTP handler's waker). The error
it records is an instance of ``error`` (``ResponseTimeout``, or the router's
``WorkerResponseTimeout``, which quarantines the worker).
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ResponseTimeout
from .clock import Clock, TimerHandle
from .context import EngineContext, StopReason


class Watchdog:
    __slots__ = (
        "_clock",
        "_ctx",
        "_deadline",
        "_error",
        "_first_token",
        "_first_token_from",
        "_inactivity",
        "_on_expire",
        "_remove_keep_alive",
        "_started",
        "_timer",
        "clock",
        "expired",
        "got_item",
        "last_item",
    )

    def __init__(
        self,
        clock: Clock,
        ctx: EngineContext,
        *,
        inactivity: float | None,
        first_token: float | None,
        deadline: float | None,
        on_expire: Callable[[], None] | None = None,
        error: type[ResponseTimeout] = ResponseTimeout,
    ) -> None:
        self._clock = clock
        self.clock = clock
        self._error = error
        self._ctx = ctx
        self._inactivity = inactivity
        self._first_token = first_token
        self._deadline = deadline
        self._on_expire = on_expire
        self._timer: TimerHandle | None = None
        self._started = 0.0
        self._first_token_from = 0.0
        self._remove_keep_alive: Callable[[], None] | None = None
        self.last_item = 0.0
        self.got_item = False
        self.expired: ResponseTimeout | None = None

    def start(self) -> None:
        """Start the clocks (at dispatch)."""
        self._started = self._first_token_from = self.last_item = self._clock.now()
        if self._inactivity or self._first_token:
            self._remove_keep_alive = self._ctx.on_keep_alive(self._keep_alive)
        self._arm()

    def touch(self, now: float | None = None) -> None:
        """An item arrived (at ``now``, when the caller already read the clock)."""
        self.last_item = self._clock.now() if now is None else now
        self.got_item = True

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._remove_keep_alive is not None:
            self._remove_keep_alive()
            self._remove_keep_alive = None

    def _keep_alive(self) -> None:
        # The timer already armed fires early, finds no real silence and re-arms itself.
        now = self._clock.now()
        self.last_item = now
        if not self.got_item:
            self._first_token_from = now

    def _next_expiry(self) -> float | None:
        candidates = []
        if self._inactivity:
            candidates.append(self.last_item + self._inactivity)
        if self._first_token and not self.got_item:
            candidates.append(self._first_token_from + self._first_token)
        if self._deadline:
            candidates.append(self._started + self._deadline)
        return min(candidates) if candidates else None

    def _arm(self) -> None:
        when = self._next_expiry()
        self._timer = None if when is None else self._clock.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self.expired is not None:
            return
        now = self._clock.now()
        error: ResponseTimeout | None = None
        reason = StopReason.INACTIVITY_TIMEOUT
        if self._deadline and now >= self._started + self._deadline:
            error = self._error(
                f"Request exceeded the time limit of {self._deadline:g} s", code="deadline_exceeded"
            )
            reason = StopReason.DEADLINE
        elif (
            self._first_token
            and not self.got_item
            and now >= self._first_token_from + self._first_token
        ):
            error = self._error(f"No response from the engine within {self._first_token:g} s")
        elif self._inactivity and now >= self.last_item + self._inactivity:
            error = self._error(
                f"The engine sent nothing for {self._inactivity:g} s; the request was stopped"
            )
        if error is None:
            self._arm()
            return
        self.expired = error
        self._ctx.kill(reason)
        if self._on_expire is not None:
            self._on_expire()
