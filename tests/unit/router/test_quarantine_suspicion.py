"""A broken answer from a worker that may be fine: probe it at once, quarantine only if that fails.

A 200 without an event stream (``UpstreamNoStream``; llama_cpp.server on a prompt longer than its
context) fails its request, but says nothing certain about the worker. Its class sets
``probes_worker``: the worker stays available while the probe runs, and is quarantined (with the
usual back-off) only when the probe fails. On a FakeClock, with a probe the test releases by hand.
"""

import asyncio

from dynamo_llm.errors import UpstreamError, UpstreamNoStream, WorkerDisconnected
from dynamo_llm.metrics import Metrics
from dynamo_llm.router import Worker, WorkerSet, WorkerState
from dynamo_llm.runtime import FakeClock
from dynamo_llm.runtime.clock import settle

SAFETY_NET = 5.0


class HeldProbe:
    """A probe that waits until the test answers it; records each call."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._answers: asyncio.Queue[bool] = asyncio.Queue()
        self.started = asyncio.Event()

    async def __call__(self, worker: Worker) -> bool:
        self.calls.append(worker.id)
        self.started.set()
        return await self._answers.get()

    async def answer(self, ok: bool) -> None:
        self._answers.put_nowait(ok)
        await settle()


def make(probe: HeldProbe) -> tuple[FakeClock, WorkerSet, Metrics, list[frozenset[str]]]:
    clock = FakeClock()
    metrics = Metrics()
    workers = WorkerSet(clock=clock, probe=probe, metrics=metrics)
    workers.add(Worker("http://a", ["m"]))
    changes: list[frozenset[str]] = []
    workers.on_change(changes.append)
    return clock, workers, metrics, changes


def quarantined_gauge(metrics: Metrics) -> float:
    return metrics.worker_quarantined.labels("http://a").value


def out(worker: Worker) -> bool:
    """Whether the worker is quarantined now (a call, so the checker does not narrow it)."""
    return worker.quarantined


def probing(worker: Worker) -> bool:
    return worker.health.probing


def worker_a(workers: WorkerSet) -> Worker:
    worker = workers.get("http://a")
    assert worker is not None
    return worker


async def test_a_worker_that_answered_without_a_stream_is_probed_and_stays_if_it_passes() -> None:
    async with asyncio.timeout(SAFETY_NET) as net:
        probe = HeldProbe()
        clock, workers, metrics, changes = make(probe)
        assert not workers.report_down("http://a", UpstreamNoStream("empty body"))
        await probe.started.wait()
        worker = worker_a(workers)
        assert probe.calls == ["http://a"]
        assert probing(worker) and not out(worker)
        assert worker.state is WorkerState.FREE, "available while the probe runs"
        assert workers.has_available("m")
        await probe.answer(True)
        assert not probing(worker) and not out(worker)
        assert worker.failures == 0
        assert changes == []
        assert quarantined_gauge(metrics) == 0
        assert clock.pending_timers() == 0
        await workers.aclose()
    assert not net.expired()


async def test_it_is_quarantined_with_the_usual_back_off_when_the_probe_fails() -> None:
    async with asyncio.timeout(SAFETY_NET) as net:
        probe = HeldProbe()
        clock, workers, metrics, changes = make(probe)
        workers.report_down("http://a", UpstreamNoStream("empty body"))
        await probe.started.wait()
        await probe.answer(False)
        worker = worker_a(workers)
        assert out(worker) and worker.failures == 1
        assert worker.quarantined_until == 1.0, "the first back-off: 1 s"
        assert changes == [frozenset({"m"})]
        assert quarantined_gauge(metrics) == 1
        # Then the ordinary cycle: the back-off expires, the probe decides.
        await clock.advance(1.0)
        assert probe.calls == ["http://a", "http://a"]
        await probe.answer(True)
        assert not out(worker)
        assert changes == [frozenset({"m"}), frozenset({"m"})]
        await workers.aclose()
    assert not net.expired()


async def test_a_second_suspicion_while_probing_starts_no_second_probe() -> None:
    async with asyncio.timeout(SAFETY_NET) as net:
        probe = HeldProbe()
        _clock, workers, _metrics, _changes = make(probe)
        workers.report_down("http://a", UpstreamNoStream("empty body"))
        workers.report_down("http://a", UpstreamNoStream("empty body again"))
        await probe.started.wait()
        await settle()
        assert probe.calls == ["http://a"]
        await probe.answer(True)
        await workers.aclose()
    assert not net.expired()


async def test_a_real_fault_during_the_probe_takes_over_with_the_back_off_cycle() -> None:
    async with asyncio.timeout(SAFETY_NET) as net:
        probe = HeldProbe()
        clock, workers, _metrics, _changes = make(probe)
        workers.report_down("http://a", UpstreamNoStream("empty body"))
        await probe.started.wait()
        assert workers.report_down("http://a", WorkerDisconnected())
        await settle()
        worker = worker_a(workers)
        assert out(worker) and not probing(worker), "the suspicion's probe is cancelled"
        assert worker.state is WorkerState.QUARANTINED
        await clock.advance(1.0)
        assert probe.calls == ["http://a", "http://a"]
        await probe.answer(True)
        assert not out(worker)
        await workers.aclose()
    assert not net.expired()


async def test_other_upstream_errors_neither_quarantine_nor_probe() -> None:
    async with asyncio.timeout(SAFETY_NET) as net:
        probe = HeldProbe()
        _clock, workers, _metrics, _changes = make(probe)
        assert not workers.report_down("http://a", UpstreamError("the worker failed with HTTP 500"))
        await settle()
        assert probe.calls == []
        await workers.aclose()
    assert not net.expired()


async def test_aclose_cancels_a_suspicions_probe() -> None:
    async with asyncio.timeout(SAFETY_NET) as net:
        probe = HeldProbe()
        _clock, workers, _metrics, _changes = make(probe)
        workers.report_down("http://a", UpstreamNoStream("empty body"))
        await probe.started.wait()
        await workers.aclose()
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("probe ")]
    assert not net.expired()
