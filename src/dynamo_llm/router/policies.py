"""Routing policies: choose a worker from a snapshot. Pure, synchronous, no I/O.

A policy sees an immutable snapshot of a model's workers (:class:`WorkerView` rows, made by
``WorkerSet.snapshot``) and returns the id of the worker to use. Randomness comes from an
injected ``random.Random`` and round-robin's counter from an explicit :class:`RoundRobin`, so
a seeded test replays a choice exactly. The I/O (dispatch, fault detection) lives around it.

Before any mode runs, the snapshot decides between the two 503s (SPEC §8.2):

- no available worker (none live, or every one quarantined or excluded) →
  :class:`~dynamo_llm.errors.NoWorkersAvailable`;
- available workers, but none free (each at its in-flight limit) →
  :class:`~dynamo_llm.errors.AllWorkersBusy` (load shedding).

A worker's *load* is the engine's own count of running and queued requests at its last scrape
plus what this frontend sent since (``WorkerView.load``, see :class:`~.slot.WorkerLoad`), or the
requests this frontend has in flight on it when the engine reports nothing.

The modes (SPEC §8.1, reference §6.2) choose among the *free* workers:

``round-robin``
    a counter per model over the free workers in snapshot (registration) order.
``random``
    uniform.
``power-of-two``
    two distinct random candidates; the lower load wins, a tie goes to the first.
``least-loaded``
    the minimum load; ties are broken with the injected ``rng``, so equal workers
    share light sequential load instead of the first one taking all of it.
``kv``
    prefix-aware: ``score = overlap_weight * blocks_to_prefill + active_blocks``, where
    ``blocks_to_prefill`` is the request's blocks minus those the worker is believed to cache
    (:class:`~.kv_index.KvIndex`) and ``active_blocks`` the blocks of the worker's in-flight
    requests, plus, when the engine reports more requests than this frontend has in flight there
    (other frontends'), that many more requests of this one's size. For a worker whose KV
    events flow (:class:`PreciseOverlap`, from :mod:`.kv_blocks`) the cached part is what its
    events say instead of the guess: its predicted cached tokens as a share of the prompt's
    tokens, in the same blocks. The lowest score wins, ties at random. With ``temperature > 0``
    the worker is sampled from ``softmax(-score / (max - min) / temperature)`` as Dynamo does
    (uniform when every score is equal), so the best worker is the most likely, not the only
    choice.
``direct``
    the worker named by the ``X-Worker-Instance-Id`` header: 400 when it is absent, 503
    ``no_workers_available`` when that worker is not available, 503 ``all_workers_busy`` when
    it is at its in-flight limit.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import NamedTuple

from ..errors import AllWorkersBusy, InvalidRequest, NoWorkersAvailable
from .kv_index import KvIndex

WORKER_ID_HEADER = "X-Worker-Instance-Id"


class RouterMode(StrEnum):
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"
    POWER_OF_TWO = "power-of-two"
    LEAST_LOADED = "least-loaded"
    KV = "kv"
    DIRECT = "direct"


class WorkerView(NamedTuple):
    """One worker as a policy sees it at the moment of the choice."""

    id: str
    inflight: int
    active_blocks: int
    available: bool
    free: bool
    reported_load: float | None = None
    """The engine-reported load (plus requests sent since), None when the engine reports none."""

    @property
    def load(self) -> float:
        """What the load-aware modes compare: the reported load, else the in-flight count."""
        return self.inflight if self.reported_load is None else self.reported_load


class PreciseOverlap(NamedTuple):
    """What the workers' KV events predict for one request (``kv`` mode, precise workers)."""

    tokens: int
    """The prompt's length in tokens."""
    cached: Mapping[str, int]
    """Predicted cached prompt tokens, for each worker whose KV events flow."""


class RoundRobin:
    """Round-robin's only state: one counter per model."""

    __slots__ = ("_counters",)

    def __init__(self) -> None:
        self._counters: dict[str, int] = {}

    def next_index(self, key: str, n: int) -> int:
        """The next position in ``range(n)`` for ``key``; advances the counter."""
        count = self._counters.get(key, 0)
        self._counters[key] = count + 1
        return count % n


def free_workers(views: Sequence[WorkerView]) -> list[WorkerView]:
    """The free workers of a snapshot, or the 503 that applies when there is none."""
    free = [v for v in views if v.free]
    if free:
        return free
    if any(v.available for v in views):
        raise AllWorkersBusy()
    raise NoWorkersAvailable()


def kv_scores(
    views: Sequence[WorkerView],
    hashes: Sequence[int],
    kv_index: KvIndex | None,
    overlap_weight: float,
    precise: PreciseOverlap | None = None,
) -> list[float]:
    """``overlap_weight * blocks_to_prefill + active_blocks`` for each view (lower is better)."""
    blocks = len(hashes)
    scores: list[float] = []
    exact = precise.cached if precise is not None and precise.tokens > 0 else {}
    for v in views:
        tokens = exact.get(v.id)
        if tokens is not None:
            assert precise is not None
            cached: float = blocks * tokens / precise.tokens
        else:
            cached = kv_index.overlap(v.id, hashes) if kv_index is not None else 0
        others = max(0.0, v.load - v.inflight) * blocks  # requests other frontends sent it
        scores.append(overlap_weight * (blocks - cached) + v.active_blocks + others)
    return scores


