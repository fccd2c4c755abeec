"""The frontend's workers: registration, in-flight accounting, quarantine and its probe.

A worker is in one of three nested sets (SPEC §8):

- **live**: registered (statically, by a file or by discovery); it is in the :class:`WorkerSet`;
- **available**: live and not quarantined;
- **free**: available and below its in-flight limit (``max_inflight``; ``None`` = no limit).

Policies choose among the free workers of a model; a live model with no available worker is
503 ``no_workers_available``, one whose available workers are all at their limit is 503
``all_workers_busy`` (load shedding). :class:`WorkerState` names the innermost set a live worker
is in, for ``/health``.

**In-flight accounting has one owner.** :meth:`WorkerSet.acquire` returns an
:class:`InflightSlot`: the worker's in-flight count (and its active KV blocks, the load term of
``kv`` routing) go up when the slot is taken and down exactly once when it is released, however
many times ``release()`` is called, whether or not the worker was removed meanwhile. Nothing
else changes them, so they cannot leak; ``worker_inflight_requests{worker}`` is set from the
count itself.

**Quarantine.** ``report_down(worker_id, error)`` quarantines the worker only when the error's
class says so (``quarantines``: connect failures, dropped streams, a worker going silent);
cancellations, 4xx answers and overload never do. The worker then sits out an exponential
back-off, 1 s doubling up to 60 s, one step per consecutive failure. When the back-off expires
(a timer on the injected clock, no polling loop) the worker is not simply trusted again: a
cheap active **probe** supplied by the caller (e.g. ``GET /health`` of the worker) decides.
Success makes it available; failure puts it back for the next, doubled back-off. A blanket
timer would send real requests to a worker that is still down, and each would fail.

The failure streak is reset by a *request* that succeeds (``report_ok``), not by a passing
probe, so a worker that answers its health check but fails real requests (a flapping worker)
backs off further each time. A worker that stays available for ``backoff_max`` seconds starts
its next streak afresh.

The probes run in tasks the :class:`WorkerSet` owns: removing the worker cancels its probe, and
:meth:`WorkerSet.aclose` cancels every timer and probe and awaits them. The probe must bound its
own duration (the HTTP client's timeout); while it runs the worker stays quarantined.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Sequence
from enum import StrEnum
from types import TracebackType

from ..errors import DynamoError
from ..metrics import GaugeChild, Metrics
from ..runtime.clock import Clock, TimerHandle
from .kv_index import KvIndex
from .policies import RoutingPolicy, WorkerView

log = logging.getLogger("dynamo_llm.router")

Probe = Callable[["Worker"], Awaitable[bool]]
"""An active health check of one worker: True when it can take requests again."""

ChangeCallback = Callable[[frozenset[str]], None]
"""Called with the models whose availability may have changed."""

DEFAULT_BACKOFF_INITIAL = 1.0
DEFAULT_BACKOFF_MAX = 60.0


class WorkerState(StrEnum):
    """The innermost set a live worker is in."""

    FREE = "free"
    BUSY = "busy"  # available, at its in-flight limit
    QUARANTINED = "quarantined"  # waiting for its back-off to expire
    PROBING = "probing"  # quarantined, its probe is running


class UnknownWorker(KeyError):
    """No worker with that id is registered (it was removed since it was chosen)."""


class Worker:
    """One worker. Its in-flight count and quarantine state are changed by its WorkerSet only."""

    __slots__ = (
        "_active_blocks",
        "_failures",
        "_inflight",
        "_inflight_gauge",
        "_next_backoff",
        "_probe_task",
        "_quarantined",
        "_quarantined_until",
        "_returned_at",
        "_timer",
        "id",
        "is_ours",
        "last_ttft",
        "max_inflight",
        "models",
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
    ) -> None:
        if max_inflight is not None and max_inflight <= 0:
            raise ValueError("max_inflight must be positive")
        self.id = worker_id if worker_id is not None else url
        self.url = url
        self.models = frozenset(models)
        self.max_inflight = max_inflight
        self.is_ours = is_ours  # a `dynamo-llm worker`: it understands our stop route
        self.last_ttft: float | None = None
        self._inflight = 0
        self._active_blocks = 0
        self._inflight_gauge: GaugeChild | None = None
        self._quarantined = False
        self._failures = 0
        self._next_backoff = 0.0
        self._quarantined_until: float | None = None
        self._returned_at: float | None = None
        self._timer: TimerHandle | None = None
        self._probe_task: asyncio.Task[None] | None = None

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def active_blocks(self) -> int:
        """KV blocks of the requests in flight on this worker (the ``kv`` mode's load)."""
        return self._active_blocks

    @property
    def quarantined(self) -> bool:
        return self._quarantined

    @property
    def failures(self) -> int:
        """Consecutive failures: quarantines and failed probes since the last success."""
        return self._failures

    @property
    def quarantined_until(self) -> float | None:
        """When the current back-off expires (clock time), or None when not quarantined."""
        return self._quarantined_until

    @property
    def next_backoff(self) -> float:
        """The back-off the next failure will get."""
        return self._next_backoff

    @property
    def is_available(self) -> bool:
        return not self._quarantined

    @property
    def is_free(self) -> bool:
        if self._quarantined:
            return False
        return self.max_inflight is None or self._inflight < self.max_inflight

    @property
    def state(self) -> WorkerState:
        if self._quarantined:
            return WorkerState.PROBING if self._probe_task is not None else WorkerState.QUARANTINED
        return WorkerState.FREE if self.is_free else WorkerState.BUSY

    def view(self) -> WorkerView:
        return WorkerView(
            self.id, self._inflight, self._active_blocks, not self._quarantined, self.is_free
        )

    def __repr__(self) -> str:
        return f"<Worker {self.id} {self.state} inflight={self._inflight}>"


class InflightSlot:
    """One request's hold on a worker: taken by ``WorkerSet.acquire``, given back once."""

    __slots__ = ("_released", "blocks", "worker")

    def __init__(self, worker: Worker, blocks: int) -> None:
        self.worker = worker
        self.blocks = blocks
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the slot back. Idempotent; harmless after the worker was removed."""
        if self._released:
            return
        self._released = True
        worker = self.worker
        worker._inflight -= 1
        worker._active_blocks -= self.blocks
        gauge = worker._inflight_gauge
        if gauge is not None:
            gauge.set(worker._inflight)

    def __enter__(self) -> InflightSlot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


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
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        if max_inflight is not None and max_inflight <= 0:
            raise ValueError("max_inflight must be positive")
        self._clock = clock
        self._probe = probe
        self._metrics = metrics
        self.max_inflight = max_inflight
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.kv_index = kv_index
        self._workers: dict[str, Worker] = {}
        self._by_model: dict[str, dict[str, Worker]] = {}
        self._callbacks: list[ChangeCallback] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # --- membership ------------------------------------------------------------------------

    def add(self, worker: Worker) -> Worker:
        """Register ``worker`` and return the registered object.

        When a worker with the same id is already registered it stays (with its in-flight
        count and quarantine state) and takes the new one's url, models, ``is_ours`` and, if
        set, ``max_inflight``: a discovery refresh does not reset a worker.
        """
        existing = self._workers.get(worker.id)
        if existing is not None:
            existing.url = worker.url
            existing.is_ours = worker.is_ours
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
        worker._next_backoff = self.backoff_initial
        self._workers[worker.id] = worker
        self._index(worker)
        if self._metrics is not None:
            worker._inflight_gauge = self._metrics.worker_inflight_requests.labels(worker.id)
            worker._inflight_gauge.set(worker._inflight)
            self._metrics.worker_quarantined.labels(worker.id).set(0)
        log.info("worker %s added for %s", worker.id, sorted(worker.models))
        self._notify(worker.models)
        return worker

    def remove(self, worker_id: str) -> Worker | None:
        """Unregister a worker; its timer and probe are cancelled, its series dropped."""
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return None
        self._unindex(worker)
        if worker._timer is not None:
            worker._timer.cancel()
            worker._timer = None
        if worker._probe_task is not None:
            worker._probe_task.cancel()  # awaited by aclose() if still running then
        worker._inflight_gauge = None
        if self._metrics is not None:
            self._metrics.worker_inflight_requests.remove(worker_id)
            self._metrics.worker_quarantined.remove(worker_id)
            self._metrics.worker_time_to_first_token_seconds.remove(worker_id)
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
        return any(not w._quarantined for w in self._by_model.get(model, {}).values())

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
    ) -> Worker:
        """The worker ``policy`` chooses for a request to ``model``, skipping ``exclude``.

        Raises ``NoWorkersAvailable``, ``AllWorkersBusy`` or (direct mode) ``InvalidRequest``.
        Call :meth:`acquire` before the next ``await`` so the choice and the count agree.
        """
        views = self.snapshot(model, exclude=exclude)
        return self._workers[policy.choose(model, views, hashes=hashes, direct_id=direct_id)]

    def acquire(self, worker_id: str, *, hashes: Sequence[int] = ()) -> InflightSlot:
        """Count a request in flight on the worker until the returned slot is released.

        ``hashes`` are the request's KV block hashes (``kv`` mode): they count as the worker's
        active blocks while the slot is held and are recorded in the KV index as cached there.
        Raises :class:`UnknownWorker` when the worker is no longer registered.
        """
        worker = self._workers.get(worker_id)
        if worker is None:
            raise UnknownWorker(worker_id)
        blocks = len(hashes)
        worker._inflight += 1
        worker._active_blocks += blocks
        gauge = worker._inflight_gauge
        if gauge is not None:
            gauge.set(worker._inflight)
        if blocks and self.kv_index is not None:
            self.kv_index.record(worker_id, hashes)
        return InflightSlot(worker, blocks)

    # --- health ----------------------------------------------------------------------------

    def report_down(self, worker_id: str, error: BaseException) -> bool:
        """A request to the worker failed with ``error``; quarantine it if the error says so.

        Returns whether the worker entered quarantine now. Errors whose class does not set
        ``quarantines`` (cancellations, 4xx, overload, anything not a ``DynamoError``) and
        reports about a worker already quarantined or gone change nothing.
        """
        if not (isinstance(error, DynamoError) and type(error).quarantines):
            return False
        worker = self._workers.get(worker_id)
        if worker is None or worker._quarantined:
            return False
        now = self._clock.now()
        if worker._returned_at is not None and now - worker._returned_at >= self.backoff_max:
            # Healthy for a long while: this failure starts a new streak.
            worker._failures = 0
            worker._next_backoff = self.backoff_initial
        backoff = self._quarantine(worker, now)
        log.warning(
            "worker %s quarantined for %g s (%d failures in a row): %s",
            worker.id,
            backoff,
            worker._failures,
            type(error).__name__,
        )
        self._notify(worker.models)
        return True

    def report_ok(self, worker_id: str) -> None:
        """A request to the worker succeeded: its failure streak starts over."""
        worker = self._workers.get(worker_id)
        if worker is not None and not worker._quarantined:
            worker._failures = 0
            worker._next_backoff = self.backoff_initial

    async def aclose(self) -> None:
        """Cancel every back-off timer and probe, and wait for the probes to finish."""
        self._closed = True
        for worker in self._workers.values():
            if worker._timer is not None:
                worker._timer.cancel()
                worker._timer = None
        tasks = tuple(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            # wait() does not raise the tasks' cancellations but does propagate ours.
            await asyncio.wait(tasks)

    # --- internals -------------------------------------------------------------------------

    def _quarantine(self, worker: Worker, now: float) -> float:
        """Put the worker out for its next back-off and schedule the probe; returns the back-off."""
        backoff = worker._next_backoff
        worker._failures += 1
        worker._next_backoff = min(backoff * 2, self.backoff_max)
        worker._quarantined = True
        worker._quarantined_until = now + backoff
        worker._returned_at = None
        if self._metrics is not None:
            self._metrics.worker_quarantined.labels(worker.id).set(1)
        if not self._closed:
            worker._timer = self._clock.call_at(
                now + backoff, lambda: self._backoff_expired(worker)
            )
        return backoff

    def _backoff_expired(self, worker: Worker) -> None:
        worker._timer = None
        if self._closed or self._workers.get(worker.id) is not worker:
            return
        task = asyncio.get_running_loop().create_task(
            self._probe_and_settle(worker), name=f"probe {worker.id}"
        )
        worker._probe_task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe_and_settle(self, worker: Worker) -> None:
        try:
            ok = await self._probe(worker)
        except Exception as exc:  # a probe that raises has failed; CancelledError propagates
            log.warning("probe of worker %s raised %r", worker.id, exc)
            ok = False
        finally:
            worker._probe_task = None
        if self._closed or self._workers.get(worker.id) is not worker:
            return
        now = self._clock.now()
        if not ok:
            backoff = self._quarantine(worker, now)
            log.warning(
                "worker %s failed its probe; quarantined for another %g s", worker.id, backoff
            )
            return
        worker._quarantined = False
        worker._quarantined_until = None
        worker._returned_at = now
        if self._metrics is not None:
            self._metrics.worker_quarantined.labels(worker.id).set(0)
        log.info("worker %s passed its probe and is available again", worker.id)
        self._notify(worker.models)

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
