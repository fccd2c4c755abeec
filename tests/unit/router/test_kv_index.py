"""The KV prefix index: chained block hashes, stable across processes, and a bounded index of
which worker has cached which prefix."""

from __future__ import annotations

import hashlib

import pytest

from dynamo_llm.router import (
    KvIndex,
    block_hashes,
)


def test_block_hashes_chain_so_equal_prefixes_share_leading_hashes() -> None:
    base = "s" * 1024
    a = block_hashes(base + "alpha" * 100, 256)
    b = block_hashes(base + "beta" * 100, 256)
    assert a[:4] == b[:4]
    assert a[4] != b[4]
    # Chained: equal chunks at different positions hash differently.
    same = block_hashes("z" * 1024, 256)
    assert len(set(same)) == 4


def test_block_hashes_count_the_partial_last_block_and_are_stable() -> None:
    assert block_hashes("") == []
    assert len(block_hashes("x" * 256)) == 1
    assert len(block_hashes("x" * 257)) == 2
    assert len(block_hashes("x" * 10, block_chars=3)) == 4
    # blake2b, not the per-process salted hash(): the value is the same in every process.
    assert block_hashes("hello", 256) == [0x7D34E501_A8EDB6A7]
    two = hashlib.blake2b(b"ab", digest_size=8).digest()
    assert block_hashes("ab", 1)[1] == int.from_bytes(two, "little")
    with pytest.raises(ValueError):
        block_hashes("x", 0)


def test_kv_index_overlap_is_the_cached_leading_prefix() -> None:
    index = KvIndex()
    hashes = block_hashes("r" * 256 * 6)
    assert index.overlap("w0", hashes) == 0
    index.record("w0", hashes[:4])
    assert index.overlap("w0", hashes) == 4
    assert index.overlap("w0", hashes[:2]) == 2
    assert index.overlap("w1", hashes) == 0
    other = block_hashes("u" * 256 * 6)
    assert index.overlap("w0", other) == 0
    index.remove_worker("w0")
    assert index.overlap("w0", hashes) == 0
    assert index.cached_blocks("w0") == 0


def test_kv_index_is_bounded_and_evicts_prefix_tails_first() -> None:
    index = KvIndex(max_blocks_per_worker=10)
    first = block_hashes("a" * 256 * 8)
    second = block_hashes("b" * 256 * 6)
    index.record("w0", first)
    index.record("w0", second)
    assert index.cached_blocks("w0") == 10
    assert index.overlap("w0", second) == 6
    # The oldest prompt lost its last four blocks, not its first ones.
    assert index.overlap("w0", first) == 4
    # Re-recording refreshes it.
    index.record("w0", first)
    assert index.overlap("w0", first) == 8
    assert index.cached_blocks("w0") == 10
    with pytest.raises(ValueError):
        KvIndex(0)
