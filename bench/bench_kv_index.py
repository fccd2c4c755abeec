"""Precise KV routing's two costs, in process: a routing decision and event intake.

- **Decision**: ``--workers`` workers (default 100) each holding ``--blocks`` blocks (default
  100 000) in a :class:`~dynamo_llm.router.kv_blocks.KvBlockIndex`, filled with ``BlockStored``
  events of random chains; then a prompt of ``--prompt-tokens`` tokens (default 4 096) whose
  first half is one worker's chain. One decision is what the router does per request in
  precise ``kv`` mode: the prompt's block keys, each worker's overlap
  (:meth:`~dynamo_llm.router.kv_blocks.KvBlockIndex.overlap_tokens`) and the score over the
  views (:func:`~dynamo_llm.router.policies.choose_worker`). Reported as the median and p99 of
  ``--decisions`` decisions, and the key computation alone. Tokenizing the prompt is not
  included (that is the tokenizer's cost, paid once per request).
- **Intake**: ``--batches`` msgpack ``KVEventBatch`` payloads (one ``BlockStored`` of 4 blocks
  and one ``BlockRemoved`` each, as a busy engine step sends) decoded and applied by the
  subscriber's own path (:func:`~dynamo_llm.protocols.kv_events.decode_batch`, then the index):
  events per second on one core, sockets excluded.
- **Memory**: the growth of the process's peak resident size while filling the index, per
  100 000 blocks (``ru_maxrss``: indicative, it includes the allocator's slack).

Run: ``.venv/bin/python bench/bench_kv_index.py`` (``--help`` for the knobs). The machine it
runs on is shared; figures are indicative.
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import statistics
import time

from dynamo_llm.protocols.kv_events import (
    BlockRemoved,
    BlockStored,
    KvEvent,
    decode_batch,
    encode_batch,
)
from dynamo_llm.router.kv_blocks import KvBlockIndex, block_keys
from dynamo_llm.router.policies import PreciseOverlap, RouterMode, WorkerView, choose_worker

BLOCK = 16
CHAIN = 64  # blocks per stored chain while filling


def fill(index: KvBlockIndex, worker: str, blocks: int, rng: random.Random) -> list[int]:
    """Random chains of CHAIN blocks until the worker holds ``blocks``; the first chain's tokens."""
    first: list[int] = []
    next_hash = 1
    while blocks > 0:
        n = min(CHAIN, blocks)
        tokens = [rng.randrange(32000) for _ in range(n * BLOCK)]
        hashes = list(range(next_hash, next_hash + n))
        next_hash += n
        index.apply(worker, [BlockStored(list(hashes), None, tokens, BLOCK)])
        if not first:
            first = tokens
        blocks -= n
    return first


