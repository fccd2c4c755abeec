"""In-flight accounting: a worker's load, and the slot a request holds on it.

**The count has one owner.** A :class:`WorkerLoad` is a worker's in-flight request count and
the KV blocks of those requests (the load term of ``kv`` routing). Only :meth:`WorkerLoad.take`
raises them, and it hands back an :class:`InflightSlot`, the only thing that can lower them
again: the slot gives its share back exactly once when it is released, however many times
``release()`` is called (or the ``with`` block it guards ends), and whether or not the worker
was removed from its set meanwhile. Nothing else changes the count, so it cannot leak (every
manual "+1 here, -1 in three places" design leaked).

The gauge ``worker_inflight_requests{worker}`` is set from the count itself on every change
while one is attached (a worker removed from its set has none, so a late release does not
resurrect its series).

**The load the router balances on** (:attr:`WorkerLoad.load`) is the engine's own figure when
one is known: the requests it reported running and queued at the last scrape of its
``/metrics`` (:meth:`WorkerLoad.report`, from every frontend in front of it), plus the requests
this frontend sent it since then, so that two frontends do not both pile onto the worker that
was least loaded a second ago. Without a report (no metrics, a failed scrape) it is the local
in-flight count.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Generic, TypeVar

from ..metrics import GaugeChild

__all__ = ["InflightSlot", "WorkerLoad"]

W = TypeVar("W")


class InflightSlot(Generic[W]):
    """One request's hold on a worker: taken by ``WorkerLoad.take``, given back once."""

    __slots__ = ("_give_back", "_released", "blocks", "worker")

    def __init__(self, worker: W, blocks: int, give_back: Callable[[int], None]) -> None:
        self.worker = worker
        self.blocks = blocks
        self._give_back = give_back
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the slot back. Idempotent; harmless after the worker was removed."""
        if self._released:
            return
        self._released = True
        self._give_back(self.blocks)

    def __enter__(self) -> InflightSlot[W]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class WorkerLoad:
    """A worker's requests in flight and their KV blocks; changed only through its slots."""

    __slots__ = ("_active_blocks", "_done", "_gauge", "_inflight", "_reported", "_sent")

    def __init__(self) -> None:
        self._inflight = 0
        self._active_blocks = 0
        self._gauge: GaugeChild | None = None
        self._reported: float | None = None
        self._sent = 0
        self._done = 0  # requests of ours that ended since the report

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def active_blocks(self) -> int:
        """KV blocks of the requests in flight (the ``kv`` mode's load)."""
        return self._active_blocks

    @property
    def reported(self) -> float | None:
        """The requests the engine reported holding at its last scrape (None: no report)."""
        return self._reported

    @property
    def load(self) -> float:
        """The engine-reported requests, plus those sent since, minus those of ours that ended
        since (the report counted them, or they were sent after it); never less than what this
        frontend has in flight. Without a report: the in-flight count."""
        if self._reported is None:
            return float(self._inflight)
        return max(self._reported + self._sent - self._done, float(self._inflight))

    def report(self, requests: float | None) -> None:
        """The engine now holds ``requests`` (running + queued); None: no figure, count locally."""
        self._reported = requests
        self._sent = 0
        self._done = 0

    def attach_gauge(self, gauge: GaugeChild | None) -> None:
        """Report the count to ``gauge`` from now on (None: stop reporting)."""
        self._gauge = gauge
        if gauge is not None:
            gauge.set(self._inflight)

    def take(self, worker: W, blocks: int) -> InflightSlot[W]:
        """Count one more request (of ``blocks`` KV blocks) until the slot is released."""
        self._inflight += 1
        self._sent += 1
        self._active_blocks += blocks
        self._publish()
        return InflightSlot(worker, blocks, self._give_back)

    def _give_back(self, blocks: int) -> None:
        self._inflight -= 1
        self._done += 1
        self._active_blocks -= blocks
        self._publish()

    def _publish(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self._inflight)
