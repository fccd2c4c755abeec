"""Time limits on a stream of items (SPEC §4), for a request or for one attempt.

The HTTP layer watches each request (inactivity window ``2 x DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS``)
and the router watches each attempt on a worker (the raw value, so it fires first and the worker
is quarantined). Three limits, each optional (SPEC §4):

- **first token**: the wait for the first item, from dispatch, is bounded by
  ``DYN_HTTP_FIRST_TOKEN_TIMEOUT_SECS``. That wait is the engine's queue and prefill, which for a
  long prompt legitimately lasts longer than any pause between two tokens, so while it runs the
  inactivity limit does not apply; with no first-token limit set, the inactivity limit bounds it
  instead (a worker that never answers is caught either way).
- **inactivity**: no item for the window, between items. The window restarts on every item, so a
  slow but live stream is never cut.
- **deadline**: the whole request exceeds ``DYN_HTTP_REQUEST_TIMEOUT_SECS``.

A ``keep_alive()`` of the context (the router moved the request to another worker, SPEC §9)
starts a new wait for a first item (the deadline goes on): the next item is the replay's first,
after the new worker's prefill of the prompt *and everything generated so far*, and the new
attempt's own timer watches it with the same rule. Without it the HTTP layer's net (twice the
router's limits, measured from the last item) would fire about when the new attempt's own limit
does, or before it (the inactivity net, while the replay's first token is allowed the first-token
limit), and could cut a request the router was about to save.

One clock timer serves all three. An item only records the time (``touch()``); the timer, when it
fires, checks whether the silence is real and otherwise re-arms itself for the next possible
expiry (while a first item is awaited, at most one inactivity window ahead: the item may come at
any moment and start that window). So a 100-token stream costs one timer, not a hundred. On
expiry the watchdog kills the context with the matching reason and calls ``on_expire`` (the HTTP
handler's waker). The error it records is an instance of ``error`` (``ResponseTimeout``, or the
router's ``WorkerResponseTimeout``, which quarantines the worker).
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ResponseTimeout
from .clock import Clock, TimerHandle
from .context import EngineContext, StopReason

_NEVER = float("-inf")


class Watchdog:
    __slots__ = (
        "_clock",
        "_ctx",
        "_deadline",
        "_error",
        "_first_token",
        "_inactivity",
        "_on_expire",
        "_remove_keep_alive",
        "_started",
        "_timer",
        "_waiting_since",
        "clock",
        "expired",
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
        self._waiting_since = 0.0  # when the current wait for a first item began
        self._remove_keep_alive: Callable[[], None] | None = None
        self.last_item = _NEVER
        """When the last item arrived; before ``_waiting_since``: none since the wait began.
        Set by :meth:`touch`, or directly on a per-token path."""
        self.expired: ResponseTimeout | None = None

    def start(self) -> None:
        """Start the clocks (at dispatch): the wait for the first item begins."""
        self._started = self._waiting_since = self._clock.now()
        if self._inactivity or self._first_token:
            self._remove_keep_alive = self._ctx.on_keep_alive(self._keep_alive)
        self._arm()

    def touch(self, now: float | None = None) -> None:
        """An item arrived (at ``now``, when the caller already read the clock)."""
        self.last_item = self._clock.now() if now is None else now

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._remove_keep_alive is not None:
            self._remove_keep_alive()
            self._remove_keep_alive = None

    def _keep_alive(self) -> None:
        if self.expired is not None:
            return
        self._waiting_since = self._clock.now()
        self.last_item = _NEVER
        # The wait may end sooner than the timer armed for the old one (a first-token limit
        # shorter than the inactivity window): armed anew.
        if self._timer is not None:
            self._timer.cancel()
        self._arm()

    @property
    def _is_waiting(self) -> bool:
        """No item since the wait for a first one began (at dispatch, or at a keep-alive)."""
        return self.last_item < self._waiting_since

    def _silence_expiry(self) -> float | None:
        """When the current silence becomes too long (None: never): the wait for a first item
        gets the first-token limit (the inactivity window when there is none), the pause after
        an item the inactivity window."""
        if self._is_waiting:
            limit = self._first_token or self._inactivity
            return None if not limit else self._waiting_since + limit
        return None if not self._inactivity else self.last_item + self._inactivity

    def _next_expiry(self) -> float | None:
        candidates = []
        silence = self._silence_expiry()
        if silence is not None:
            candidates.append(silence)
        if self._deadline:
            candidates.append(self._started + self._deadline)
        return min(candidates) if candidates else None

    def _arm(self) -> None:
        when = self._next_expiry()
        if self._inactivity and self._is_waiting:
            # An item may end the wait at any moment, and the pause after it may end before the
            # wait would have: look again one inactivity window from now at the latest.
            check = self._clock.now() + self._inactivity
            when = check if when is None else min(when, check)
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
        elif (silence := self._silence_expiry()) is not None and now >= silence:
            if self._is_waiting and self._first_token:
                error = self._error(f"No response from the engine within {self._first_token:g} s")
            else:
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