def bench_decision(args: argparse.Namespace) -> None:
    rng = random.Random(0)
    index = KvBlockIndex(max_blocks=args.blocks)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    heads = {}
    start = time.perf_counter()
    for w in range(args.workers):
        heads[f"w{w}"] = fill(index, f"w{w}", args.blocks, rng)
    filled = time.perf_counter() - start
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    total = args.workers * args.blocks
    print(f"filled {args.workers} workers x {args.blocks} blocks in {filled:.1f} s")
    print(
        f"peak RSS growth: {grown_kb / 1024:.0f} MB, "
        f"{grown_kb / 1024 * 1e5 / total:.1f} MB per 100k blocks"
    )
    holder = "w7" if args.workers > 7 else "w0"
    half = heads[holder][: min(len(heads[holder]), args.prompt_tokens // 2)]
    prompt = half + [rng.randrange(32000) for _ in range(args.prompt_tokens - len(half))]
    ids = list(heads)
    views = [WorkerView(wid, 0, 0, True, True) for wid in ids]
    hashes = list(range(args.prompt_tokens // 64))
    if args.gc_freeze:
        gc.freeze()  # the index's containers leave the collector's generations
    collections: list[tuple[int, float]] = []  # (generation, seconds) of each GC pass
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        else:
            collections.append((info["generation"], time.perf_counter() - started.pop()))

    gc.callbacks.append(on_gc)
    samples: list[tuple[float, float, list[tuple[int, float]]]] = []  # wall, CPU, GC passes
    key_times: list[float] = []
    chosen = ""
    try:
        for _ in range(args.decisions):
            t0 = time.perf_counter()
            block_keys(prompt, BLOCK)
            t1 = time.perf_counter()
            c1, n1 = time.thread_time(), len(collections)
            cached = index.overlap_tokens(ids, prompt)
            precise = PreciseOverlap(len(prompt), cached)
            chosen = choose_worker(RouterMode.KV, views, rng=rng, hashes=hashes, precise=precise)
            t2, c2 = time.perf_counter(), time.thread_time()
            key_times.append(t1 - t0)
            samples.append((t2 - t1, c2 - c1, collections[n1:]))
    finally:
        gc.callbacks.remove(on_gc)
    assert chosen == holder, (chosen, holder)
    times = sorted(wall for wall, _, _ in samples)
    median = statistics.median(times)
    p99 = times[int(len(times) * 0.99) - 1]
    print(
        f"decision over {args.workers} workers, {args.prompt_tokens}-token prompt: "
        f"median {median * 1e6:.0f} µs, p99 {p99 * 1e6:.0f} µs, max {times[-1] * 1e6:.0f} µs "
        f"(the prompt's {len(prompt) // BLOCK} keys alone: median "
        f"{statistics.median(key_times) * 1e6:.0f} µs)"
    )
    describe_outliers(samples, median, p99)


def describe_outliers(
    samples: list[tuple[float, float, list[tuple[int, float]]]], median: float, p99: float
) -> None:
    """What the decisions at or above the p99 have in common: a garbage-collector pass inside
    them, or wall time the thread did not run (the OS ran another process), or neither."""
    slow = [s for s in samples if s[0] >= max(p99, 2 * median)]
    with_gc = [s for s in slow if s[2]]
    preempted = [s for s in slow if not s[2] and s[0] - s[1] > median]
    print(f"decisions at or above the p99 (and 2x the median): {len(slow)}")
    for wall, cpu, passes in sorted(slow, reverse=True)[:5]:
        gcs = ", ".join(f"gen{g} {d * 1e6:.0f} µs" for g, d in passes) or "no GC"
        print(f"  {wall * 1e6:.0f} µs wall, {cpu * 1e6:.0f} µs thread CPU; {gcs}")
    print(
        f"  of which a GC pass inside: {len(with_gc)}; no GC but wall - CPU > median "
        f"(not running): {len(preempted)}; neither: {len(slow) - len(with_gc) - len(preempted)}"
    )
    passes = [p for _, _, ps in samples for p in ps]
    for gen in (0, 1, 2):
        durations = sorted(d for g, d in passes if g == gen)
        if durations:
            print(
                f"  gen{gen} passes during the decisions: {len(durations)}, median "
                f"{statistics.median(durations) * 1e6:.0f} µs, max {durations[-1] * 1e6:.0f} µs"
            )


def bench_intake(args: argparse.Namespace) -> None:
    rng = random.Random(1)
    payloads = []
    for i in range(args.batches):
        tokens = [rng.randrange(32000) for _ in range(4 * BLOCK)]
        hashes: list[int | bytes] = [4 * i + j for j in range(4)]
        removed: list[int | bytes] = [4 * (i - 100) + j for j in range(4)] if i >= 100 else []
        events: list[KvEvent] = [BlockStored(hashes, None, tokens, BLOCK), BlockRemoved(removed)]
        payloads.append(encode_batch(0.0, events))
    index = KvBlockIndex()
    start = time.perf_counter()
    for payload in payloads:
        index.apply("w", decode_batch(payload).events)
    took = time.perf_counter() - start
    count = 2 * args.batches
    print(
        f"intake: {args.batches} batches ({count} events, {4 * args.batches} blocks stored) "
        f"in {took:.2f} s: {count / took:,.0f} events/s, {took / args.batches * 1e6:.1f} µs/batch"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--blocks", type=int, default=100_000)
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument(
        "--gc-freeze", action="store_true", help="gc.freeze() the filled index before deciding"
    )
    parser.add_argument("--batches", type=int, default=50_000)
    args = parser.parse_args()
    bench_intake(args)
    bench_decision(args)


if __name__ == "__main__":
    main()
