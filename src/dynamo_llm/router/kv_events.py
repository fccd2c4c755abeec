"""KV event intake: one ZMQ subscriber per worker feeding the :class:`~.kv_blocks.KvBlockIndex`.

A worker that advertises a KV event endpoint (its etcd record, or its ``--upstream-file``
entry) gets a :class:`KvEventSubscriber`: a SUB socket on the engine's PUB endpoint and, for
missed batches, a DEALER on its ROUTER replay endpoint (wire format in
:mod:`dynamo_llm.protocols.kv_events`). The subscriber keeps the next sequence it expects:

- on start it asks for a replay from 0, so a frontend started after the cache was warm learns
  it (as far as the engine's replay buffer reaches);
- a batch past the expected one is a **gap** (``router_kv_event_gaps_total``): the missing
  batches are replayed; when the replay cannot supply them (no replay endpoint, no answer, or
  the engine's buffer no longer holds them) the worker's entries are **reset** (cleared) and the
  index follows the stream from there, a subset of the truth rather than a wrong superset;
- a batch before the expected one means the engine restarted (its numbering starts over): the
  entries are cleared (a restarted mocker also opens with ``AllBlocksCleared``).

The worker is *precise* (``router_kv_mode{worker} = 1``) once a consistent stream is being
followed, and for as long as its publisher is known to be alive. vLLM sends nothing while it is
idle (no heartbeat; its publisher thread only polls its ROUTER socket for replay requests), so
silence alone cannot mean "gone". The rule, checked on the injected clock:

- after ``silence`` seconds (default 5) with no batch, the subscriber asks the replay endpoint
  for everything from the next expected sequence. An answer (an idle engine's is the bare
  end-of-replay marker) proves the publisher alive and brings any batch the live stream lost
  silently: the worker stays precise, and the next check is ``silence`` seconds later;
- no answer within the replay timeout: the publisher hung or the path to it broke, and the
  entries may be stale. The worker turns *approximate* (``router_kv_mode`` 0, ``kv_mode`` in
  ``/health``): routing guesses for it, as for a worker without events. Its entries are kept,
  the check repeats every ``silence`` seconds, and when the publisher answers again (or a batch
  arrives) the replay from the expected sequence re-syncs it (a reset first, when the engine's
  buffer no longer reaches back that far) and it is precise again;
- a worker without a replay endpoint cannot be asked: its silence is taken for idleness, as
  before (it stays precise).

Batches are decoded and applied synchronously, a few microseconds per event, so the
loop never waits on the index; only a replay waits (on the socket), and only in this worker's
task.

:class:`KvEventIntake` owns the subscribers: :meth:`KvEventIntake.reconcile` (called whenever
the fleet changes) starts one for each worker with an endpoint, and stops the subscriber of a
worker that left or changed endpoint, dropping its index entry.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable, Sequence

import zmq
import zmq.asyncio

from ..metrics import Metrics
from ..protocols.kv_events import (
    END_OF_REPLAY,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    decode_batch,
    decode_sequence,
    encode_sequence,
)
from ..runtime.clock import Clock, SystemClock
from ..runtime.tasks import cancel_and_wait
from .kv_blocks import KvBlockIndex, KvEventSource
from .policies import PreciseOverlap

log = logging.getLogger("dynamo_llm.router.kv_events")

DEFAULT_REPLAY_TIMEOUT = 2.0
DEFAULT_SILENCE = 5.0
"""Seconds without a batch after which a worker's publisher is asked whether it is alive."""
_YIELD_EVERY = 64  # replayed batches applied between two turns of the event loop
_EVENT_NAMES = {
    BlockStored: "stored",
    BlockRemoved: "removed",
    AllBlocksCleared: "cleared",
}


