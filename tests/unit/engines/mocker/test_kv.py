"""The mocker's KV cache: the block pool, prefix caching and preemption."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest

from dynamo_llm.engines.base import EngineOutput, EngineRequest
from dynamo_llm.engines.mocker import MockerConfig, MockerEngine
from dynamo_llm.engines.mocker.kv import BlockPool
from dynamo_llm.runtime import EngineContext, FakeClock
from tests.unit.engines.mocker.helpers import completion, decode_s, prefill_s, simulated


async def collect(
    engine: MockerEngine, req: EngineRequest
) -> tuple[list[EngineOutput], list[float]]:
    start = engine.clock.now()
    stream = await engine.generate(req, EngineContext(req.id))
    outs: list[EngineOutput] = []
    times: list[float] = []
    async for out in stream:
        outs.append(out)
        times.append(engine.clock.now() - start)
    return outs, times


# ---- the pool ---------------------------------------------------------------------------------


def test_pool_counts_used_and_free_blocks() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert (pool.num_used, pool.num_free) == (3, 1)
    with pytest.raises(ValueError):
        pool.allocate(2)
    pool.free(blocks)
    assert (pool.num_used, pool.num_free) == (0, 4)


def test_freed_registered_blocks_stay_cached_until_evicted_lru() -> None:
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    for block, h in ((a, 101), (b, 102), (c, 103)):
        pool.register(block, h)
    pool.free([a])
    pool.free([b])
    pool.free([c])
    assert pool.num_free == 3
    assert pool.lookup([101, 102, 103]) == [a, b, c]
    (new,) = pool.allocate(1)  # evicts the least recently freed: a
    assert new == a
    assert pool.lookup([101]) == []
    assert pool.lookup([102, 103]) == [b, c]


def test_hits_are_shared_with_reference_counts() -> None:
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.register(a, 7)
    hits = pool.lookup([7, 8])
    assert hits == [a]
    assert pool.count_free(hits) == 0
    pool.acquire(hits)
    pool.free([a])
    assert pool.num_used == 1  # still held by the second holder
    pool.free([a])
    assert pool.num_used == 0
    assert pool.count_free(pool.lookup([7])) == 1


def test_plain_free_blocks_are_used_before_cached_ones() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.register(a, 1)
    pool.free([a, b])
    (first,) = pool.allocate(1)
    assert first == b
    assert pool.lookup([1]) == [a]


def test_disabled_cache_never_hits() -> None:
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.register(a, 1)
    pool.free([a])
    assert pool.lookup([1]) == []


# ---- prefix caching in the engine -------------------------------------------------------------


async def test_shared_prefix_gives_smaller_ttft_and_reports_cached_tokens() -> None:
    clock = FakeClock()
    engine = MockerEngine(MockerConfig(), clock=clock)  # block_size 64
    base = list(range(1000))
    async with simulated(clock):
        first, t_first = await collect(engine, completion("a", base, 4))
        second, t_second = await collect(engine, completion("b", [*base[:960], *range(40)], 4))
    snapshot = engine.snapshot()
    await engine.aclose()

    assert first[-1].usage is not None and first[-1].usage.cached_tokens == 0
    assert second[-1].usage is not None and second[-1].usage.cached_tokens == 960
    assert second[-1].usage.prompt_tokens == 1000
    assert t_first[0] == pytest.approx(prefill_s(1000) + decode_s(16, 16384), abs=1e-12)
    # 15 cached blocks, 40 tokens to compute.
    assert t_second[0] == pytest.approx(prefill_s(40) + decode_s(16, 16384), abs=1e-12)
    assert t_second[0] < t_first[0] * 0.65  # the 16.5 ms prefill floor remains
    assert snapshot.prefix_cache_hit_tokens == 960
    assert snapshot.prefix_cache_queried_tokens == 2000
    assert snapshot.prefix_cache_hit_rate == pytest.approx(0.48)


async def test_identical_prompt_still_computes_its_last_block() -> None:
    clock = FakeClock()
    engine = MockerEngine(MockerConfig(block_size=16), clock=clock)
    prompt = list(range(64))
    async with simulated(clock):
        await collect(engine, completion("a", prompt, 1))
        again, times = await collect(engine, completion("b", prompt, 1))
    await engine.aclose()
    assert again[-1].usage is not None and again[-1].usage.cached_tokens == 48
    assert times[0] == pytest.approx(prefill_s(16) + decode_s(4, 16384), abs=1e-12)


async def test_concurrent_requests_share_cached_blocks() -> None:
    clock = FakeClock()
    engine = MockerEngine(MockerConfig(block_size=16), clock=clock)
    prefix = list(range(160))
    seen: list[int] = []

    async def watch(req: EngineRequest) -> None:
        stream = await engine.generate(req, EngineContext(req.id))
        async for _ in stream:
            seen.append(engine.snapshot().kv_blocks_used)

    async with simulated(clock):
        await watch(completion("warm", [*prefix, 1], 1))  # fills the cache
        await asyncio.gather(
            watch(completion("a", [*prefix, 2], 3)), watch(completion("b", [*prefix, 3], 3))
        )
    await engine.aclose()
    # While both run: 10 shared prefix blocks + 1 own block each, not 2 x 11.
    assert max(seen) == 12


async def test_disabled_prefix_caching_reports_no_cached_tokens() -> None:
    clock = FakeClock()
    engine = MockerEngine(MockerConfig(enable_prefix_caching=False), clock=clock)
    prompt = list(range(500))
    async with simulated(clock):
        await collect(engine, completion("a", prompt, 1))
        again, times = await collect(engine, completion("b", prompt, 1))
    await engine.aclose()
    assert again[-1].usage is not None and again[-1].usage.cached_tokens == 0
    assert times[0] == pytest.approx(prefill_s(500) + decode_s(8, 16384), abs=1e-12)


# ---- preemption -------------------------------------------------------------------------------


async def test_overloaded_engine_preempts_and_still_finishes_every_request_exactly() -> None:
    # 48 blocks of 16 tokens: six requests of 100 + 60 tokens need up to 60 blocks.
    config = MockerConfig(num_gpu_blocks=48, block_size=16)
    reqs = [completion(f"r{i}", [7000 + i, *range(99)], 60) for i in range(6)]

    clock = FakeClock()
    engine = MockerEngine(config, clock=clock)
    peak = 0

    async def run(req: EngineRequest) -> list[EngineOutput]:
        nonlocal peak
        stream = await engine.generate(req, EngineContext(req.id))
        outs = []
        async for out in stream:
            outs.append(out)
            peak = max(peak, engine.snapshot().kv_blocks_used)
        return outs

    async with simulated(clock):
        together = await asyncio.gather(*(run(r) for r in reqs))
    snapshot = engine.snapshot()
    await engine.aclose()
    assert snapshot.preemptions_total > 0
    assert peak <= 48
    assert (snapshot.running, snapshot.waiting, snapshot.kv_blocks_used) == (0, 0, 0)
    assert snapshot.finished_total == 6

    for req, outs in zip(reqs, together, strict=True):
        clock = FakeClock()
        alone_engine = MockerEngine(config, clock=clock)
        async with simulated(clock):
            alone, _ = await collect(alone_engine, req)
        assert alone_engine.snapshot().preemptions_total == 0
        await alone_engine.aclose()
        assert len(outs) == 60
        assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
        assert "".join(o.text for o in outs) == "".join(o.text for o in alone)
        last = outs[-1]
        assert last.finish_reason == "length"
        assert last.usage is not None
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (100, 60)


async def test_a_preempted_request_is_recomputed_as_prefill() -> None:
    # Two requests that each grow to 4 blocks in a 6-block pool: the later one is preempted
    # when the pool runs out and resumes once the earlier one finishes.
    config = MockerConfig(num_gpu_blocks=6, block_size=16, context_length=96)
    clock = FakeClock()
    engine = MockerEngine(config, clock=clock)
    a = completion("a", [1, *range(31)], 30)
    b = completion("b", [2, *range(31)], 30)
    async with simulated(clock):
        (outs_a, _), (outs_b, times_b) = await asyncio.gather(
            collect(engine, a), collect(engine, b)
        )
    snapshot = engine.snapshot()
    await engine.aclose()
    assert snapshot.preemptions_total >= 1
    assert len(outs_a) == len(outs_b) == 30
    # B's resumption includes a prefill pass over its whole context, so one of its gaps is
    # longer than any pure decode step could be in this pool.
    gaps = [y - x for x, y in itertools.pairwise(times_b)]
    assert max(gaps) > decode_s(6, 6) + prefill_s(1)
    assert math.isclose(sum(gaps) + times_b[0], times_b[-1])
