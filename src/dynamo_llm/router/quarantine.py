"""Quarantine: taking a faulty worker out of rotation, and bringing it back (SPEC §8).

``report_down(worker, error)`` quarantines the worker only when the error's class says so
(``quarantines``: connect failures, dropped streams, a worker going silent); cancellations, 4xx
answers and overload never do. The worker then sits out an exponential back-off, 1 s doubling up
to 60 s, one step per consecutive failure. When the back-off expires (a timer on the injected
clock, no polling loop) the worker is not simply trusted again: a cheap active **probe**
supplied by the caller (a 1-token completion on the worker, see
:mod:`dynamo_llm.transport.probe`) decides. Success makes it available; failure puts it back
for the next, doubled back-off. A blanket timer would send real requests to a worker that is
still down, and each would fail.

An error whose class sets ``probes_worker`` (a 200 without an event stream) does not quarantine
by itself: the request failed, but the worker may be fine (llama_cpp.server answers an empty 200
to a prompt longer than its context, and every other request normally). The worker is probed at
once, staying available meanwhile, and quarantined only if that probe fails.

The failure streak is reset by a *request* that succeeds (``report_ok``), not by a passing
probe, so a worker that answers its health check but fails real requests (a flapping worker)
backs off further each time. A worker that stays available for ``backoff_max`` seconds starts
its next streak afresh.

Two pieces:

- :class:`Health` is one worker's place in that state machine (quarantined or not, probing,
  the streak and the next back-off). It is pure bookkeeping on clock times the caller passes in,
  changed only through its methods, and only by the :class:`Quarantine` watching the worker.
- :class:`Quarantine` runs the machine for a whole worker set: the back-off timers, the probe
  tasks and the ``worker_quarantined{worker}`` gauge. It knows a worker only by the small
  :class:`Quarantinable` shape (id, models, health), so it does not depend on the worker set.

The probes run in tasks the :class:`Quarantine` owns: :meth:`Quarantine.unwatch` (the worker
was removed) cancels its timer and probe, and :meth:`Quarantine.aclose` cancels every timer and
probe and awaits them. The probe must bound its own duration (the HTTP client's timeout); while
it runs the worker stays quarantined.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

from ..errors import DynamoError
from ..metrics import Metrics
from ..runtime.clock import Clock, TimerHandle

__all__ = [
    "DEFAULT_BACKOFF_INITIAL",
    "DEFAULT_BACKOFF_MAX",
    "Health",
    "Quarantinable",
    "Quarantine",
]

log = logging.getLogger("dynamo_llm.router")

DEFAULT_BACKOFF_INITIAL = 1.0
DEFAULT_BACKOFF_MAX = 60.0


class Health:
    """One worker's quarantine state. Changed through these methods by its Quarantine only."""

    __slots__ = (
        "_failures",
        "_next_backoff",
        "_probing",
        "_quarantined",
        "_quarantined_until",
        "_returned_at",
    )

    def __init__(self) -> None:
        self._quarantined = False
        self._probing = False
        self._failures = 0
        self._next_backoff = 0.0
        self._quarantined_until: float | None = None
        self._returned_at: float | None = None

    @property
    def quarantined(self) -> bool:
        return self._quarantined

    @property
    def probing(self) -> bool:
        """Whether the probe that decides the worker's return is running."""
        return self._probing

    @property
    def failures(self) -> int:
        """Consecutive failures: quarantines and failed probes since the last success."""
        return self._failures

    @property
    def quarantined_until(self) -> float | None:
        """When the current back-off expires (clock time), or None when not quarantined."""
        return self._quarantined_until

    @property
    def next_backoff(self) -> float:
        """The back-off the next failure will get."""
        return self._next_backoff

    def is_available_since(self, now: float, span: float) -> bool:
        """Whether the worker came back from quarantine at least ``span`` seconds ago."""
        return self._returned_at is not None and now - self._returned_at >= span

    def start_streak(self, backoff: float) -> None:
        """Forget past failures: the next one gets ``backoff``."""
        self._failures = 0
        self._next_backoff = backoff

    def enter(self, now: float, backoff_max: float) -> float:
        """Go into quarantine for the next back-off (doubling it, up to ``backoff_max``);
        returns the back-off."""
        backoff = self._next_backoff
        self._failures += 1
        self._next_backoff = min(backoff * 2, backoff_max)
        self._quarantined = True
        self._quarantined_until = now + backoff
        self._returned_at = None
        return backoff

    def begin_probe(self) -> None:
        self._probing = True

    def end_probe(self) -> None:
        self._probing = False

    def leave(self, now: float) -> None:
        """Back in rotation (the probe passed) at ``now``."""
        self._quarantined = False
        self._quarantined_until = None
        self._returned_at = now


class Quarantinable(Protocol):
    """What the quarantine needs of a worker."""

    @property
    def id(self) -> str: ...

    @property
    def models(self) -> frozenset[str]: ...

    @property
    def health(self) -> Health: ...


W = TypeVar("W", bound=Quarantinable)


