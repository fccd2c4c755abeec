"""In-flight slots: a worker's load has one owner, and a slot gives it back exactly once."""

from __future__ import annotations

import random

import pytest

from dynamo_llm.router import (
    KvIndex,
    RoutingPolicy,
    UnknownWorker,
    Worker,
    WorkerLoad,
    block_hashes,
)
from dynamo_llm.runtime import FakeClock
from tests.unit.router.helpers import (
    ScriptedProbe,
    inflight_gauge,
    make_set,
)


def test_a_slot_counts_once_even_when_released_twice() -> None:
    clock = FakeClock()
    workers, metrics = make_set(clock, ScriptedProbe(clock))
    worker = workers.add(Worker("http://a", ["m"]))
    assert inflight_gauge(metrics, "http://a") == 0
    first = workers.acquire("http://a")
    second = workers.acquire("http://a")
    assert worker.inflight == 2
    assert inflight_gauge(metrics, "http://a") == 2
    first.release()
    first.release()
    assert first.released
    assert worker.inflight == 1
    assert inflight_gauge(metrics, "http://a") == 1
    with second:
        pass
    second.release()
    assert worker.inflight == 0
    assert inflight_gauge(metrics, "http://a") == 0


def test_a_slot_is_released_by_its_context_manager_on_error() -> None:
    clock = FakeClock()
    workers, _ = make_set(clock, ScriptedProbe(clock))
    worker = workers.add(Worker("http://a", ["m"]))
    with pytest.raises(RuntimeError), workers.acquire("http://a"):
        assert worker.inflight == 1
        raise RuntimeError("boom")
    assert worker.inflight == 0


def test_releasing_after_the_worker_was_removed_is_harmless() -> None:
    clock = FakeClock()
    workers, metrics = make_set(clock, ScriptedProbe(clock))
    old = workers.add(Worker("http://a", ["m"]))
    slot = workers.acquire("http://a")
    workers.remove("http://a")
    assert inflight_gauge(metrics, "http://a") is None  # the series left with the worker
    # The same worker comes back (a discovery flap) before the old request ends.
    new = workers.add(Worker("http://a", ["m"]))
    fresh = workers.acquire("http://a")
    slot.release()
    slot.release()
    assert old.inflight == 0
    assert new.inflight == 1
    assert inflight_gauge(metrics, "http://a") == 1
    fresh.release()
    assert inflight_gauge(metrics, "http://a") == 0


def test_acquiring_a_removed_worker_raises_unknown_worker() -> None:
    clock = FakeClock()
    workers, _ = make_set(clock, ScriptedProbe(clock))
    with pytest.raises(UnknownWorker):
        workers.acquire("http://gone")


def test_a_thousand_acquire_release_cycles_leave_nothing_in_flight() -> None:
    clock = FakeClock()
    index = KvIndex()
    workers, metrics = make_set(clock, ScriptedProbe(clock), kv_index=index)
    for name in "abc":
        workers.add(Worker(f"http://{name}", ["m"]))
    policy = RoutingPolicy("least-loaded", rng=random.Random(1))
    hashes = block_hashes("p" * 700)
    held = []
    for i in range(1000):
        worker = workers.select("m", policy)
        held.append(workers.acquire(worker.id, hashes=hashes))
        if i % 3 == 0:
            held.pop(0).release()
        if i % 5 == 0 and held:
            held[-1].release()  # released early, and again below
    peak = sum(w.inflight for w in workers)
    assert peak > 0
    for slot in held:
        slot.release()
    for w in workers:
        assert w.inflight == 0
        assert w.active_blocks == 0
        assert inflight_gauge(metrics, w.id) == 0
    assert index.overlap("http://a", hashes) == 3


def test_acquire_counts_the_request_blocks_as_active_and_records_them() -> None:
    clock = FakeClock()
    index = KvIndex()
    workers, _ = make_set(clock, ScriptedProbe(clock), kv_index=index)
    worker = workers.add(Worker("http://a", ["m"]))
    hashes = block_hashes("x" * 1000)
    with workers.acquire("http://a", hashes=hashes):
        assert worker.active_blocks == 4
        assert workers.snapshot("m")[0].active_blocks == 4
    assert worker.active_blocks == 0
    assert index.overlap("http://a", hashes) == 4
    workers.remove("http://a")
    assert index.cached_blocks("http://a") == 0


def test_engine_reported_load_forgets_our_own_requests_that_ended_since_the_report() -> None:
    """The engine's figure counted our requests in flight at the scrape; once they end, they are
    neither ours nor another frontend's (else ``kv`` mode takes them for foreign load until the
    next scrape and spreads a shared prefix away from its cache)."""
    load = WorkerLoad()
    first = load.take("w", blocks=4)
    load.report(1.0)  # the engine holds our one request
    assert load.load == 1
    first.release()
    assert load.load == 0  # it ended: nobody's load now
    second = load.take("w", blocks=4)
    assert load.load == 1  # sent since the report
    second.release()
    assert load.load == 0
    load.report(3.0)  # two other frontends' requests, none of ours
    third = load.take("w", blocks=4)
    assert load.load == 4
    third.release()
    assert load.load == 3  # theirs still run
