"""Quarantine: a faulty worker is set aside, probed after a back-off that doubles up to a cap, and
brought back; the set's shutdown cancels every probe and timer.

The timing runs on a FakeClock moved by hand, so every back-off is exact."""

from __future__ import annotations

import asyncio
import random

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
from dynamo_llm.router import (
    RoutingPolicy,
    Worker,
    WorkerSet,
    WorkerState,
)
from dynamo_llm.runtime import FakeClock
from tests.unit.router.helpers import (
    ScriptedProbe,
    make_set,
    quarantined_gauge,
)

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
