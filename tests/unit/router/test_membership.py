"""The worker set: in-flight slots, quarantine with back-off and probe, structured shutdown.

Quarantine timing runs on a FakeClock moved by hand, so every back-off is exact.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from dynamo_llm.errors import (
    AllWorkersBusy,
    Cancelled,
    ContextLengthExceeded,
    DynamoError,
    InvalidRequest,
    ModelNotFound,
    NoWorkersAvailable,
    ResponseTimeout,
    ServerShuttingDown,
    TooManyRequests,
    UpstreamError,
    WorkerDisconnected,
    WorkerResponseTimeout,
    WorkerShuttingDown,
    WorkerUnreachable,
)
from dynamo_llm.metrics import Metrics
from dynamo_llm.router import (
    KvIndex,
    RoutingPolicy,
    UnknownWorker,
    Worker,
    WorkerSet,
    WorkerState,
    block_hashes,
)
from dynamo_llm.runtime import FakeClock


class ScriptedProbe:
    """A probe that answers from a script (default: fail) and records when it ran."""

    def __init__(self, clock: FakeClock, answers: list[bool] | None = None) -> None:
        self.clock = clock
        self.answers = list(answers or [])
        self.calls: list[tuple[str, float]] = []

    async def __call__(self, worker: Worker) -> bool:
        self.calls.append((worker.id, self.clock.now()))
        return self.answers.pop(0) if self.answers else False

    @property
    def times(self) -> list[float]:
        return [t for _, t in self.calls]


def inflight_gauge(metrics: Metrics, worker_id: str) -> float | None:
    child = metrics.worker_inflight_requests.children.get((worker_id,))
    return None if child is None else child.value


def quarantined_gauge(metrics: Metrics, worker_id: str) -> float | None:
    child = metrics.worker_quarantined.children.get((worker_id,))
    return None if child is None else child.value


@pytest.fixture
async def safety_net() -> AsyncIterator[None]:
    async with asyncio.timeout(5) as net:
        yield
    assert not net.expired()


def make_set(
    clock: FakeClock,
    probe: ScriptedProbe,
    *,
    max_inflight: int | None = None,
    backoff_initial: float = 1.0,
    backoff_max: float = 60.0,
    kv_index: KvIndex | None = None,
) -> tuple[WorkerSet, Metrics]:
    metrics = Metrics()
    workers = WorkerSet(
        clock=clock,
        probe=probe,
        metrics=metrics,
        max_inflight=max_inflight,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        kv_index=kv_index,
    )
    return workers, metrics


# ---- membership -------------------------------------------------------------------------------


def test_workers_are_indexed_by_model_in_registration_order() -> None:
    clock = FakeClock()
    workers, _ = make_set(clock, ScriptedProbe(clock))
    workers.add(Worker("http://a", ["m1", "m2"]))
    workers.add(Worker("http://b", ["m2"]))
    assert [w.id for w in workers.workers_for("m2")] == ["http://a", "http://b"]
    assert [w.id for w in workers.workers_for("m1")] == ["http://a"]
    assert workers.workers_for("nope") == []
    assert workers.models() == {"m1", "m2"}
    assert len(workers) == 2
    assert "http://a" in workers
    workers.remove("http://a")
    assert workers.models() == {"m2"}
    assert workers.get("http://a") is None
    assert workers.remove("http://a") is None


def test_adding_a_known_worker_again_keeps_its_state_and_takes_new_models() -> None:
    clock = FakeClock()
    workers, _ = make_set(clock, ScriptedProbe(clock))
    changes: list[frozenset[str]] = []
    workers.on_change(changes.append)
    first = workers.add(Worker("http://a", ["m1"]))
    slot = workers.acquire("http://a")
    again = workers.add(Worker("http://a", ["m1", "m2"], is_ours=True))
    assert again is first
    assert first.inflight == 1
    assert first.is_ours
    assert workers.models() == {"m1", "m2"}
    assert changes == [frozenset({"m1"}), frozenset({"m1", "m2"})]
    slot.release()
    assert first.inflight == 0


def test_worker_id_defaults_to_the_url() -> None:
    assert Worker("http://h:1").id == "http://h:1"
    assert Worker("http://h:1", worker_id="w7").id == "w7"


# ---- in-flight slots ------------------------------------------------------------------------


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


# ---- selection, load shedding ----------------------------------------------------------------


def test_select_sheds_load_when_every_available_worker_is_at_its_limit() -> None:
    clock = FakeClock()
    workers, _ = make_set(clock, ScriptedProbe(clock), max_inflight=2)
    for name in "ab":
        workers.add(Worker(f"http://{name}", ["m"]))
    policy = RoutingPolicy("round-robin")
    slots = [workers.acquire(workers.select("m", policy).id) for _ in range(4)]
    assert [w.state for w in workers] == [WorkerState.BUSY, WorkerState.BUSY]
    with pytest.raises(AllWorkersBusy):
        workers.select("m", policy)
    slots[0].release()
    assert workers.select("m", policy).id == slots[0].worker.id


def test_a_per_worker_limit_overrides_the_set_default() -> None:
    clock = FakeClock()
    workers, _ = make_set(clock, ScriptedProbe(clock), max_inflight=5)
    a = workers.add(Worker("http://a", ["m"], max_inflight=1))
    b = workers.add(Worker("http://b", ["m"]))
    assert (a.max_inflight, b.max_inflight) == (1, 5)
    workers.acquire("http://a")
    assert [v.free for v in workers.snapshot("m")] == [False, True]


def test_select_excludes_the_given_workers() -> None:
    clock = FakeClock()
    workers, _ = make_set(clock, ScriptedProbe(clock))
    for name in "abc":
        workers.add(Worker(f"http://{name}", ["m"]))
    policy = RoutingPolicy("random", rng=random.Random(3))
    picks = {workers.select("m", policy, exclude={"http://a", "http://c"}).id for _ in range(20)}
    assert picks == {"http://b"}
    with pytest.raises(NoWorkersAvailable):
        workers.select("m", policy, exclude={"http://a", "http://b", "http://c"})
    with pytest.raises(NoWorkersAvailable):
        workers.select("unknown-model", policy)


def test_direct_mode_goes_through_select() -> None:
    clock = FakeClock()
    workers, _ = make_set(clock, ScriptedProbe(clock))
    for name in "ab":
        workers.add(Worker(f"http://{name}", ["m"]))
    policy = RoutingPolicy("direct")
    assert workers.select("m", policy, direct_id="http://b").id == "http://b"
    with pytest.raises(InvalidRequest):
        workers.select("m", policy)
    workers.report_down("http://b", WorkerUnreachable())
    with pytest.raises(NoWorkersAvailable):
        workers.select("m", policy, direct_id="http://b")


# ---- quarantine --------------------------------------------------------------------------------


QUARANTINING = [
    WorkerUnreachable(),
    WorkerDisconnected(),
    WorkerShuttingDown(),
    WorkerResponseTimeout(),
]
IGNORED: list[BaseException] = [
    Cancelled(),
    ServerShuttingDown(),
    InvalidRequest(),
    ContextLengthExceeded(),
    ModelNotFound(),
    AllWorkersBusy(),
    TooManyRequests(),
    NoWorkersAvailable(),
    ResponseTimeout(),  # the HTTP layer's own timer says nothing about the worker
    UpstreamError(),  # the worker answered (with a 5xx): it is alive
    DynamoError(),
    RuntimeError("not ours"),
    asyncio.CancelledError(),
]


@pytest.mark.parametrize("error", QUARANTINING, ids=lambda e: type(e).__name__)
async def test_worker_faults_quarantine_the_worker(error: DynamoError, safety_net: None) -> None:
    clock = FakeClock()
    workers, metrics = make_set(clock, ScriptedProbe(clock))
    worker = workers.add(Worker("http://a", ["m"]))
    assert workers.report_down("http://a", error)
    assert worker.quarantined
    assert worker.state is WorkerState.QUARANTINED
    assert quarantined_gauge(metrics, "http://a") == 1
    await workers.aclose()


@pytest.mark.parametrize("error", IGNORED, ids=lambda e: type(e).__name__)
def test_cancellations_4xx_and_overload_never_quarantine(error: BaseException) -> None:
    clock = FakeClock()
    workers, metrics = make_set(clock, ScriptedProbe(clock))
    worker = workers.add(Worker("http://a", ["m"]))
    assert not workers.report_down("http://a", error)
    assert not worker.quarantined
    assert worker.failures == 0
    assert quarantined_gauge(metrics, "http://a") == 0
    assert clock.pending_timers() == 0


async def test_a_quarantined_worker_is_skipped_until_its_probe_passes(safety_net: None) -> None:
    clock = FakeClock()
    probe = ScriptedProbe(clock, [True])
    workers, metrics = make_set(clock, probe)
    changes: list[frozenset[str]] = []
    workers.on_change(changes.append)
    for name in "ab":
        workers.add(Worker(f"http://{name}", ["m"]))
    changes.clear()
    policy = RoutingPolicy("round-robin")

    assert workers.report_down("http://a", WorkerUnreachable())
    assert changes == [frozenset({"m"})]
    assert {workers.select("m", policy).id for _ in range(6)} == {"http://b"}
    assert workers.has_available("m")

    await clock.advance(0.999)
    assert probe.calls == []
    await clock.advance(0.001)
    assert probe.calls == [("http://a", 1.0)]
    worker = workers.get("http://a")
    assert worker is not None
    assert not worker.quarantined
    assert worker.state is WorkerState.FREE
    assert quarantined_gauge(metrics, "http://a") == 0
    assert changes == [frozenset({"m"}), frozenset({"m"})]
    assert {workers.select("m", policy).id for _ in range(4)} == {"http://a", "http://b"}
    assert clock.pending_timers() == 0
    await workers.aclose()


async def test_failing_probes_double_the_back_off_up_to_the_cap(safety_net: None) -> None:
    clock = FakeClock()
    probe = ScriptedProbe(clock)  # always fails
    workers, metrics = make_set(clock, probe)
    worker = workers.add(Worker("http://a", ["m"]))
    workers.report_down("http://a", WorkerDisconnected())
    backoffs = []
    for _ in range(9):
        assert worker.quarantined_until is not None
        backoffs.append(worker.quarantined_until - clock.now())
        await clock.advance(worker.quarantined_until - clock.now())
    assert backoffs == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert probe.times == [1, 3, 7, 15, 31, 63, 123, 183, 243]
    assert worker.quarantined
    assert worker.failures == 10
    assert quarantined_gauge(metrics, "http://a") == 1
    await workers.aclose()
    assert clock.pending_timers() == 0


async def test_the_back_off_is_configurable(safety_net: None) -> None:
    clock = FakeClock()
    probe = ScriptedProbe(clock, [False, False, False, True])
    workers, _ = make_set(clock, probe, backoff_initial=0.5, backoff_max=1.5)
    workers.add(Worker("http://a", ["m"]))
    workers.report_down("http://a", WorkerUnreachable())
    await clock.advance(10)
    assert probe.times == [0.5, 1.5, 3.0, 4.5]
    await workers.aclose()


async def test_reports_while_quarantined_do_not_stack(safety_net: None) -> None:
    clock = FakeClock()
    probe = ScriptedProbe(clock, [True])
    workers, _ = make_set(clock, probe)
    worker = workers.add(Worker("http://a", ["m"]))
    # Ten in-flight requests fail together when the worker dies: one failure, one back-off.
    results = [workers.report_down("http://a", WorkerDisconnected()) for _ in range(10)]
    assert results == [True] + [False] * 9
    assert worker.failures == 1
    assert clock.pending_timers() == 1
    await clock.advance(1)
    assert probe.times == [1]
    assert not workers.report_down("http://unknown", WorkerUnreachable())
    await workers.aclose()


async def test_only_a_successful_request_resets_the_failure_streak(safety_net: None) -> None:
    clock = FakeClock()
    probe = ScriptedProbe(clock, [False, True, True, True])
    workers, _ = make_set(clock, probe)
    worker = workers.add(Worker("http://a", ["m"]))

    workers.report_down("http://a", WorkerUnreachable())  # back-off 1
    await clock.advance(1)  # probe fails: back-off 2
    await clock.advance(2)  # probe passes
    assert not worker.quarantined
    assert worker.failures == 2

    # It passes /health but fails the next real request (a flapping worker): 4 s, not 1 s.
    workers.report_down("http://a", WorkerDisconnected())
    assert worker.quarantined_until == clock.now() + 4
    await clock.advance(4)
    assert not worker.quarantined

    workers.report_ok("http://a")
    assert worker.failures == 0
    workers.report_down("http://a", WorkerDisconnected())
    assert worker.quarantined_until == clock.now() + 1
    await clock.advance(1)
    assert not worker.quarantined
    await workers.aclose()


async def test_a_worker_healthy_for_the_back_off_cap_starts_a_new_streak(
    safety_net: None,
) -> None:
    clock = FakeClock()
    probe = ScriptedProbe(clock, [False, True])
    workers, _ = make_set(clock, probe)
    worker = workers.add(Worker("http://a", ["m"]))
    workers.report_down("http://a", WorkerUnreachable())
    await clock.advance(3)  # fails at 1, passes at 3
    assert not worker.quarantined
    await clock.advance(60)
    workers.report_down("http://a", WorkerUnreachable())
    assert worker.quarantined_until == clock.now() + 1
    assert worker.failures == 1
    await workers.aclose()


async def test_a_probe_that_raises_counts_as_a_failed_probe(safety_net: None) -> None:
    clock = FakeClock()

    async def probe(worker: Worker) -> bool:
        raise OSError("connection refused")

    workers = WorkerSet(clock=clock, probe=probe)
    worker = workers.add(Worker("http://a", ["m"]))
    workers.report_down("http://a", WorkerUnreachable())
    await clock.advance(1)
    assert worker.quarantined
    assert worker.quarantined_until == 3
    await workers.aclose()


async def test_every_worker_quarantined_is_no_workers_available(safety_net: None) -> None:
    clock = FakeClock()
    probe = ScriptedProbe(clock, [True, True])
    workers, _ = make_set(clock, probe)
    for name in "ab":
        workers.add(Worker(f"http://{name}", ["m"]))
    policy = RoutingPolicy("least-loaded", rng=random.Random(4))
    workers.report_down("http://a", WorkerUnreachable())
    workers.report_down("http://b", WorkerResponseTimeout())
    assert not workers.has_available("m")
    with pytest.raises(NoWorkersAvailable):
        workers.select("m", policy)
    await clock.advance(1)
    assert workers.has_available("m")
    assert {workers.select("m", policy).id for _ in range(10)} == {"http://a", "http://b"}
    await workers.aclose()


async def test_the_probe_state_is_visible_while_it_runs(safety_net: None) -> None:
    clock = FakeClock()
    started, answer = asyncio.Event(), asyncio.Event()

    async def probe(worker: Worker) -> bool:
        started.set()
        await answer.wait()
        return True

    workers = WorkerSet(clock=clock, probe=probe)
    worker = workers.add(Worker("http://a", ["m"]))
    workers.report_down("http://a", WorkerUnreachable())
    await clock.advance(1)
    assert started.is_set()
    assert worker.state is WorkerState.PROBING
    assert not worker.is_available
    answer.set()
    await clock.advance(0)
    assert [w.state for w in workers] == [WorkerState.FREE]
    await workers.aclose()


async def test_aclose_cancels_a_running_probe_and_pending_timers(safety_net: None) -> None:
    clock = FakeClock()
    cancelled = asyncio.Event()

    async def probe(worker: Worker) -> bool:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return True

    workers = WorkerSet(clock=clock, probe=probe)
    for name in "ab":
        workers.add(Worker(f"http://{name}", ["m"]))
    workers.report_down("http://a", WorkerUnreachable())
    await clock.advance(1)  # a's probe is now hanging
    workers.report_down("http://b", WorkerUnreachable())  # b waits on a timer
    assert clock.pending_timers() == 1
    await workers.aclose()
    assert cancelled.is_set()
    assert clock.pending_timers() == 0
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("probe ")]
    # Nothing more happens after close.
    await clock.advance(100)
    b = workers.get("http://b")
    assert b is not None
    assert b.quarantined


async def test_aclose_does_not_swallow_its_callers_cancellation(safety_net: None) -> None:
    clock = FakeClock()
    let_go = asyncio.Event()

    async def probe(worker: Worker) -> bool:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await let_go.wait()  # slow cleanup
            raise
        return True

    workers = WorkerSet(clock=clock, probe=probe)
    workers.add(Worker("http://a", ["m"]))
    workers.report_down("http://a", WorkerUnreachable())
    await clock.advance(1)
    closer = asyncio.create_task(workers.aclose())
    await asyncio.sleep(0)
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    let_go.set()
    await workers.aclose()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("probe ")]


async def test_removing_a_quarantined_worker_cancels_its_timer_and_probe(
    safety_net: None,
) -> None:
    clock = FakeClock()
    probe = ScriptedProbe(clock, [True])
    workers, metrics = make_set(clock, probe)
    workers.add(Worker("http://a", ["m"]))
    workers.report_down("http://a", WorkerUnreachable())
    workers.remove("http://a")
    assert quarantined_gauge(metrics, "http://a") is None
    assert clock.pending_timers() == 0
    await clock.advance(5)
    assert probe.calls == []
    # Re-registered, it starts healthy and with a fresh streak.
    worker = workers.add(Worker("http://a", ["m"]))
    assert worker.is_available
    assert quarantined_gauge(metrics, "http://a") == 0
    await workers.aclose()


async def test_on_change_reports_the_models_and_can_unsubscribe(safety_net: None) -> None:
    clock = FakeClock()
    workers, _ = make_set(clock, ScriptedProbe(clock, [True]))
    changes: list[frozenset[str]] = []

    def broken(models: frozenset[str]) -> None:
        raise RuntimeError("a broken listener does not break the worker set")

    workers.on_change(broken)
    unsubscribe = workers.on_change(changes.append)
    workers.add(Worker("http://a", ["m1", "m2"]))
    workers.report_down("http://a", WorkerUnreachable())
    await clock.advance(1)
    workers.remove("http://a")
    assert changes == [frozenset({"m1", "m2"})] * 4
    unsubscribe()
    workers.add(Worker("http://a", ["m1"]))
    assert len(changes) == 4
    await workers.aclose()
