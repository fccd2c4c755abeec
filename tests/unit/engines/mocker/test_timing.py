"""The mocker's timing model, checked exactly in simulated time.

The expected times are computed from SPEC §10's formulas (``helpers.py``), independently of
the engine's own timing module. TTFT in the mocker is the simulated time from the moment the
stream is first iterated (the request joins the waiting queue) to the moment its first output is
delivered; on an idle engine that is exactly one pass: prefill(uncached prompt tokens) + one
decode step.
"""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest

from dynamo_llm.engines.base import EngineOutput, EngineRequest
from dynamo_llm.engines.mocker import MockerConfig, MockerEngine
from dynamo_llm.runtime import EngineContext, FakeClock
from tests.unit.engines.mocker.helpers import completion, decode_s, prefill_s, simulated


async def collect(
    engine: MockerEngine, req: EngineRequest
) -> tuple[list[EngineOutput], list[float]]:
    stream = await engine.generate(req, EngineContext(req.id))
    outs: list[EngineOutput] = []
    times: list[float] = []
    async for out in stream:
        outs.append(out)
        times.append(engine.clock.now())
    return outs, times


@pytest.fixture
async def clock() -> FakeClock:
    return FakeClock()


async def test_ttft_is_one_pass_of_prefill_plus_one_decode_step(clock: FakeClock) -> None:
    engine = MockerEngine(MockerConfig(num_gpu_blocks=1000, block_size=16), clock=clock)
    async with simulated(clock):
        outs, times = await collect(engine, completion("a", list(range(300)), 3))
    await engine.aclose()
    blocks = math.ceil(300 / 16)
    assert times[0] == pytest.approx(prefill_s(300) + decode_s(blocks, 1000), abs=1e-12)
    assert outs[0].prompt_tokens == 300


async def test_speedup_ratios_divide_prefill_and_decode(clock: FakeClock) -> None:
    config = MockerConfig(
        num_gpu_blocks=1000, block_size=16, speedup_ratio=10, decode_speedup_ratio=2
    )
    engine = MockerEngine(config, clock=clock)
    async with simulated(clock):
        _, times = await collect(engine, completion("a", list(range(300)), 2))
    await engine.aclose()
    first = prefill_s(300) / 10 + decode_s(19, 1000) / 20
    assert times[0] == pytest.approx(first, abs=1e-12)
    assert times[1] - times[0] == pytest.approx(decode_s(19, 1000) / 20, abs=1e-12)


async def test_long_prompt_is_prefilled_in_chunks_of_the_token_budget(clock: FakeClock) -> None:
    config = MockerConfig(block_size=16, max_num_batched_tokens=4096, context_length=16384)
    engine = MockerEngine(config, clock=clock)
    async with simulated(clock):
        _, times = await collect(engine, completion("a", list(range(10000)), 1))
    await engine.aclose()
    # Two chunk passes with no decode step, then the rest of the prompt plus the first token.
    expected = 2 * prefill_s(4096) + prefill_s(10000 - 8192) + decode_s(625, 16384)
    assert times[0] == pytest.approx(expected, abs=1e-12)


async def test_without_chunked_prefill_a_prompt_waits_for_a_pass_with_room(
    clock: FakeClock,
) -> None:
    config = MockerConfig(block_size=16, enable_chunked_prefill=False)
    engine = MockerEngine(config, clock=clock)
    a = completion("a", [1, *range(5000)], 1)
    b = completion("b", [2, *range(5000)], 1)
    async with simulated(clock):
        (_, ta), (_, tb) = await asyncio.gather(collect(engine, a), collect(engine, b))
    await engine.aclose()
    blocks = math.ceil(5001 / 16)
    pass_one = prefill_s(5001) + decode_s(blocks, 16384)
    assert ta[0] == pytest.approx(pass_one, abs=1e-12)
    # A has finished (max_tokens=1) and freed its blocks by the second pass.
    assert tb[0] == pytest.approx(2 * pass_one, abs=1e-12)


