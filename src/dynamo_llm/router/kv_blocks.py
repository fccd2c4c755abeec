"""A precise index of each worker's KV cache, fed by the engine's own KV events.

Where :mod:`.kv_index` guesses from the text this frontend routed, :class:`KvBlockIndex` is told:
every ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` a worker publishes
(:mod:`dynamo_llm.protocols.kv_events`) is applied to that worker's entry, so every frontend that
follows the same events holds the same view, whoever routed the traffic.

Keys come from token ids, not from the engine's block hashes: a block's key is
:func:`chain_key` of its parent's key and its ``block_size`` token ids, so the frontend can
compute a prompt's keys itself (:func:`block_keys`) without knowing the engine's hash function or
seed. The engine's hashes are kept only to translate a later ``BlockRemoved`` (and a child's
``parent_block_hash``) into keys. A ``BlockStored`` whose parent the index does not know (its
events were missed) cannot be keyed, and is counted in :attr:`WorkerBlocks.unkeyed`.

The key is Python's ``hash()`` of a tuple of ints, which is not salted (only ``str`` and
``bytes`` hashes are), so two frontends compute the same keys; it costs about 0.1 µs per token.

Each worker's entry is bounded (``max_blocks``, 100k by default; ``bench/bench_kv_index.py``
measured about 22 MB of peak resident memory per 100k blocks): past it the oldest stored blocks
are dropped (a few percent at once, :mod:`.lru`), which can only make the index predict less
than the worker holds. The entries are in plain dicts of ints, which the garbage collector
never walks (an ``OrderedDict`` of 10M blocks cost a collection half a second).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice

from ..protocols.kv_events import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, KvEvent
from .lru import touch, trim_oldest

DEFAULT_MAX_BLOCKS = 100_000
_ROOT = 0x5BD1E995  # the "parent key" of a first block


@dataclass(frozen=True, slots=True)
class KvEventSource:
    """Where a worker publishes its KV events."""

    endpoint: str
    replay_endpoint: str | None = None
    block_size: int | None = None


def chain_key(parent: int | None, token_ids: Sequence[int]) -> int:
    """The key of a block: its parent's key (None for a first block) chained with its tokens."""
    return hash((_ROOT if parent is None else parent, *token_ids))


