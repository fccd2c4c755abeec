"""A broken answer from a worker that may be fine: probe it at once, quarantine only if that fails.

A 200 without an event stream (``UpstreamNoStream``; llama_cpp.server on a prompt longer than its
context) fails its request, but says nothing certain about the worker. Its class sets
``probes_worker``: the worker stays available while the probe runs, and is quarantined (with the
usual back-off) only when the probe fails. On a FakeClock, with a probe the test answers by hand.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from dynamo_llm.errors import UpstreamError, UpstreamNoStream, WorkerDisconnected
from dynamo_llm.metrics import Metrics
from dynamo_llm.router import Worker, WorkerSet, WorkerState
from dynamo_llm.runtime import FakeClock
from dynamo_llm.runtime.clock import settle

SAFETY_NET = 5.0
A = "http://a"


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


@dataclass
class Bench:
    """One worker ``a`` of model ``m`` in a set on a FakeClock, and what changed."""

    clock: FakeClock = field(default_factory=FakeClock)
    probe: HeldProbe = field(default_factory=HeldProbe)
    metrics: Metrics = field(default_factory=Metrics)
    changes: list[frozenset[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workers = WorkerSet(clock=self.clock, probe=self.probe, metrics=self.metrics)
        self.workers.add(Worker(A, ["m"]))
        self.workers.on_change(self.changes.append)

    @property
    def a(self) -> Worker:
        worker = self.workers.get(A)
        assert worker is not None
        return worker

    # Calls, so that the type checker does not narrow what the next step changes.
    def out(self) -> bool:
        return self.a.quarantined

    def probing(self) -> bool:
        return self.a.health.probing

    def gauge(self) -> float:
        return self.metrics.worker_quarantined.labels(A).value


@contextlib.asynccontextmanager
async def suspected() -> AsyncIterator[Bench]:
    """A bench whose worker just answered a 200 without a stream; its probe has started."""
    async with asyncio.timeout(SAFETY_NET) as net:
        b = Bench()
        try:
            assert not b.workers.report_down(A, UpstreamNoStream("empty body"))
            await b.probe.started.wait()
            yield b
        finally:
            await b.workers.aclose()
    assert not net.expired()


async def test_a_worker_that_answered_without_a_stream_is_probed_and_stays_if_it_passes() -> None:
    async with suspected() as b:
        assert b.probe.calls == [A]
        assert b.probing() and not b.out()
        assert b.a.state is WorkerState.FREE, "available while the probe runs"
        assert b.workers.has_available("m")
        await b.probe.answer(True)
        assert not b.probing() and not b.out()
        assert b.a.failures == 0
        assert b.changes == []
        assert b.gauge() == 0
        assert b.clock.pending_timers() == 0


async def test_it_is_quarantined_with_the_usual_back_off_when_the_probe_fails() -> None:
    async with suspected() as b:
        await b.probe.answer(False)
        assert b.out() and b.a.failures == 1
        assert b.a.quarantined_until == 1.0, "the first back-off: 1 s"
        assert b.changes == [frozenset({"m"})]
        assert b.gauge() == 1
        # Then the ordinary cycle: the back-off expires, the probe decides.
        await b.clock.advance(1.0)
        assert b.probe.calls == [A, A]
        await b.probe.answer(True)
        assert not b.out()
        assert b.changes == [frozenset({"m"})] * 2


async def test_a_second_suspicion_while_probing_starts_no_second_probe() -> None:
    async with suspected() as b:
        b.workers.report_down(A, UpstreamNoStream("empty body again"))
        await settle()
        assert b.probe.calls == [A]
        await b.probe.answer(True)


async def test_a_real_fault_during_the_probe_takes_over_with_the_back_off_cycle() -> None:
    async with suspected() as b:
        assert b.workers.report_down(A, WorkerDisconnected())
        await settle()
        assert b.out() and not b.probing(), "the suspicion's probe is cancelled"
        assert b.a.state is WorkerState.QUARANTINED
        await b.clock.advance(1.0)
        assert b.probe.calls == [A, A]
        await b.probe.answer(True)
        assert not b.out()


async def test_other_upstream_errors_neither_quarantine_nor_probe() -> None:
    b = Bench()
    assert not b.workers.report_down(A, UpstreamError("the worker failed with HTTP 500"))
    await settle()
    assert b.probe.calls == []
    await b.workers.aclose()


async def test_aclose_cancels_a_suspicions_probe() -> None:
    async with suspected() as b:
        await b.workers.aclose()
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("probe ")]
