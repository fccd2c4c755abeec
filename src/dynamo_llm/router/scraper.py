"""Engine-reported load: each worker's ``/metrics`` read at an interval, for every frontend alike.

A frontend counts only the requests it sent itself; several frontends in front of one pool
would each think a worker idle that the others keep busy. So every ``interval`` seconds the
:class:`LoadScraper` reads each available worker's own figures (``fetch``: a ``GET`` of its
``/metrics``, parsed by :mod:`dynamo_llm.transport.scrape`), all workers at once and one request
per worker per interval whatever the request rate, and hands them to the worker's load
(:meth:`~.slot.WorkerLoad.report`): the router modes and the busy threshold then see the
engine's running + queued requests plus what this frontend sent since the scrape.

It exposes what it read, ``worker_engine_running_requests``, ``worker_engine_queued_requests``
and ``worker_kv_usage`` (per worker, absent while a worker reports nothing), and counts failed
scrapes in ``worker_metrics_scrape_failures_total``. A worker whose scrape fails, whose metrics
carry no load figures, or that is quarantined falls back to the local in-flight count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from ..metrics import Metrics
from ..runtime.clock import Clock
from ..runtime.tasks import Periodic
from .membership import Worker, WorkerSet

__all__ = ["EngineReport", "LoadScraper"]

log = logging.getLogger("dynamo_llm.router")


class EngineReport(Protocol):
    """What an engine says of its load (``transport.scrape.EngineLoad`` is one)."""

    @property
    def running(self) -> float: ...

    @property
    def queued(self) -> float: ...

    @property
    def kv_usage(self) -> float | None: ...


Fetch = Callable[[Worker], Awaitable[EngineReport | None]]
"""A worker's report; None when its metrics carry no load; raises when the scrape fails."""


class LoadScraper:
    """Reads every available worker's load each ``interval`` seconds (see the module doc)."""

    def __init__(
        self,
        workers: WorkerSet,
        fetch: Fetch,
        clock: Clock,
        interval: float,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self._workers = workers
        self._fetch = fetch
        self._metrics = metrics
        self._failing: set[str] = set()
        self._periodic = Periodic(
            self.sweep, clock, interval, name="load scrapes", immediately=True
        )
        self.sweeps = 0

    def start(self) -> None:
        self._periodic.start()

    async def aclose(self) -> None:
        await self._periodic.aclose()

    async def sweep(self) -> None:
        """Scrape every worker once, concurrently."""
        workers = list(self._workers)
        await asyncio.gather(*(self._scrape(w) for w in workers))
        self.sweeps += 1

    async def _scrape(self, worker: Worker) -> None:
        if not worker.is_available:
            self._forget(worker)
            return
        failure: Exception | None = None
        try:
            report = await self._fetch(worker)
        except Exception as exc:  # unreachable, an error status, a timeout: count locally
            report, failure = None, exc
        if worker.id not in self._workers:
            return  # it left during the scrape
        if failure is not None:
            if self._metrics is not None:
                self._metrics.worker_metrics_scrape_failures_total.labels(worker.id).inc()
            if worker.id not in self._failing:
                self._failing.add(worker.id)
                log.warning(
                    "worker %s: cannot read its /metrics (%s); counting its load locally",
                    worker.id,
                    type(failure).__name__,
                )
            self._forget(worker)
            return
        if worker.id in self._failing:
            self._failing.discard(worker.id)
            log.info("worker %s: its /metrics answers again", worker.id)
        if report is None:
            self._forget(worker)
            return
        worker.load.report(report.running + report.queued)
        if self._metrics is not None:
            m = self._metrics
            m.worker_engine_running_requests.labels(worker.id).set(report.running)
            m.worker_engine_queued_requests.labels(worker.id).set(report.queued)
            if report.kv_usage is not None:
                m.worker_kv_usage.labels(worker.id).set(report.kv_usage)
            else:
                m.worker_kv_usage.remove(worker.id)

    def _forget(self, worker: Worker) -> None:
        worker.load.report(None)
        if self._metrics is not None:
            self._metrics.forget_engine_load(worker.id)
