"""The simulated KV cache: a fixed pool of blocks with prefix caching.

A sequence's KV lives in blocks of ``block_size`` tokens. A block whose tokens are all computed
is *full*; with prefix caching on, a full block is registered under a hash of its token ids
chained with the hash of the block before it, so a hash names a whole prefix, not just the
block's own tokens. A later sequence whose prompt starts with the same full blocks finds them by
hash and shares them instead of recomputing them.

Each block has a reference count (how many running sequences hold it). A block released by its
last holder is *free*: if it is registered it stays in the cache, in an LRU queue, and can still
be hit; otherwise it goes to a plain free list. Allocation takes plain free blocks first and only
then evicts the least recently freed cached block (dropping its hash), so the cache keeps as
much as the load allows. A sequence releases its blocks tail first, so under pressure the ends
of prompts are evicted before the shared beginnings.

"Used" blocks are those with a reference: that is the KV utilisation the decode time depends
on, and what an operator would call occupancy. Free cached blocks count as free.

A :class:`KvListener` set as ``listener`` hears every change of the cache's contents (a hash
registered, a hash evicted), as vLLM's ``BlockStored`` / ``BlockRemoved`` events report them:
:mod:`.events` publishes them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Protocol


class KvListener(Protocol):
    """Hears the prefix cache change (called synchronously, inside the scheduler's pass)."""

    def stored(self, block_hash: int, parent_hash: int | None, token_ids: Sequence[int]) -> None:
        """A full block was registered under ``block_hash``, chained to ``parent_hash``."""

    def removed(self, block_hash: int) -> None:
        """The block registered under ``block_hash`` was evicted."""


class BlockPool:
    """A fixed number of KV blocks, with reference counts and an LRU prefix cache."""

    __slots__ = (
        "_cache",
        "_free_cached",
        "_free_uncached",
        "_hash",
        "_ref",
        "enable_caching",
        "listener",
        "num_blocks",
    )

    def __init__(self, num_blocks: int, *, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        # A stack, so block 0 is handed out first (predictable in tests and logs).
        self._free_uncached = list(range(num_blocks - 1, -1, -1))
        # Free but still cached blocks, least recently freed first.
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._cache: dict[int, int] = {}
        self.listener: KvListener | None = None

    @property
    def num_free(self) -> int:
        """Blocks with no holder (plain free and evictable cached)."""
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (held or free)."""
        return len(self._cache)

    def lookup(self, hashes: Iterable[int]) -> list[int]:
        """The blocks of the longest cached prefix of ``hashes`` (chained block hashes)."""
        hits: list[int] = []
        if not self.enable_caching:
            return hits
        cache = self._cache
        for h in hashes:
            block = cache.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def count_free(self, blocks: Iterable[int]) -> int:
        """How many of ``blocks`` are free now (taking them uses free capacity)."""
        ref = self._ref
        return sum(1 for b in blocks if ref[b] == 0)

    def acquire(self, blocks: Iterable[int]) -> None:
        """Take a reference on already cached blocks (prefix-cache hits)."""
        ref = self._ref
        for b in blocks:
            if ref[b] == 0:
                del self._free_cached[b]
            ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` fresh blocks, evicting least recently freed cached blocks if needed."""
        if n > self.num_free:
            raise ValueError(f"cannot allocate {n} KV blocks, {self.num_free} free")
        out: list[int] = []
        for _ in range(n):
            if self._free_uncached:
                block = self._free_uncached.pop()
            else:
                block, _ = self._free_cached.popitem(last=False)
                h = self._hash[block]
                if h is not None:
                    del self._cache[h]
                    self._hash[block] = None
                    if self.listener is not None:
                        self.listener.removed(h)
            self._ref[block] = 1
            out.append(block)
        return out

    def register(
        self,
        block: int,
        block_hash: int,
        parent_hash: int | None = None,
        token_ids: Sequence[int] = (),
    ) -> None:
        """Publish a full block under its chained hash (first registration of a hash wins).

        ``parent_hash`` (the previous block's hash, None for a first block) and ``token_ids``
        (the block's tokens) are only for the listener."""
        if not self.enable_caching or self._hash[block] is not None or block_hash in self._cache:
            return
        self._cache[block_hash] = block
        self._hash[block] = block_hash
        if self.listener is not None:
            self.listener.stored(block_hash, parent_hash, token_ids)

    def cached_hashes(self) -> list[int]:
        """Every hash in the prefix cache (held or free), in no particular order."""
        return list(self._cache)

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block, tail first."""
        ref = self._ref
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] == 0:
                if self._hash[b] is not None:
                    self._free_cached[b] = None
                else:
                    self._free_uncached.append(b)