class KvEventSubscriber:
    """Follows one worker's KV events into ``index`` (see the module docstring)."""

    def __init__(
        self,
        worker_id: str,
        source: KvEventSource,
        index: KvBlockIndex,
        ctx: zmq.asyncio.Context,
        *,
        metrics: Metrics | None = None,
        replay_timeout: float = DEFAULT_REPLAY_TIMEOUT,
        clock: Clock | None = None,
        silence: float = DEFAULT_SILENCE,
    ) -> None:
        self.worker_id = worker_id
        self.source = source
        self._index = index
        self._ctx = ctx
        self._metrics = metrics
        self._replay_timeout = replay_timeout
        self._clock = clock if clock is not None else SystemClock()
        self._silence = silence
        self.heard_at = self._clock.now()
        """When (clock time) the publisher last proved alive: a batch, or a replay's answer."""
        self._lock = asyncio.Lock()  # one of the live stream and the silence check at a time
        self.is_silent = False
        """True while the publisher has not answered a liveness check (see the module doc)."""
        self.silences = 0
        self._dealer: zmq.asyncio.Socket | None = None
        self.expected: int | None = None
        """The next sequence number expected; None until a consistent stream is followed."""
        self._last_live: int | None = None  # the last sequence seen on the live (SUB) stream
        self.gaps = 0
        self.resets = 0
        self.batches = 0
        index.worker(worker_id, source.block_size)

    @property
    def is_precise(self) -> bool:
        return self.expected is not None and not self.is_silent

    async def run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.source.endpoint)
        watch: asyncio.Task[None] | None = None
        try:
            async with self._lock:
                await self._catch_up(0)
            if self.source.replay_endpoint is not None:
                watch = asyncio.get_running_loop().create_task(self._watch_silence())
                watch.add_done_callback(_log_crash)
            while True:
                frames = await sub.recv_multipart()
                if len(frames) != 3:
                    log.warning(
                        "worker %s: ignoring a KV message of %d frames", self.worker_id, len(frames)
                    )
                    continue
                try:
                    seq = decode_sequence(frames[1])
                except ValueError as exc:
                    log.warning("worker %s: bad KV event sequence: %s", self.worker_id, exc)
                    continue
                async with self._lock:
                    await self._receive(seq, frames[2])
        finally:
            if watch is not None:
                await cancel_and_wait(watch)
            sub.close()
            if self._dealer is not None:
                self._dealer.close()
                self._dealer = None
            self._set_mode()

    async def _receive(self, seq: int, payload: bytes) -> None:
        self._heard_from()
        last_live, self._last_live = self._last_live, seq
        expected = self.expected
        if expected is not None and seq < expected and (last_live is None or seq > last_live):
            return  # queued behind a replay that already brought it
        if expected is not None and seq < expected:
            log.info(
                "worker %s: KV event sequence went back (%d < %d): the engine restarted",
                self.worker_id,
                seq,
                expected,
            )
            self._reset()
            expected = None
        if seq > (expected if expected is not None else 0):
            if expected is not None:
                self.gaps += 1
                if self._metrics is not None:
                    self._metrics.router_kv_event_gaps_total.labels(self.worker_id).inc()
                log.info(
                    "worker %s: KV events %d..%d missed; replaying",
                    self.worker_id,
                    expected,
                    seq - 1,
                )
            await self._catch_up(expected if expected is not None else 0)
            if self.expected is not None:
                if seq < self.expected:
                    return  # the replay brought this batch already
                if seq > self.expected:
                    self._reset()  # the missing batches are gone: follow from here
        self._apply(seq, payload)

    async def _watch_silence(self) -> None:
        clock = self._clock
        asked_at = -math.inf  # the last check that had no answer
        while True:
            due = max(self.heard_at, asked_at) + self._silence
            if clock.now() < due:
                await clock.sleep(due - clock.now())
                continue
            async with self._lock:
                if clock.now() < self.heard_at + self._silence:
                    continue  # a batch arrived while this check waited for the lock
                answered = await self._catch_up(self.expected if self.expected is not None else 0)
                if not answered:
                    asked_at = clock.now()  # ask again one silence from now
                    if not self.is_silent:
                        self.is_silent = True
                        self.silences += 1
                        if self._metrics is not None:
                            self._metrics.router_kv_event_silences_total.labels(
                                self.worker_id
                            ).inc()
                        log.warning(
                            "worker %s: no KV events for %gs and no answer to a replay "
                            "request: routing it approximately until its publisher answers",
                            self.worker_id,
                            self._silence,
                        )
                        self._set_mode()

    async def _catch_up(self, start: int) -> bool:
        """Apply the replayed batches from ``start`` on; whether the engine answered. A replay
        that skips batches (the engine no longer holds them) resets the worker's entries
        first; without any state yet, what the engine still holds is learned as it is."""
        replayed = await self._replay(start)
        if replayed is None:
            return False
        self.heard_at = self._clock.now()
        for n, (seq, payload) in enumerate(replayed):
            if n and n % _YIELD_EVERY == 0:
                await asyncio.sleep(0)  # a long replay must not hold the loop
            if self.expected is not None:
                if seq < self.expected:
                    continue
                if seq > self.expected:
                    self._reset()
            self._apply(seq, payload)
        self._heard_from()  # precise again only once the replay is applied
        return True

    def _heard_from(self) -> None:
        self.heard_at = self._clock.now()
        if self.is_silent:
            self.is_silent = False
            log.info("worker %s: its KV event publisher answers again", self.worker_id)
            self._set_mode()

    async def _replay(self, start: int) -> list[tuple[int, bytes]] | None:
        endpoint = self.source.replay_endpoint
        if endpoint is None:
            return None
        if self._dealer is None:
            self._dealer = self._ctx.socket(zmq.DEALER)
            self._dealer.setsockopt(zmq.LINGER, 0)
            self._dealer.connect(endpoint)
        dealer = self._dealer
        out: list[tuple[int, bytes]] = []
        try:
            async with asyncio.timeout(self._replay_timeout):
                await dealer.send_multipart((b"", encode_sequence(start)))
                while True:
                    frames = await dealer.recv_multipart()
                    # [b"", seq, payload], or with the topic, [b"", topic, seq, payload] (vLLM
                    # 0.32: its end marker is [b"", b"", -1, b""]).
                    if len(frames) not in (3, 4) or frames[0]:
                        continue
                    seq = decode_sequence(frames[-2])
                    if seq == END_OF_REPLAY:
                        return out
                    out.append((seq, frames[-1]))
        except TimeoutError:
            log.warning(
                "worker %s: no KV event replay from %s within %gs",
                self.worker_id,
                endpoint,
                self._replay_timeout,
            )
        except ValueError as exc:
            log.warning("worker %s: bad KV event replay: %s", self.worker_id, exc)
        # A late answer must not be read as the next replay's: start over with a new socket.
        dealer.close()
        self._dealer = None
        return None

    def _apply(self, seq: int, payload: bytes) -> None:
        try:
            batch = decode_batch(payload)
        except ValueError as exc:
            log.warning("worker %s: undecodable KV event batch %d: %s", self.worker_id, seq, exc)
            self.expected = seq + 1
            return
        entry = self._index.worker(self.worker_id, self.source.block_size)
        metrics = self._metrics
        for event in batch.events:
            entry.apply(event)
            if metrics is not None:
                name = _EVENT_NAMES[type(event)]
                metrics.router_kv_events_total.labels(self.worker_id, name).inc()
        self.batches += 1
        was_precise = self.expected is not None
        self.expected = seq + 1
        if not was_precise:
            self._set_mode()

    def _reset(self) -> None:
        self.resets += 1
        self._index.clear(self.worker_id)
        self.expected = None
        self._set_mode()

    def _set_mode(self) -> None:
        if self._metrics is not None:
            self._metrics.router_kv_mode.labels(self.worker_id).set(1 if self.is_precise else 0)


