"""The event-fed block index: keys from token ids, removals by the engine's hashes, bounds."""

from __future__ import annotations

import random

import pytest

from dynamo_llm.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from dynamo_llm.router.kv_blocks import KvBlockIndex, PromptKeys, block_keys, chain_key
from dynamo_llm.router.policies import PreciseOverlap, RouterMode, WorkerView, choose_worker


def test_block_keys_chain_full_blocks_and_ignore_a_partial_one() -> None:
    keys = block_keys([1, 2, 3, 4, 5], 2)
    assert keys == [chain_key(None, [1, 2]), chain_key(keys[0], [3, 4])]
    assert block_keys([9, 2, 3, 4], 2)[1] != keys[1]  # a key names the whole prefix


def test_stored_blocks_are_keyed_from_their_tokens_not_the_engines_hashes() -> None:
    index = KvBlockIndex()
    index.apply("w", [BlockStored([b"h1", b"h2"], None, [1, 2, 3, 4], 2)])
    index.apply("w", [BlockStored([b"h3"], b"h2", [5, 6], 2)])
    assert index.overlap_tokens(["w"], [1, 2, 3, 4, 5, 6, 7]) == {"w": 6}
    # The prompt's last token is always computed: a prompt of exactly the blocks hits one less.
    assert index.overlap_tokens(["w"], [1, 2, 3, 4, 5, 6]) == {"w": 4}


def test_removed_and_cleared_blocks_leave_the_index() -> None:
    index = KvBlockIndex()
    index.apply("w", [BlockStored([1, 2], None, [1, 2, 3, 4], 2), BlockRemoved([2])])
    assert index.overlap_tokens(["w"], [1, 2, 3, 4, 5]) == {"w": 2}
    index.apply("w", [AllBlocksCleared()])
    entry = index.get("w")
    assert entry is not None and len(entry) == 0


def test_each_worker_is_bounded_dropping_its_oldest_blocks() -> None:
    index = KvBlockIndex(max_blocks=3)
    index.apply("w", [BlockStored([1, 2, 3, 4], None, [1, 1, 2, 2, 3, 3, 4, 4], 2)])
    entry = index.get("w")
    assert entry is not None and len(entry) == 3
    assert entry.engine_hashes() == {2, 3, 4}


def test_a_mismatched_block_size_or_unknown_parent_is_counted_not_keyed() -> None:
    index = KvBlockIndex()
    index.worker("w", 2)
    index.apply("w", [BlockStored([1], None, [1, 2, 3, 4], 4), BlockStored([2], 7, [1, 2], 2)])
    entry = index.get("w")
    assert entry is not None and len(entry) == 0 and entry.unkeyed == 2


def test_each_workers_overlap_is_its_longest_cached_prefix_with_keys_computed_once() -> None:
    rng = random.Random(3)
    bs = 2
    prompt = [rng.randrange(50) for _ in range(2 * 90 + 1)]
    keys = block_keys(prompt[:-1], bs)
    index = KvBlockIndex()
    # Workers holding 0, 1, 15-17 (around the first batch of keys), 40, every block of it.
    held = {"none": 0, "one": 1, "a": 15, "b": 16, "c": 17, "d": 40, "all": 90}
    for wid, n in held.items():
        index.worker(wid, bs)
        if n:
            index.apply(wid, [BlockStored(list(range(1, n + 1)), None, prompt[: n * bs], bs)])
    index.apply("other", [BlockStored([1], None, [99, 99], bs)])  # holds something else
    assert index.overlap_tokens([*held, "other"], prompt) == {
        **{wid: n * bs for wid, n in held.items()},
        "other": 0,
    }
    entry = index.get("d")
    assert entry is not None and set(entry.keys()) == set(keys[:40])


def test_a_prompt_no_worker_holds_costs_only_its_first_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    index = KvBlockIndex()
    for wid in ("a", "b", "c"):
        index.apply(wid, [BlockStored([1], None, [7, 7], 2)])
    extended: list[int] = []
    real = PromptKeys.extend

    def extend(self: PromptKeys, n: int) -> None:
        extended.append(n)
        real(self, n)

    monkeypatch.setattr(PromptKeys, "extend", extend)
    assert index.overlap_tokens(["a", "b", "c"], list(range(10_001))) == {"a": 0, "b": 0, "c": 0}
    assert extended == [16]  # once for the three workers, 16 of the prompt's 5 000 keys


def view(worker_id: str) -> WorkerView:
    return WorkerView(worker_id, 0, 0, True, True)


def test_kv_mode_prefers_the_worker_whose_events_say_it_holds_the_prompt() -> None:
    views = [view("a"), view("b"), view("c")]
    hashes = [1, 2, 3, 4]  # the approximation's four blocks: it knows nothing of them
    precise = PreciseOverlap(tokens=256, cached={"a": 0, "b": 192})
    chosen = choose_worker(
        RouterMode.KV, views, rng=random.Random(0), hashes=hashes, precise=precise
    )
    assert chosen == "b"