def choose_worker(
    mode: RouterMode,
    views: Sequence[WorkerView],
    *,
    rng: random.Random,
    model: str = "",
    round_robin: RoundRobin | None = None,
    hashes: Sequence[int] = (),
    kv_index: KvIndex | None = None,
    overlap_weight: float = 1.0,
    temperature: float = 0.0,
    direct_id: str | None = None,
    precise: PreciseOverlap | None = None,
) -> str:
    """The id of the worker that should serve the request.

    Raises :class:`NoWorkersAvailable`, :class:`AllWorkersBusy` (see the module docstring), or
    :class:`InvalidRequest` in ``direct`` mode without a worker id. ``round_robin`` is needed
    in ``round-robin`` mode, ``hashes`` (the request's :func:`~.kv_index.block_hashes`) and
    ``kv_index`` in ``kv`` mode, ``direct_id`` in ``direct`` mode.
    """
    if mode is RouterMode.DIRECT:
        return _choose_direct(views, direct_id)
    free = free_workers(views)
    if len(free) == 1:
        return free[0].id
    if mode is RouterMode.ROUND_ROBIN:
        if round_robin is None:
            raise ValueError("round-robin mode needs a RoundRobin state")
        return free[round_robin.next_index(model, len(free))].id
    if mode is RouterMode.RANDOM:
        return rng.choice(free).id
    if mode is RouterMode.POWER_OF_TWO:
        i, j = rng.sample(range(len(free)), 2)
        first, second = free[i], free[j]
        return first.id if first.load <= second.load else second.id
    if mode is RouterMode.LEAST_LOADED:
        lowest = min(v.load for v in free)
        return _pick([v for v in free if v.load == lowest], rng).id
    if mode is RouterMode.KV:
        scores = kv_scores(free, hashes, kv_index, overlap_weight, precise)
        return _choose_by_score(free, scores, temperature, rng).id
    raise ValueError(f"unknown router mode {mode!r}")


def _pick(candidates: list[WorkerView], rng: random.Random) -> WorkerView:
    return candidates[0] if len(candidates) == 1 else rng.choice(candidates)


def _choose_by_score(
    free: list[WorkerView], scores: list[float], temperature: float, rng: random.Random
) -> WorkerView:
    lowest, highest = min(scores), max(scores)
    if temperature <= 0 or highest == lowest:
        return _pick([v for v, s in zip(free, scores, strict=True) if s == lowest], rng)
    # Scores normalised to [0, 1] by the spread, as Dynamo does, so the temperature means the
    # same whatever the prompt length; shifted by the lowest so the largest weight is 1.
    scale = (highest - lowest) * temperature
    weights = [math.exp((lowest - s) / scale) for s in scores]
    return rng.choices(free, weights)[0]


def _choose_direct(views: Sequence[WorkerView], direct_id: str | None) -> str:
    if not direct_id:
        raise InvalidRequest(
            f"Router mode 'direct' needs the {WORKER_ID_HEADER} header naming a worker",
            code="worker_id_required",
        )
    for v in views:
        if v.id == direct_id:
            if v.free:
                return v.id
            if v.available:
                raise AllWorkersBusy(f"Worker {direct_id} is busy, please retry later")
            break
    raise NoWorkersAvailable(f"Worker {direct_id} is not available")


class RoutingPolicy:
    """A router mode with its state: the rng, round-robin's counters, the kv settings.

    ``choose`` is :func:`choose_worker` over a snapshot. In ``kv`` mode the policy reads
    ``kv_index`` (give the same index to the ``WorkerSet``, which records where requests went).
    """

    __slots__ = ("kv_index", "mode", "overlap_weight", "rng", "round_robin", "temperature")

    def __init__(
        self,
        mode: RouterMode | str = RouterMode.ROUND_ROBIN,
        *,
        rng: random.Random | None = None,
        kv_index: KvIndex | None = None,
        overlap_weight: float = 1.0,
        temperature: float = 0.0,
    ) -> None:
        self.mode = RouterMode(mode)
        self.rng = rng if rng is not None else random.Random()
        self.round_robin = RoundRobin()
        self.kv_index = kv_index if kv_index is not None else KvIndex()
        if overlap_weight < 0 or temperature < 0:
            raise ValueError("overlap_weight and temperature must not be negative")
        self.overlap_weight = overlap_weight
        self.temperature = temperature

    @property
    def uses_prefix(self) -> bool:
        """Whether ``choose`` looks at the request's block hashes (compute them only then)."""
        return self.mode is RouterMode.KV

    def choose(
        self,
        model: str,
        views: Sequence[WorkerView],
        *,
        hashes: Sequence[int] = (),
        direct_id: str | None = None,
        precise: PreciseOverlap | None = None,
    ) -> str:
        return choose_worker(
            self.mode,
            views,
            rng=self.rng,
            model=model,
            round_robin=self.round_robin,
            hashes=hashes,
            kv_index=self.kv_index,
            overlap_weight=self.overlap_weight,
            temperature=self.temperature,
            direct_id=direct_id,
            precise=precise,
        )
