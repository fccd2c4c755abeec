"""Engine-reported load: the scraper's reports, the load the policies see, the fallbacks."""

from __future__ import annotations

import random

from dynamo_llm.errors import WorkerUnreachable
from dynamo_llm.metrics import Metrics
from dynamo_llm.router import RoutingPolicy, Worker, WorkerSet
from dynamo_llm.router.policies import RouterMode, WorkerView, kv_scores
from dynamo_llm.router.scraper import EngineReport, LoadScraper
from dynamo_llm.runtime import FakeClock
from dynamo_llm.transport.scrape import EngineLoad
from tests.helpers import registered
from tests.unit.router.helpers import MODEL, probe_ok

A, B = "http://a", "http://b"


class Engines:
    """Scripted ``/metrics`` per worker: a load, None (no figures) or an exception."""

    def __init__(self) -> None:
        self.answers: dict[str, EngineLoad | Exception | None] = {}
        self.scrapes: list[str] = []

    async def fetch(self, worker: Worker) -> EngineReport | None:
        self.scrapes.append(worker.id)
        answer = self.answers.get(worker.id)
        if isinstance(answer, Exception):
            raise answer
        return answer


def setup(
    max_inflight: int | None = None,
) -> tuple[FakeClock, Metrics, WorkerSet, Engines, LoadScraper]:
    clock, metrics = FakeClock(), Metrics()
    workers = WorkerSet(clock=clock, probe=probe_ok, metrics=metrics, max_inflight=max_inflight)
    for url in (A, B):
        workers.add(Worker(url, [MODEL]))
    engines = Engines()
    return (
        clock,
        metrics,
        workers,
        engines,
        LoadScraper(workers, engines.fetch, clock, 1.0, metrics=metrics),
    )


def load(running: float, queued: float, kv: float | None = None) -> EngineLoad:
    return EngineLoad(running, queued, kv, 0.0)


def value(metrics: Metrics, name: str, worker: str) -> float | None:
    return metrics.registry.get_sample_value(f"{metrics.prefix}_{name}", {"worker": worker})


async def test_least_loaded_follows_the_engines_own_queue_not_the_local_count() -> None:
    _clock, metrics, workers, engines, scraper = setup()
    engines.answers = {A: load(3, 5, 0.5), B: load(1, 0)}  # another frontend keeps A busy
    await scraper.sweep()
    policy = RoutingPolicy(RouterMode.LEAST_LOADED, rng=random.Random(0))
    assert workers.select(MODEL, policy).id == B
    assert value(metrics, "worker_engine_queued_requests", A) == 5
    assert value(metrics, "worker_engine_running_requests", A) == 3
    assert value(metrics, "worker_kv_usage", A) == 0.5
    assert value(metrics, "worker_kv_usage", B) is None  # it reported none
    # What this frontend sent since the scrape counts too: after 8 more on B, A is lighter.
    slots = [workers.acquire(B) for _ in range(8)]
    assert registered(workers, B).load.load == 9
    assert workers.select(MODEL, policy).id == A
    for slot in slots:
        slot.release()


async def test_the_busy_threshold_uses_the_reported_load() -> None:
    _clock, _metrics, workers, engines, scraper = setup(max_inflight=4)
    engines.answers = {A: load(2, 2), B: load(0, 0)}
    await scraper.sweep()
    assert not registered(workers, A).is_free
    assert str(registered(workers, A).state) == "busy"
    assert registered(workers, B).is_free


async def test_a_failed_or_empty_scrape_falls_back_to_local_counts_and_is_counted() -> None:
    _clock, metrics, workers, engines, scraper = setup()
    engines.answers = {A: load(9, 9), B: load(9, 9)}
    await scraper.sweep()
    engines.answers = {A: ConnectionError("refused"), B: None}
    with workers.acquire(A):
        await scraper.sweep()
        assert registered(workers, A).load.reported is None
        assert registered(workers, A).load.load == 1  # its local in-flight count
    assert registered(workers, B).load.load == 0
    assert value(metrics, "worker_metrics_scrape_failures_total", A) == 1
    assert value(metrics, "worker_engine_queued_requests", A) is None


async def test_one_scrape_per_worker_per_interval_whatever_the_request_rate() -> None:
    clock, _metrics, workers, engines, scraper = setup()
    scraper.start()
    try:
        for _ in range(50):
            workers.acquire(A).release()
        await clock.advance(3.0)
    finally:
        await scraper.aclose()
    assert sorted(engines.scrapes) == [A] * 4 + [B] * 4  # at 0, 1, 2 and 3 s


async def test_a_quarantined_worker_is_not_scraped() -> None:
    _clock, _metrics, workers, engines, scraper = setup()
    workers.report_down(A, WorkerUnreachable())
    await scraper.sweep()
    assert engines.scrapes == [B]
    await workers.aclose()


def test_kv_scores_count_the_requests_other_frontends_gave_a_worker() -> None:
    hashes = [1, 2, 3, 4]
    ours_only = WorkerView("a", 1, 4, True, True, reported_load=1.0)
    shared = WorkerView("b", 1, 4, True, True, reported_load=3.0)  # two more from elsewhere
    local = WorkerView("c", 1, 4, True, True)  # no report: local counts only
    assert kv_scores([ours_only, shared, local], hashes, None, 1.0) == [8.0, 16.0, 8.0]
