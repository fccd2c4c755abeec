"""The mocker's scheduler: vLLM-style passes in simulated time.

One task per engine runs a loop of *passes*. A pass is what one forward step of a real engine
does, and it goes like this:

1. **Schedule running sequences**, oldest first, within the pass's token budget
   (``max_num_batched_tokens``): a decoding sequence computes 1 token; a sequence still in
   (chunked) prefill computes as much of its remaining prompt as the budget allows. Each gets
   the KV blocks its computed tokens need. When the pool is short, the most recently admitted
   running sequence is **preempted** (LIFO, vLLM's default): it frees all its blocks and goes
   back to the front of the waiting queue, to be recomputed later from prompt + generated
   tokens. A sequence that would have to preempt itself is preempted.
2. **Admit waiting sequences** (FIFO), unless something was preempted in this pass, while the
   batch is below ``max_num_seqs`` and budget remains. An admitted sequence first takes the
   longest run of its full blocks found in the prefix cache (never the whole context: at least
   one token is computed, as in vLLM), then blocks for the tokens it computes now. Admission
   never preempts: a sequence that does not fit waits.
3. **Time the pass** (:mod:`.timing`): prefill over the new prompt tokens computed in the pass,
   plus one decode step if any sequence emits at its end, with ``u`` the fraction of blocks in
   use once the pass's blocks are allocated. The loop sleeps on the injected clock until
   ``pass_start + duration``.
4. **Complete the pass**: every scheduled sequence still running gets its tokens marked
   computed, its newly full blocks registered in the prefix cache, and, if it has now computed
   its whole context, emits exactly one token (prefill completion emits the first token).
   A finished sequence frees its blocks at once.

When nothing is waiting or running the loop awaits an event set by :meth:`Scheduler.add`: no
timer, no polling.

Backpressure: a running sequence whose output channel is full (its consumer stopped pulling,
because the frontend's client does not read) is left out of the passes, holding its KV blocks,
until the consumer takes an output again (the channel's ``on_drain`` wakes the loop). When every
running sequence is held that way, the loop waits for that wake-up.

Cancellation (SPEC §10 fix): :meth:`Scheduler.abort` takes a sequence out of the waiting queue
or the running batch and frees its KV blocks immediately, so the next pass can admit into the
freed capacity. If the sequence is part of the pass in flight, that pass finishes (the
simulated GPU is already busy with it) but its results for the sequence are discarded.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

from ...errors import EngineError
from ...runtime.clock import Clock
from .config import MockerConfig
from .kv import BlockPool
from .sequence import SeqStatus, Sequence
from .timing import pass_seconds

log = logging.getLogger(__name__)

# One scheduled sequence in a pass: (sequence, tokens it computes, emits a token at the end).
_Step = tuple[Sequence, int, bool]


@dataclass(frozen=True, slots=True)
class MockerSnapshot:
    """A point-in-time view of a mocker's scheduler, for metrics and tests.

    The prefix-cache hit rate is in **tokens**: of the context tokens looked up when sequences
    were admitted (readmissions after preemption included), the fraction found in the cache.
    """

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    preemptions_total: int
    cancelled_total: int
    finished_total: int
    passes_total: int

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use (0..1)."""
        return self.kv_blocks_used / self.kv_blocks_total

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Cached tokens / looked-up tokens over the engine's life (0 before any lookup)."""
        queried = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / queried if queried else 0.0


