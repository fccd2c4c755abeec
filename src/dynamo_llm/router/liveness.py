"""Idle checks: a worker nobody is using is asked, now and then, whether it is still there.

A worker's faults are normally found by the requests sent to it (SPEC §8.2). A worker that dies
while idle (SIGKILL, a crashed host) would stay *free* until the next request found the refused
connection. So every ``interval`` seconds the :class:`IdleChecker` checks each worker that is
available with nothing in flight (``check``: the caller's cheap reachability test, a
``GET /v1/models``), all at once; one that cannot be connected to is reported down with that
error, which quarantines it, and from then on the quarantine's back-off and generation probe
decide its return as for any other fault. Workers in flight or already quarantined are left
alone: their requests and their probes already say how they are.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ..errors import DynamoError
from ..runtime.clock import Clock
from ..runtime.tasks import Periodic
from .membership import Worker, WorkerSet

__all__ = ["IdleChecker"]

log = logging.getLogger("dynamo_llm.router")

Check = Callable[[Worker], Awaitable[DynamoError | None]]
"""The worker's reachability: the error that says it is gone, or None."""


class IdleChecker:
    """Checks the idle workers of a set every ``interval`` seconds (see the module doc)."""

    def __init__(self, workers: WorkerSet, check: Check, clock: Clock, interval: float) -> None:
        self._workers = workers
        self._check = check
        self._periodic = Periodic(self.sweep, clock, interval, name="idle checks")

    def start(self) -> None:
        self._periodic.start()

    async def aclose(self) -> None:
        await self._periodic.aclose()

    async def sweep(self) -> int:
        """Check every idle worker once; returns how many were reported down."""
        idle = [w for w in self._workers if w.is_available and w.inflight == 0]
        if not idle:
            return 0
        results = await asyncio.gather(*(self._safe_check(w) for w in idle))
        down = 0
        for worker, error in zip(idle, results, strict=True):
            # A worker that took a request meanwhile is judged by that request instead.
            if error is None or worker.inflight or worker.id not in self._workers:
                continue
            log.warning("idle worker %s is unreachable: %s", worker.id, error.message)
            if self._workers.report_down(worker.id, error):
                down += 1
        return down

    async def _safe_check(self, worker: Worker) -> DynamoError | None:
        try:
            return await self._check(worker)
        except Exception as exc:  # a broken check says nothing about the worker
            log.debug("idle check of %s raised %r", worker.id, exc)
            return None