def block_keys(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The keys of the full blocks of ``token_ids`` (a partial last block has none)."""
    prompt = PromptKeys(token_ids, block_size)
    prompt.extend(prompt.total)
    return prompt.keys


class PromptKeys:
    """A prompt's block keys for one block size, computed only as far as some worker matches.

    One routing decision makes one per block size and every worker's :meth:`WorkerBlocks.match`
    reads the same list, extending it when a worker holds every key computed so far: the keys
    are computed once per decision, and only up to a little past the longest cached prefix. A
    prompt no worker holds costs its first few keys, not all of them (a 100k-token prompt has
    6 250 blocks of 16, about 1.5 ms of keys)."""

    __slots__ = ("_tokens", "block_size", "keys", "total")

    def __init__(self, token_ids: Sequence[int], block_size: int) -> None:
        self._tokens = token_ids
        self.block_size = block_size
        self.total = len(token_ids) // block_size
        """How many full blocks the prompt has (the most keys it can have)."""
        self.keys: list[int] = []
        """The keys computed so far, from the first block."""

    def extend(self, n: int) -> None:
        """Compute the keys up to the ``n``-th (or the last full block)."""
        keys, tokens, bs = self.keys, self._tokens, self.block_size
        parent = keys[-1] if keys else _ROOT
        for start in range(len(keys) * bs, min(n, self.total) * bs, bs):
            parent = hash((parent, *tokens[start : start + bs]))  # chain_key, inlined
            keys.append(parent)


_FIRST_KEYS = 16  # keys computed before the first worker is matched


class WorkerBlocks:
    """One worker's cached blocks: keys in store order, and the engine's hash of each."""

    __slots__ = ("_by_hash", "_keys", "block_size", "max_blocks", "unkeyed")

    def __init__(self, block_size: int | None, max_blocks: int) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks
        self._keys: dict[int, BlockHash] = {}  # key -> engine hash, in store order (.lru)
        self._by_hash: dict[BlockHash, int] = {}  # engine hash -> key
        self.unkeyed = 0

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> Iterable[int]:
        return self._keys.keys()

    def engine_hashes(self) -> set[BlockHash]:
        return set(self._by_hash)

    def apply(self, event: KvEvent) -> None:
        if isinstance(event, BlockStored):
            self._store(event)
        elif isinstance(event, BlockRemoved):
            for h in event.block_hashes:
                key = self._by_hash.pop(h, None)
                if key is not None:
                    self._keys.pop(key, None)
        elif isinstance(event, AllBlocksCleared):
            self.clear()

    def clear(self) -> None:
        self._keys.clear()
        self._by_hash.clear()

    def match(self, prompt: PromptKeys) -> int:
        """How many leading blocks of ``prompt`` the worker holds, extending its keys as far
        as needed (a quarter past what is computed, at least ``_FIRST_KEYS`` more)."""
        cached = self._keys
        n = 0
        while True:
            for k in islice(prompt.keys, n, None):
                if k not in cached:
                    return n
                n += 1
            if n >= prompt.total:
                return n
            prompt.extend(n + max(_FIRST_KEYS, n // 4))

    def _store(self, event: BlockStored) -> None:
        bs = event.block_size
        if bs <= 0 or len(event.token_ids) != bs * len(event.block_hashes):
            self.unkeyed += len(event.block_hashes)
            return
        if self.block_size is None:
            self.block_size = bs
        elif bs != self.block_size:
            self.unkeyed += len(event.block_hashes)
            return
        parent_hash = event.parent_block_hash
        parent: int | None = None
        if parent_hash is not None:
            parent = self._by_hash.get(parent_hash)
            if parent is None:
                self.unkeyed += len(event.block_hashes)
                return
        tokens = event.token_ids
        keys, by_hash = self._keys, self._by_hash
        for i, h in enumerate(event.block_hashes):
            parent = chain_key(parent, tokens[i * bs : (i + 1) * bs])
            old = by_hash.get(h)
            if old is not None and old != parent:
                keys.pop(old, None)
            by_hash[h] = parent
            touch(keys, parent, h)
        for _key, h in trim_oldest(keys, self.max_blocks):
            by_hash.pop(h, None)


class KvBlockIndex:
    """Per worker, the blocks its KV events say it caches."""

    __slots__ = ("_workers", "max_blocks")

    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        if max_blocks <= 0:
            raise ValueError("max_blocks must be positive")
        self.max_blocks = max_blocks
        self._workers: dict[str, WorkerBlocks] = {}

    def worker(self, worker_id: str, block_size: int | None = None) -> WorkerBlocks:
        """The worker's entry, made empty when it has none."""
        entry = self._workers.get(worker_id)
        if entry is None:
            entry = self._workers[worker_id] = WorkerBlocks(block_size, self.max_blocks)
        return entry

    def get(self, worker_id: str) -> WorkerBlocks | None:
        return self._workers.get(worker_id)

    def apply(self, worker_id: str, events: Iterable[KvEvent]) -> None:
        entry = self.worker(worker_id)
        for event in events:
            entry.apply(event)

    def clear(self, worker_id: str) -> None:
        entry = self._workers.get(worker_id)
        if entry is not None:
            entry.clear()

    def remove_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def overlap_tokens(self, worker_ids: Iterable[str], token_ids: Sequence[int]) -> dict[str, int]:
        """For each worker with a known block size, the prompt tokens it would find cached.

        Whole leading blocks, and never the prompt's last token (an engine always computes at
        least one, as vLLM and the mocker do). The prompt's keys are computed once per block
        size for all the workers (:class:`PromptKeys`), and only as far as one matches."""
        out: dict[str, int] = {}
        prompts: dict[int, PromptKeys] = {}
        usable = token_ids[: max(0, len(token_ids) - 1)]
        for worker_id in worker_ids:
            entry = self._workers.get(worker_id)
            if entry is None or entry.block_size is None:
                continue
            bs = entry.block_size
            prompt = prompts.get(bs)
            if prompt is None:
                prompt = prompts[bs] = PromptKeys(usable, bs)
            out[worker_id] = entry.match(prompt) * bs
        return out

    def workers(self) -> tuple[str, ...]:
        return tuple(self._workers)