class KvEventIntake:
    """The subscribers of a fleet's workers, kept in line with the fleet by :meth:`reconcile`."""

    def __init__(
        self,
        index: KvBlockIndex,
        *,
        metrics: Metrics | None = None,
        replay_timeout: float = DEFAULT_REPLAY_TIMEOUT,
        clock: Clock | None = None,
        silence: float = DEFAULT_SILENCE,
    ) -> None:
        self.index = index
        self._metrics = metrics
        self._replay_timeout = replay_timeout
        self._clock = clock if clock is not None else SystemClock()
        self._silence = silence
        self._ctx = zmq.asyncio.Context()
        self._subscribers: dict[str, tuple[KvEventSubscriber, asyncio.Task[None]]] = {}
        self._lock = asyncio.Lock()

    def subscriber(self, worker_id: str) -> KvEventSubscriber | None:
        entry = self._subscribers.get(worker_id)
        return entry[0] if entry is not None else None

    def precise_workers(self) -> set[str]:
        return {wid for wid, (sub, _task) in self._subscribers.items() if sub.is_precise}

    def mode(self, worker_id: str) -> str:
        """``precise`` while the worker's events are followed consistently, else
        ``approximate`` (the kv mode guesses from the traffic routed there)."""
        sub = self.subscriber(worker_id)
        return "precise" if sub is not None and sub.is_precise else "approximate"

    def predict(self, token_ids: Sequence[int], worker_ids: Iterable[str]) -> PreciseOverlap | None:
        """The cached prompt tokens on each of ``worker_ids`` whose events flow; None when
        none does."""
        precise = [
            wid
            for wid in worker_ids
            if (entry := self._subscribers.get(wid)) is not None and entry[0].is_precise
        ]
        if not precise:
            return None
        return PreciseOverlap(len(token_ids), self.index.overlap_tokens(precise, token_ids))

    async def reconcile(self, sources: Iterable[tuple[str, KvEventSource | None]]) -> None:
        """Subscribe to each worker's source; stop (and forget) the rest."""
        async with self._lock:
            wanted = {wid: src for wid, src in sources if src is not None}
            for wid, (sub, task) in list(self._subscribers.items()):
                if wanted.get(wid) != sub.source:
                    await self._stop(wid, sub, task)
            for wid, src in wanted.items():
                if wid not in self._subscribers:
                    sub = KvEventSubscriber(
                        wid,
                        src,
                        self.index,
                        self._ctx,
                        metrics=self._metrics,
                        replay_timeout=self._replay_timeout,
                        clock=self._clock,
                        silence=self._silence,
                    )
                    task = asyncio.get_running_loop().create_task(sub.run())
                    task.add_done_callback(_log_crash)
                    self._subscribers[wid] = (sub, task)
                    log.info("worker %s: following its KV events on %s", wid, src.endpoint)

    async def aclose(self) -> None:
        async with self._lock:
            for wid, (sub, task) in list(self._subscribers.items()):
                await self._stop(wid, sub, task)
        self._ctx.term()

    async def _stop(self, wid: str, sub: KvEventSubscriber, task: asyncio.Task[None]) -> None:
        del self._subscribers[wid]
        await cancel_and_wait(task)
        self.index.remove_worker(wid)
        if self._metrics is not None:
            self._metrics.router_kv_mode.remove(wid)
            self._metrics.router_kv_event_gaps_total.remove(wid)
            self._metrics.router_kv_event_silences_total.remove(wid)
            for name in _EVENT_NAMES.values():
                self._metrics.router_kv_events_total.remove(wid, name)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("KV event subscriber failed", exc_info=task.exception())
