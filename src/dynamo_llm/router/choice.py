"""Choosing a worker for a request (SPEC §8.1): what it is routed on, and the chosen worker's
in-flight slot taken in the same step.

A request is routed on a :class:`RouteKey`. For the prefix-aware ``kv`` mode that is the
approximate block hashes of its prompt's text (:func:`prompt_text`) and, where the workers' KV
events are followed, what those events predict each worker holds of the prompt (the precise
prediction, from a :data:`KvPredictor`); every other mode routes on nothing. The key is computed
once per request and serves every attempt of it.

:func:`acquire_worker` asks the routing policy for a worker over the worker set's snapshot (no
worker available: 503 ``no_workers_available``; all at their in-flight limit: 503
``all_workers_busy``) and takes its slot before any ``await``, so the choice and the count
agree; a worker that vanished between the two is re-chosen once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

from ..engines.base import EngineRequest
from ..errors import NoWorkersAvailable
from ..metrics import Metrics
from ..protocols.chat import content_text
from .kv_index import block_hashes
from .membership import UnknownWorker, Worker, WorkerSet
from .policies import PreciseOverlap, RoutingPolicy
from .slot import InflightSlot


def prompt_text(request: EngineRequest) -> str:
    """The request's prompt as text, for prefix-aware routing."""
    if request.endpoint == "completions":
        prompt = request.prompt
        if isinstance(prompt, list):
            return " ".join(map(str, prompt))
        return prompt or ""
    return "\n".join(f"{m.role}: {content_text(m.content, '')}" for m in request.messages)


KvPredictor = Callable[
    [EngineRequest, list[int] | None, Sequence[str]], Awaitable[PreciseOverlap | None]
]
"""What the workers' KV events predict for a request (and its prompt's ids, when the model's
tokenizer gave them) over these workers (precise ``kv`` mode)."""


class RouteKey(NamedTuple):
    """What the ``kv`` mode routes a request on: approximate hashes, the precise prediction."""

    hashes: list[int]
    precise: PreciseOverlap | None = None

    def predicted(self, worker_id: str) -> int | None:
        """The prompt tokens predicted cached on ``worker_id``; None where nothing is predicted
        for it (no precise prediction, or none of that worker's KV events flow)."""
        return None if self.precise is None else self.precise.cached.get(worker_id)


async def route_key(
    request: EngineRequest,
    token_ids: list[int] | None,
    policy: RoutingPolicy,
    workers: WorkerSet,
    predictor: KvPredictor | None,
) -> RouteKey:
    """What ``policy`` routes ``request`` on: hashes only where it looks at them, and the
    ``predictor``'s view over the model's live workers where there is one."""
    if not policy.uses_prefix:
        return RouteKey([])
    hashes = block_hashes(prompt_text(request))
    if predictor is None:
        return RouteKey(hashes)
    ids = [w.id for w in workers.workers_for(request.model)]
    return RouteKey(hashes, await predictor(request, token_ids, ids))


def acquire_worker(
    workers: WorkerSet,
    policy: RoutingPolicy,
    request: EngineRequest,
    key: RouteKey,
    exclude: set[str],
    *,
    metrics: Metrics | None = None,
) -> tuple[Worker, InflightSlot[Worker]]:
    """The worker ``policy`` chooses for ``request`` (skipping ``exclude``) and its in-flight
    slot; the precise prediction for the chosen worker, if any, is counted in ``metrics``.

    A chosen worker that is gone by the time its slot is taken is added to ``exclude`` and the
    choice made once more. Raises what :meth:`WorkerSet.select` raises.
    """
    for _ in range(2):
        worker = workers.select(
            request.model,
            policy,
            exclude=tuple(exclude),
            hashes=key.hashes,
            direct_id=request.routing.worker_id,
            precise=key.precise,
        )
        try:
            slot = workers.acquire(worker.id, hashes=key.hashes)
        except UnknownWorker:
            exclude.add(worker.id)  # vanished since it was chosen: choose once more
            continue
        predicted = key.predicted(worker.id)
        if predicted is not None and metrics is not None:
            metrics.router_kv_predicted_overlap_tokens.labels().observe(predicted)
            metrics.router_kv_predicted_cached_tokens_total.labels().inc(predicted)
        return worker, slot
    raise NoWorkersAvailable(f"No worker can serve the model `{request.model}`")
