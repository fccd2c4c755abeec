"""The frontend's workers: who is registered, for which model, and in which state (SPEC §8).

A worker is in one of three nested sets:

- **live**: registered (statically, by a file or by discovery); it is in the :class:`WorkerSet`;
- **available**: live and not quarantined;
- **free**: available and below its in-flight limit (``max_inflight``; ``None`` = no limit).

Policies choose among the free workers of a model; a live model with no available worker is
503 ``no_workers_available``, one whose available workers are all at their limit is 503
``all_workers_busy`` (load shedding). :class:`WorkerState` names the innermost set a live worker
is in, for ``/health``.

A :class:`Worker` is its identity (id, url, models, limit) plus two pieces of state, each with
one owner and changed only through its own methods:

- ``load`` (:class:`~.slot.WorkerLoad`): the requests in flight. :meth:`WorkerSet.acquire`
  returns an :class:`~.slot.InflightSlot` that gives its share back exactly once;
- ``health`` (:class:`~.quarantine.Health`): quarantine, back-off and probe, run by the set's
  :class:`~.quarantine.Quarantine`, to which ``report_down`` / ``report_ok`` go.

The :class:`WorkerSet` keeps the per-model index, attaches and drops each worker's metric series,
records where a request's KV blocks went, and tells subscribers (``on_change``) when a model's
workers change: added, removed, quarantined or back.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Sequence
from enum import StrEnum
from typing import Any

from ..metrics import Metrics
from ..protocols.models import OURS
from ..runtime.clock import Clock
from ..runtime.urls import redact_url
from .kv_blocks import KvEventSource
from .kv_index import KvIndex
from .policies import PreciseOverlap, RoutingPolicy, WorkerView
from .quarantine import DEFAULT_BACKOFF_INITIAL, DEFAULT_BACKOFF_MAX, Health, Quarantine
from .slot import InflightSlot, WorkerLoad

__all__ = ["ChangeCallback", "Probe", "UnknownWorker", "Worker", "WorkerSet", "WorkerState"]

log = logging.getLogger("dynamo_llm.router")

Probe = Callable[["Worker"], Awaitable[bool]]
"""An active health check of one worker: True when it can take requests again."""

ChangeCallback = Callable[[frozenset[str]], None]
"""Called with the models whose availability may have changed."""


class WorkerState(StrEnum):
    """The innermost set a live worker is in."""

    FREE = "free"
    BUSY = "busy"  # available, at its in-flight limit
    QUARANTINED = "quarantined"  # waiting for its back-off to expire
    PROBING = "probing"  # quarantined, its probe is running


class UnknownWorker(KeyError):
    """No worker with that id is registered (it was removed since it was chosen)."""


class Worker:
    """One worker: its identity, and its ``load`` and ``health``, changed by its WorkerSet only."""

    __slots__ = (
        "context_length",
        "health",
        "id",
        "instance_ids",
        "is_ours",
        "kv_events",
        "last_ttft",
        "load",
        "max_inflight",
        "metrics_url",
        "models",
        "owner",
        "probe_path",
        "url",
    )

    def __init__(
        self,
        url: str,
        models: Iterable[str] = (),
        *,
        worker_id: str | None = None,
        max_inflight: int | None = None,
        is_ours: bool = False,
        owner: str = "",
    ) -> None:
        """``owner``: who serves the worker's models, as its ``/v1/models`` says (``owned_by``:
        ``dynamo-llm`` makes it one of ours, as ``is_ours`` does; ``vllm``, ...; ``""``:
        unknown)."""
        if max_inflight is not None and max_inflight <= 0:
            raise ValueError("max_inflight must be positive")
        # The id is shown (metrics labels, /health, logs): never the credentials a URL may hold.
        self.id = worker_id if worker_id is not None else redact_url(url)
        self.url = url
        self.models = frozenset(models)
        self.max_inflight = max_inflight
        self.owner = OURS if is_ours else owner
        self.is_ours = self.owner == OURS  # a `dynamo-llm worker`: it understands our stop route
        self.last_ttft: float | None = None
        # The probe that last decided this worker's return (its path), tried first next time.
        self.probe_path: str | None = None
        # Set by a discovery backend that knows them (etcd): the registered instances behind
        # this URL, and where the worker's Prometheus metrics are.
        self.instance_ids: tuple[str, ...] = ()
        self.metrics_url: str | None = None
        # Where the worker publishes its KV cache events (etcd record or --upstream-file).
        self.kv_events: KvEventSource | None = None
        # The context window its registration gives (etcd), checked before dispatch.
        self.context_length: int | None = None
        self.load = WorkerLoad()
        self.health = Health()

    @property
    def inflight(self) -> int:
        return self.load.inflight

    @property
    def active_blocks(self) -> int:
        """KV blocks of the requests in flight on this worker (the ``kv`` mode's load)."""
        return self.load.active_blocks

    @property
    def quarantined(self) -> bool:
        return self.health.quarantined

    @property
    def failures(self) -> int:
        """Consecutive failures: quarantines and failed probes since the last success."""
        return self.health.failures

    @property
    def quarantined_until(self) -> float | None:
        """When the current back-off expires (clock time), or None when not quarantined."""
        return self.health.quarantined_until

    @property
    def next_backoff(self) -> float:
        """The back-off the next failure will get."""
        return self.health.next_backoff

    @property
    def is_available(self) -> bool:
        return not self.health.quarantined

    @property
    def is_free(self) -> bool:
        """Available and below the busy threshold, judged on the engine-reported load when
        there is one (see :class:`~.slot.WorkerLoad`)."""
        if self.health.quarantined:
            return False
        return self.max_inflight is None or self.load.load < self.max_inflight

    @property
    def state(self) -> WorkerState:
        if self.health.quarantined:
            return WorkerState.PROBING if self.health.probing else WorkerState.QUARANTINED
        return WorkerState.FREE if self.is_free else WorkerState.BUSY

    def view(self) -> WorkerView:
        # Built for every worker of the model on every request: ``is_available`` and
        # ``is_free`` inlined, so the health and the load are each read once.
        load = self.load
        available = not self.health.quarantined
        current = load.load
        limit = self.max_inflight
        return WorkerView(
            self.id,
            load.inflight,
            load.active_blocks,
            available,
            available and (limit is None or current < limit),
            None if load.reported is None else current,
        )

    def describe(self) -> dict[str, Any]:
        """The worker's state for ``/health``."""
        described: dict[str, Any] = {
            "id": self.id,
            "url": redact_url(self.url),
            "state": str(self.state),
            "inflight": self.inflight,
            "failures": self.failures,
            "ours": self.is_ours,
        }
        if self.load.reported is not None:
            described["engine_load"] = self.load.load
        if self.instance_ids:
            described["instances"] = list(self.instance_ids)
        return described

    def __repr__(self) -> str:
        return f"<Worker {self.id} {self.state} inflight={self.inflight}>"


class WorkerSet:
    """Every worker of the frontend (a worker may serve several models)."""

    def __init__(
        self,
        *,
        clock: Clock,
        probe: Probe,
        metrics: Metrics | None = None,
        max_inflight: int | None = None,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        kv_index: KvIndex | None = None,
    ) -> None:
        self._quarantine: Quarantine[Worker] = Quarantine(
            clock=clock,
            probe=probe,
            on_change=self._notify,
            metrics=metrics,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
        )
        if max_inflight is not None and max_inflight <= 0:
            raise ValueError("max_inflight must be positive")
        self._metrics = metrics
        self.max_inflight = max_inflight
        self.kv_index = kv_index
        self._workers: dict[str, Worker] = {}
        self._by_model: dict[str, dict[str, Worker]] = {}
        self._callbacks: list[ChangeCallback] = []

    @property
    def backoff_initial(self) -> float:
        return self._quarantine.backoff_initial

    @property
    def backoff_max(self) -> float:
        return self._quarantine.backoff_max

    # --- membership ------------------------------------------------------------------------

    def add(self, worker: Worker) -> Worker:
        """Register ``worker`` and return the registered object.

        When a worker with the same id is already registered it stays (with its in-flight
        count and quarantine state) and takes the new one's url, models, owner and, if
        set, ``max_inflight``: a discovery refresh does not reset a worker.
        """
        existing = self._workers.get(worker.id)
        if existing is not None:
            existing.url = worker.url
            existing.is_ours = worker.is_ours
            existing.owner = worker.owner
            if worker.max_inflight is not None:
                existing.max_inflight = worker.max_inflight
            before = existing.models
            if worker.models != before:
                self._unindex(existing)
                existing.models = worker.models
                self._index(existing)
                self._notify(before | worker.models)
            return existing
        if worker.max_inflight is None:
            worker.max_inflight = self.max_inflight
        self._workers[worker.id] = worker
        self._index(worker)
        self._quarantine.watch(worker)
        if self._metrics is not None:
            worker.load.attach_gauge(self._metrics.worker_inflight_requests.labels(worker.id))
        log.info("worker %s added for %s", worker.id, sorted(worker.models))
        self._notify(worker.models)
        return worker

    def remove(self, worker_id: str) -> Worker | None:
        """Unregister a worker; its timer and probe are cancelled, its series dropped."""
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return None
        self._unindex(worker)
        self._quarantine.unwatch(worker)
        worker.load.attach_gauge(None)
        if self._metrics is not None:
            m = self._metrics
            m.worker_inflight_requests.remove(worker_id)
            m.worker_time_to_first_token_seconds.remove(worker_id)
            m.worker_metrics_scrape_failures_total.remove(worker_id)
            m.forget_engine_load(worker_id)
        if self.kv_index is not None:
            self.kv_index.remove_worker(worker_id)
        log.info("worker %s removed", worker_id)
        self._notify(worker.models)
        return worker

    def get(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    def __iter__(self) -> Iterator[Worker]:
        return iter(tuple(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    def workers_for(self, model: str) -> list[Worker]:
        """The live workers that serve ``model``, in registration order."""
        return list(self._by_model.get(model, {}).values())

    def models(self) -> set[str]:
        """Every model some live worker serves."""
        return set(self._by_model)

    def has_available(self, model: str) -> bool:
        """Whether some worker of ``model`` is available (``model_ready``)."""
        return any(w.is_available for w in self._by_model.get(model, {}).values())

    def on_change(self, callback: ChangeCallback) -> Callable[[], None]:
        """Call ``callback(models)`` when a worker of those models is added, removed,
        quarantined or returns. Returns a function that unsubscribes."""
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unsubscribe

    # --- routing ---------------------------------------------------------------------------

    def snapshot(self, model: str, *, exclude: Collection[str] = ()) -> list[WorkerView]:
        """The live workers of ``model`` as immutable rows for a policy, minus ``exclude``."""
        workers = self._by_model.get(model)
        if not workers:
            return []
        if exclude:
            return [w.view() for w in workers.values() if w.id not in exclude]
        return [w.view() for w in workers.values()]

    def select(
        self,
        model: str,
        policy: RoutingPolicy,
        *,
        exclude: Collection[str] = (),
        hashes: Sequence[int] = (),
        direct_id: str | None = None,
        precise: PreciseOverlap | None = None,
    ) -> Worker:
        """The worker ``policy`` chooses for a request to ``model``, skipping ``exclude``.

        Raises ``NoWorkersAvailable``, ``AllWorkersBusy`` or (direct mode) ``InvalidRequest``.
        Call :meth:`acquire` before the next ``await`` so the choice and the count agree.
        """
        views = self.snapshot(model, exclude=exclude)
        chosen = policy.choose(model, views, hashes=hashes, direct_id=direct_id, precise=precise)
        return self._workers[chosen]

    def acquire(self, worker_id: str, *, hashes: Sequence[int] = ()) -> InflightSlot[Worker]:
        """Count a request in flight on the worker until the returned slot is released.

        ``hashes`` are the request's KV block hashes (``kv`` mode): they count as the worker's
        active blocks while the slot is held and are recorded in the KV index as cached there.
        Raises :class:`UnknownWorker` when the worker is no longer registered.
        """
        worker = self._workers.get(worker_id)
        if worker is None:
            raise UnknownWorker(worker_id)
        slot = worker.load.take(worker, len(hashes))
        if hashes and self.kv_index is not None:
            self.kv_index.record(worker_id, hashes)
        return slot

    # --- health ----------------------------------------------------------------------------

    def report_down(self, worker_id: str, error: BaseException) -> bool:
        """A request to the worker failed with ``error``; quarantine it if the error says so.

        Returns whether the worker entered quarantine now (see
        :meth:`~.quarantine.Quarantine.report_down`); a report about a worker that is gone
        changes nothing.
        """
        worker = self._workers.get(worker_id)
        return worker is not None and self._quarantine.report_down(worker, error)

    def report_ok(self, worker_id: str) -> None:
        """A request to the worker succeeded: its failure streak starts over."""
        worker = self._workers.get(worker_id)
        if worker is not None:
            self._quarantine.report_ok(worker)

    async def aclose(self) -> None:
        """Cancel every back-off timer and probe, and wait for the probes to finish."""
        await self._quarantine.aclose()

    # --- internals -------------------------------------------------------------------------

    def _index(self, worker: Worker) -> None:
        for model in worker.models:
            self._by_model.setdefault(model, {})[worker.id] = worker

    def _unindex(self, worker: Worker) -> None:
        for model in worker.models:
            workers = self._by_model.get(model)
            if workers is not None:
                workers.pop(worker.id, None)
                if not workers:
                    del self._by_model[model]

    def _notify(self, models: frozenset[str]) -> None:
        for callback in tuple(self._callbacks):
            try:
                callback(models)
            except Exception:
                log.exception("worker-set change callback failed")