async def test_inter_token_latency_follows_decode_formula_as_kv_fills(clock: FakeClock) -> None:
    blocks_total, bs, prompt_len, max_tokens = 64, 16, 400, 600
    config = MockerConfig(num_gpu_blocks=blocks_total, block_size=bs, context_length=1024)
    engine = MockerEngine(config, clock=clock)
    async with simulated(clock):
        outs, times = await collect(engine, completion("a", list(range(prompt_len)), max_tokens))
    await engine.aclose()
    assert len(outs) == max_tokens
    # Token j arrives at the end of pass j, which computes the KV of prompt + j-1 tokens.
    itls = [b - a for a, b in itertools.pairwise(times)]
    for j, itl in enumerate(itls, start=2):
        used = math.ceil((prompt_len + j - 1) / bs)
        assert itl == pytest.approx(decode_s(used, blocks_total), abs=1e-12), j
    assert itls[0] == pytest.approx(decode_s(26, 64), abs=1e-12)  # u = 0.41
    assert itls[-1] == pytest.approx(decode_s(63, 64), abs=1e-12)  # u = 0.98
    assert itls[-1] > itls[0] * 1.4  # 34 ms vs 23 ms


async def test_batch_of_64_finishes_when_the_model_predicts(clock: FakeClock) -> None:
    n, prompt_len, max_tokens, bs, blocks_total = 64, 120, 40, 16, 2048
    engine = MockerEngine(MockerConfig(num_gpu_blocks=blocks_total, block_size=bs), clock=clock)
    # Distinct first tokens: no prefix sharing between the requests.
    reqs = [completion(f"r{i}", [50000 + i, *range(prompt_len - 1)], max_tokens) for i in range(n)]
    async with simulated(clock):
        results = await asyncio.gather(*(collect(engine, r) for r in reqs))
    snapshot = engine.snapshot()
    await engine.aclose()

    # All 64 prompts (7680 tokens) fit the 8192-token budget, so they prefill together in pass
    # 1 and then decode in lockstep; pass j holds the KV of prompt + j-1 tokens per request.
    predicted_first = prefill_s(n * prompt_len) + decode_s(n * math.ceil(prompt_len / bs), 2048)
    predicted_end = prefill_s(n * prompt_len) + sum(
        decode_s(n * math.ceil((prompt_len + j - 1) / bs), blocks_total)
        for j in range(1, max_tokens + 1)
    )
    for outs, times in results:
        assert len(outs) == max_tokens
        assert outs[-1].finish_reason == "length"
        assert times[0] == pytest.approx(predicted_first, abs=1e-12)
        assert times[-1] == pytest.approx(predicted_end, abs=1e-9)
    assert clock.now() == pytest.approx(predicted_end, abs=1e-9)
    assert snapshot.passes_total == max_tokens
    assert snapshot.preemptions_total == 0
    assert (snapshot.running, snapshot.waiting, snapshot.kv_blocks_used) == (0, 0, 0)


async def test_batch_is_bounded_by_max_num_seqs(clock: FakeClock) -> None:
    engine = MockerEngine(MockerConfig(block_size=16, max_num_seqs=2), clock=clock)
    reqs = [completion(f"r{i}", [i, *range(31)], 1) for i in range(3)]
    async with simulated(clock):
        results = await asyncio.gather(*(collect(engine, r) for r in reqs))
    await engine.aclose()
    first_pass = prefill_s(64) + decode_s(4, 16384)
    assert results[0][1][0] == pytest.approx(first_pass, abs=1e-12)
    assert results[1][1][0] == pytest.approx(first_pass, abs=1e-12)
    second_pass = prefill_s(32) + decode_s(2, 16384)
    assert results[2][1][0] == pytest.approx(first_pass + second_pass, abs=1e-12)


async def test_idle_scheduler_sets_no_timer(clock: FakeClock) -> None:
    engine = MockerEngine(MockerConfig(), clock=clock)
    async with simulated(clock):
        await collect(engine, completion("a", list(range(10)), 2))
    assert clock.pending_timers() == 0
    await clock.advance(3600)
    assert engine.snapshot().passes_total == 2
    await engine.aclose()
