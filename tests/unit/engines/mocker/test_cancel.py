"""Cancellation in the mocker (SPEC §10 fix): a stopped, killed or abandoned request leaves the
batch and frees its KV blocks at once, and the freed capacity is used at the next pass."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from dynamo_llm.engines.base import EngineOutput
from dynamo_llm.engines.mocker import MockerConfig, MockerEngine, MockerSnapshot
from dynamo_llm.errors import EngineError
from dynamo_llm.runtime import EngineContext, FakeClock
from tests.unit.engines.mocker.helpers import completion, decode_s, prefill_s, simulated

# A holds 32 of 40 blocks; B needs 13 more, so it waits until A is gone.
CONFIG = MockerConfig(num_gpu_blocks=40, block_size=16)
A_PROMPT = [1, *range(499)]
B_PROMPT = [2, *range(199)]


async def _stop_after_three(stop: str) -> None:
    clock = FakeClock()
    engine = MockerEngine(CONFIG, clock=clock)
    ctx_a = EngineContext("a")
    a_outputs: list[EngineOutput] = []
    at_stop: list[tuple[float, MockerSnapshot]] = []
    b_times: list[float] = []

    async def run_a() -> None:
        stream = await engine.generate(completion("a", A_PROMPT, 100), ctx_a)
        async for out in stream:
            a_outputs.append(out)
            if len(a_outputs) == 3:
                getattr(ctx_a, stop)()
                at_stop.append((clock.now(), engine.snapshot()))

    async def run_b() -> None:
        stream = await engine.generate(completion("b", B_PROMPT, 2), EngineContext("b"))
        async for _ in stream:
            b_times.append(clock.now())

    async with simulated(clock):
        await asyncio.gather(run_a(), run_b())
    final = engine.snapshot()
    await engine.aclose()

    assert len(a_outputs) == 3  # nothing after the stop
    assert a_outputs[-1].finish_reason is None
    ((t_stop, snap),) = at_stop
    assert (snap.running, snap.waiting, snap.kv_blocks_used, snap.cancelled_total) == (0, 1, 0, 1)
    # The pass in flight when A stopped (A's 4th decode step) still runs out; B is admitted into
    # the freed blocks at the very next pass.
    next_pass = t_stop + decode_s(32, 40)
    assert b_times[0] == pytest.approx(next_pass + prefill_s(200) + decode_s(13, 40), abs=1e-12)
    assert final.cancelled_total == 1
    assert final.finished_total == 1
    assert final.kv_blocks_used == 0


async def test_killed_request_stops_frees_blocks_and_waiting_request_takes_them() -> None:
    await _stop_after_three("kill")


async def test_gracefully_stopped_request_stops_frees_blocks_and_waiting_request_takes_them() -> (
    None
):
    await _stop_after_three("stop")


async def test_killed_waiting_request_leaves_the_queue_without_output() -> None:
    clock = FakeClock()
    engine = MockerEngine(CONFIG, clock=clock)
    ctx_b = EngineContext("b")
    b_outputs: list[EngineOutput] = []

    async def run_a() -> None:
        stream = await engine.generate(completion("a", A_PROMPT, 3), EngineContext("a"))
        async for _ in stream:
            if engine.snapshot().waiting == 1:
                ctx_b.kill()
                assert engine.snapshot().waiting == 0

    async def run_b() -> None:
        stream = await engine.generate(completion("b", B_PROMPT, 3), ctx_b)
        async for out in stream:
            b_outputs.append(out)

    async with simulated(clock):
        await asyncio.gather(run_a(), run_b())
    snapshot = engine.snapshot()
    await engine.aclose()
    assert b_outputs == []
    assert (snapshot.cancelled_total, snapshot.finished_total) == (1, 1)


async def test_abandoned_stream_frees_its_blocks_at_once() -> None:
    clock = FakeClock()
    engine = MockerEngine(CONFIG, clock=clock)
    async with simulated(clock):
        stream = await engine.generate(completion("a", A_PROMPT, 100), EngineContext("a"))
        assert isinstance(stream, AsyncIterator)
        async for _ in stream:
            break
        assert engine.snapshot().kv_blocks_used == 32
        await stream.aclose()  # type: ignore[attr-defined]
        snapshot = engine.snapshot()
        assert (snapshot.running, snapshot.kv_blocks_used, snapshot.cancelled_total) == (0, 0, 1)
        # The capacity is usable right away.
        stream = await engine.generate(completion("b", B_PROMPT, 1), EngineContext("b"))
        assert [o.finish_reason async for o in stream] == ["length"]
    await engine.aclose()


async def test_cancelled_consumer_task_frees_its_blocks() -> None:
    clock = FakeClock()
    engine = MockerEngine(CONFIG, clock=clock)
    first = asyncio.Event()

    async def consume() -> None:
        stream = await engine.generate(completion("a", A_PROMPT, 100), EngineContext("a"))
        async for _ in stream:
            first.set()

    async with simulated(clock):
        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    snapshot = engine.snapshot()
    await engine.aclose()
    assert (snapshot.running, snapshot.kv_blocks_used, snapshot.cancelled_total) == (0, 0, 1)


async def test_already_stopped_context_gives_an_empty_stream() -> None:
    clock = FakeClock()
    engine = MockerEngine(CONFIG, clock=clock)
    ctx = EngineContext("a")
    ctx.kill()
    async with simulated(clock):
        stream = await engine.generate(completion("a", A_PROMPT, 3), ctx)
        assert [o async for o in stream] == []
    snapshot = engine.snapshot()
    await engine.aclose()
    assert (snapshot.waiting, snapshot.running, snapshot.passes_total) == (0, 0, 0)


async def test_stopping_a_finished_request_changes_nothing() -> None:
    clock = FakeClock()
    engine = MockerEngine(CONFIG, clock=clock)
    ctx = EngineContext("a")
    async with simulated(clock):
        stream = await engine.generate(completion("a", A_PROMPT, 2), ctx)
        assert len([o async for o in stream]) == 2
    ctx.kill()
    snapshot = engine.snapshot()
    await engine.aclose()
    assert (snapshot.cancelled_total, snapshot.finished_total) == (0, 1)


async def test_engine_close_ends_open_streams_with_an_engine_error() -> None:
    clock = FakeClock()
    engine = MockerEngine(CONFIG, clock=clock)
    got_one = asyncio.Event()
    outcome: list[BaseException] = []

    async def consume() -> None:
        stream = await engine.generate(completion("a", A_PROMPT, 100), EngineContext("a"))
        try:
            async for _ in stream:
                got_one.set()
        except EngineError as exc:
            outcome.append(exc)

    async with simulated(clock):
        task = asyncio.create_task(consume())
        await got_one.wait()
        await engine.aclose()
        await task
    assert len(outcome) == 1
    assert engine.snapshot().kv_blocks_used == 0
    await engine.aclose()  # idempotent
    with pytest.raises(EngineError):
        await engine.generate(completion("b", B_PROMPT, 1), EngineContext("b"))
