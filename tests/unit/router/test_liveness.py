"""Idle checks on a fake clock with a scripted reachability check."""

from __future__ import annotations

from dynamo_llm.errors import DynamoError, WorkerUnreachable
from dynamo_llm.router import Worker, WorkerSet
from dynamo_llm.router.liveness import IdleChecker
from dynamo_llm.runtime import FakeClock
from tests.helpers import registered
from tests.unit.router.helpers import MODEL, probe_ok


def setup(*urls: str) -> tuple[FakeClock, WorkerSet, list[str], set[str], IdleChecker]:
    clock = FakeClock()
    workers = WorkerSet(clock=clock, probe=probe_ok)
    for url in urls:
        workers.add(Worker(url, [MODEL]))
    checked: list[str] = []
    dead: set[str] = set()

    async def check(worker: Worker) -> DynamoError | None:
        checked.append(worker.id)
        return WorkerUnreachable("connection refused") if worker.id in dead else None

    return clock, workers, checked, dead, IdleChecker(workers, check, clock, 2.0)


async def test_a_dead_idle_worker_leaves_the_free_set_at_the_next_check() -> None:
    clock, workers, checked, dead, checker = setup("http://a", "http://b")
    checker.start()
    try:
        dead.add("http://a")
        await clock.advance(1.9)
        assert checked == [] and registered(workers, "http://a").is_free
        await clock.advance(0.1)
        assert sorted(checked) == ["http://a", "http://b"]
        assert registered(workers, "http://a").quarantined
        assert registered(workers, "http://b").is_free
        # Quarantined now: its return is the quarantine probe's business, not the idle check's.
        checked.clear()
        dead.clear()
        await clock.advance(0.5)
        assert checked == []
    finally:
        await checker.aclose()
        await workers.aclose()


async def test_workers_in_flight_are_not_checked() -> None:
    _clock, workers, checked, dead, checker = setup("http://a", "http://b")
    dead.update({"http://a", "http://b"})
    with workers.acquire("http://a"):
        assert await checker.sweep() == 1
    assert checked == ["http://b"]
    assert not registered(workers, "http://a").quarantined
    await workers.aclose()
