"""Recency order in plain dicts: touch, the trim past a bound, and that the GC never tracks it."""

from __future__ import annotations

import gc

from dynamo_llm.protocols.kv_events import BlockStored
from dynamo_llm.router.kv_blocks import KvBlockIndex
from dynamo_llm.router.kv_index import KvIndex
from dynamo_llm.router.lru import touch, trim_oldest


def test_touch_makes_a_key_the_most_recent_and_the_trim_drops_the_oldest() -> None:
    d = {1: "a", 2: "b", 3: "c"}
    touch(d, 1, "A")
    assert list(d.items()) == [(2, "b"), (3, "c"), (1, "A")]
    assert trim_oldest(d, 3) == []
    touch(d, 4, "d")
    assert trim_oldest(d, 3) == [(2, "b")]
    assert list(d) == [3, 1, 4]


def test_a_large_bound_trims_a_few_percent_below_it_at_once() -> None:
    d = dict.fromkeys(range(1000))
    touch(d, 1000, None)
    dropped = trim_oldest(d, 1000)
    assert [k for k, _ in dropped] == list(range(32))  # 1 over, and 1000 // 32 more
    assert len(d) == 1000 - 31
    assert trim_oldest(d, 1000) == []


def test_the_indexes_entries_are_invisible_to_the_garbage_collector() -> None:
    blocks = KvBlockIndex(max_blocks=50)
    for i in range(100):
        blocks.apply("w", [BlockStored([i, b"h%d" % i], None, [i, i, i, i], 2)])
    approximate = KvIndex(max_blocks_per_worker=50)
    approximate.record("w", list(range(100)))
    gc.collect()
    entry = blocks.get("w")
    assert entry is not None and len(entry) <= 50
    # The internals on purpose: what a collection walks is what this guards.
    assert not gc.is_tracked(entry._keys)
    assert not gc.is_tracked(entry._by_hash)
    assert not gc.is_tracked(approximate._cached["w"])