class Quarantine(Generic[W]):
    """Back-off timers and probes for the workers it watches (one per worker set)."""

    def __init__(
        self,
        *,
        clock: Clock,
        probe: Callable[[W], Awaitable[bool]],
        on_change: Callable[[frozenset[str]], None],
        metrics: Metrics | None = None,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
    ) -> None:
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        self._clock = clock
        self._probe = probe
        self._on_change = on_change  # called with the models of a worker that left or returned
        self._metrics = metrics
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._watched: set[W] = set()
        self._timers: dict[W, TimerHandle] = {}
        self._probes: dict[W, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def watch(self, worker: W) -> None:
        """Start watching a newly registered worker: healthy, with a fresh streak."""
        self._watched.add(worker)
        worker.health.start_streak(self.backoff_initial)
        if self._metrics is not None:
            self._metrics.worker_quarantined.labels(worker.id).set(0)

    def unwatch(self, worker: W) -> None:
        """Stop watching a removed worker: its timer and probe are cancelled, its series dropped."""
        self._watched.discard(worker)
        timer = self._timers.pop(worker, None)
        if timer is not None:
            timer.cancel()
        self._cancel_probe(worker)
        if self._metrics is not None:
            self._metrics.worker_quarantined.remove(worker.id)

    def report_down(self, worker: W, error: BaseException) -> bool:
        """A request to the worker failed with ``error``; quarantine it if the error says so.

        Returns whether the worker entered quarantine now. Errors whose class does not set
        ``quarantines`` (cancellations, 4xx, overload, anything not a ``DynamoError``) and
        reports about a worker already quarantined change nothing, except that an error whose
        class sets ``probes_worker`` starts a probe of the worker at once (see the module doc).
        """
        if not isinstance(error, DynamoError):
            return False
        health = worker.health
        if not type(error).quarantines:
            if type(error).probes_worker and not health.quarantined and worker not in self._probes:
                log.warning(
                    "worker %s: %s (%s); probing it now", worker.id, error.message, error.code
                )
                self._start_probe(worker)
            return False
        if health.quarantined:
            return False
        # A probe already running (a suspicion's) is superseded by the back-off cycle.
        self._cancel_probe(worker)
        now = self._clock.now()
        if health.is_available_since(now, self.backoff_max):
            # Healthy for a long while: this failure starts a new streak.
            health.start_streak(self.backoff_initial)
        backoff = self._quarantine(worker, now)
        log.warning(
            "worker %s quarantined for %g s (%d failures in a row): %s",
            worker.id,
            backoff,
            health.failures,
            type(error).__name__,
        )
        self._on_change(worker.models)
        return True

    def report_ok(self, worker: W) -> None:
        """A request to the worker succeeded: its failure streak starts over."""
        if not worker.health.quarantined:
            worker.health.start_streak(self.backoff_initial)

    async def aclose(self) -> None:
        """Cancel every back-off timer and probe, and wait for the probes to finish."""
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        tasks = tuple(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            # wait() does not raise the tasks' cancellations but does propagate ours.
            await asyncio.wait(tasks)

    def _quarantine(self, worker: W, now: float) -> float:
        """Put the worker out for its next back-off and schedule the probe; returns the back-off."""
        backoff = worker.health.enter(now, self.backoff_max)
        if self._metrics is not None:
            self._metrics.worker_quarantined.labels(worker.id).set(1)
        if not self._closed:
            self._timers[worker] = self._clock.call_at(
                now + backoff, lambda: self._backoff_expired(worker)
            )
        return backoff

    def _backoff_expired(self, worker: W) -> None:
        self._timers.pop(worker, None)
        if self._closed or worker not in self._watched:
            return
        self._start_probe(worker)

    def _start_probe(self, worker: W) -> None:
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(
            self._probe_and_settle(worker), name=f"probe {worker.id}"
        )
        worker.health.begin_probe()
        self._probes[worker] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _cancel_probe(self, worker: W) -> None:
        task = self._probes.pop(worker, None)
        if task is not None:
            task.cancel()  # awaited by aclose() if still running then
            worker.health.end_probe()

    async def _probe_and_settle(self, worker: W) -> None:
        task = asyncio.current_task()
        try:
            ok = await self._probe(worker)
        except Exception as exc:  # a probe that raises has failed; CancelledError propagates
            log.warning("probe of worker %s raised %r", worker.id, exc)
            ok = False
        finally:
            if self._probes.get(worker) is task:
                del self._probes[worker]
                worker.health.end_probe()
        if self._closed or worker not in self._watched:
            return
        now = self._clock.now()
        if not worker.health.quarantined:
            # The probe of a suspicion (see report_down): only a failure changes anything.
            if ok:
                log.info("worker %s passed its probe and stays available", worker.id)
                return
            if worker.health.is_available_since(now, self.backoff_max):
                worker.health.start_streak(self.backoff_initial)
            backoff = self._quarantine(worker, now)
            log.warning(
                "worker %s failed its probe; quarantined for %g s (%d failures in a row)",
                worker.id,
                backoff,
                worker.health.failures,
            )
            self._on_change(worker.models)
            return
        if not ok:
            backoff = self._quarantine(worker, now)
            log.warning(
                "worker %s failed its probe; quarantined for another %g s", worker.id, backoff
            )
            return
        worker.health.leave(now)
        if self._metrics is not None:
            self._metrics.worker_quarantined.labels(worker.id).set(0)
        log.info("worker %s passed its probe and is available again", worker.id)
        self._on_change(worker.models)