class Scheduler:
    """Waiting queue, running batch and KV pool of one simulated engine; see the module doc."""

    def __init__(self, config: MockerConfig, clock: Clock) -> None:
        self._config = config
        self._clock = clock
        self._kv = BlockPool(config.num_gpu_blocks, enable_caching=config.enable_prefix_caching)
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._wakeup = asyncio.Event()
        self._queried_tokens = 0
        self._hit_tokens = 0
        self._preemptions = 0
        self._cancelled = 0
        self._finished = 0
        self._passes = 0
        self.failed = False

    # ---- requests ----------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; it is considered at the next pass."""
        seq.status = SeqStatus.WAITING
        seq.channel.on_drain = self._wakeup.set
        self._waiting.append(seq)
        self._wakeup.set()

    def abort(self, seq: Sequence) -> None:
        """Remove an unfinished sequence now, freeing its blocks, and end its outputs."""
        status = seq.status
        if status is SeqStatus.FINISHED:
            return
        seq.status = SeqStatus.FINISHED
        if status is SeqStatus.RUNNING:
            self._running.remove(seq)
            self._release(seq)
        elif status is SeqStatus.WAITING:
            self._waiting.remove(seq)
        if status is not SeqStatus.NEW:
            self._cancelled += 1
        seq.channel.close()

    def fail_all(self, error: BaseException) -> None:
        """End every queued and running sequence with ``error`` (shutdown, internal failure)."""
        for seq in [*self._running, *self._waiting]:
            seq.status = SeqStatus.FINISHED
            self._release(seq)
            seq.channel.close(error)
        self._running.clear()
        self._waiting.clear()

    @property
    def kv(self) -> BlockPool:
        """The KV block pool (its ``listener`` hears the prefix cache change)."""
        return self._kv

    def snapshot(self) -> MockerSnapshot:
        return MockerSnapshot(
            running=len(self._running),
            waiting=len(self._waiting),
            kv_blocks_used=self._kv.num_used,
            kv_blocks_total=self._kv.num_blocks,
            prefix_cache_queried_tokens=self._queried_tokens,
            prefix_cache_hit_tokens=self._hit_tokens,
            preemptions_total=self._preemptions,
            cancelled_total=self._cancelled,
            finished_total=self._finished,
            passes_total=self._passes,
        )

    # ---- the pass loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Run passes until cancelled. A bug ends every request with an ``EngineError``."""
        clock = self._clock
        try:
            while True:
                start = clock.now()
                steps, prefill_tokens, emits = self._schedule()
                if not steps:
                    if (self._waiting and not self._running) or not all(
                        seq.channel.is_full for seq in self._running
                    ):
                        # Every admitted request fits the pool alone, so this cannot happen;
                        # if it did, idling would hang those requests for ever.
                        raise RuntimeError("a pass scheduled nothing while requests wait")
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                utilisation = self._kv.num_used / self._kv.num_blocks
                duration = pass_seconds(self._config, prefill_tokens, emits, utilisation)
                await clock.sleep(start + duration - clock.now())
                self._passes += 1
                self._complete(steps)
        except Exception:
            log.exception("mocker scheduler failed")
            self.failed = True
            self.fail_all(EngineError("The simulated engine failed"))

    def _schedule(self) -> tuple[list[_Step], int, bool]:
        config = self._config
        kv = self._kv
        bs = config.block_size
        budget = config.max_num_batched_tokens
        chunked = config.enable_chunked_prefill
        running = self._running
        steps: list[_Step] = []
        prefill_tokens = 0
        emits = False
        preempted = False

        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            if seq.is_prefilled and seq.channel.is_full:
                i += 1  # its consumer stopped pulling: it waits, holding its blocks
                continue
            num_new = seq.num_tokens - seq.num_computed
            if not seq.is_prefilled and chunked:
                num_new = min(num_new, budget)
            need = -(-(seq.num_computed + num_new) // bs) - len(seq.blocks)
            while need > kv.num_free:
                preempted = True
                if self._preempt_last() is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break  # it preempted itself: it was the last one
            if need > 0:
                seq.blocks.extend(kv.allocate(need))
            budget -= num_new
            done = seq.num_computed + num_new == seq.num_tokens
            steps.append((seq, num_new, done))
            if not seq.is_prefilled:
                prefill_tokens += num_new
            emits = emits or done
            i += 1

        waiting = self._waiting
        while not preempted and waiting and budget > 0 and len(running) < config.max_num_seqs:
            seq = waiting[0]
            # Cache hits cover whole blocks and leave at least one token to compute.
            hits = kv.lookup(seq.iter_block_hashes((seq.num_tokens - 1) // bs))
            cached = len(hits) * bs
            num_new = seq.num_tokens - cached
            if chunked:
                num_new = min(num_new, budget)
            elif num_new > budget and budget < config.max_num_batched_tokens:
                break  # not chunked: wait for a pass with room (or alone, if it never fits)
            need = -(-(cached + num_new) // bs) - len(hits)
            if need + kv.count_free(hits) > kv.num_free:
                break
            waiting.popleft()
            kv.acquire(hits)
            seq.blocks = hits + kv.allocate(need)
            seq.num_computed = cached
            seq.num_registered = len(hits)
            seq.is_prefilled = False
            if seq.cached_tokens is None:
                seq.cached_tokens = cached
            self._queried_tokens += seq.num_tokens
            self._hit_tokens += cached
            seq.status = SeqStatus.RUNNING
            running.append(seq)
            budget -= num_new
            done = cached + num_new == seq.num_tokens
            steps.append((seq, num_new, done))
            prefill_tokens += num_new
            emits = emits or done
        return steps, prefill_tokens, emits

    def _complete(self, steps: list[_Step]) -> None:
        kv = self._kv
        bs = self._config.block_size
        caching = self._config.enable_prefix_caching
        for seq, num_new, done in steps:
            if seq.status is not SeqStatus.RUNNING:
                continue  # aborted while the pass was in flight
            seq.num_computed += num_new
            if caching:
                full = seq.num_computed // bs
                if full > seq.num_registered:
                    hashes = seq.block_hashes(full)
                    ids = seq.token_ids
                    for j in range(seq.num_registered, full):
                        parent = hashes[j - 1] if j else None
                        kv.register(seq.blocks[j], hashes[j], parent, ids[j * bs : (j + 1) * bs])
                    seq.num_registered = full
            if done:
                seq.is_prefilled = True
                if seq.generate_token():
                    seq.status = SeqStatus.FINISHED
                    self._running.remove(seq)
                    self._release(seq)
                    self._finished += 1
                    seq.channel.close()

    def _preempt_last(self) -> Sequence:
        seq = self._running.pop()
        self._release(seq)
        seq.status = SeqStatus.WAITING
        self._waiting.appendleft(seq)
        self._preemptions += 1
        return seq

    def _release(self, seq: Sequence) -> None:
        if seq.blocks:
            self._kv.free(seq.blocks)
            seq.blocks = []
        seq.num_computed = 0
        seq.num_registered = 0
        seq.is_prefilled = False
