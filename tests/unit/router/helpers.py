"""Shared by the router's unit tests: the worker set on a fake clock with a scripted probe, and a
Router over a scripted worker client."""

from __future__ import annotations

from collections.abc import Sequence

from dynamo_llm.metrics import Metrics
from dynamo_llm.router import (
    KvIndex,
    RoutingPolicy,
    Worker,
    WorkerSet,
)
from dynamo_llm.router.attempt import AttemptLimits
from dynamo_llm.router.engine import Router
from dynamo_llm.router.policies import RouterMode
from dynamo_llm.runtime import FakeClock

MODEL = "m"


async def probe_ok(worker: Worker) -> bool:
    return True


def inflight(workers: WorkerSet) -> dict[str, int]:
    return {w.id: w.inflight for w in workers}


def router_over(
    client: object,
    urls: Sequence[str],
    clock: FakeClock,
    *,
    limits: AttemptLimits | None = None,
    migration_limit: int = 0,
    ours: bool = False,
) -> tuple[Metrics, WorkerSet, Router]:
    """A round-robin Router over ``urls`` (each serving ``MODEL``, every probe passing; each a
    ``dynamo-llm worker`` if ``ours``) that opens its streams through the scripted ``client``."""
    metrics = Metrics()
    workers = WorkerSet(clock=clock, probe=probe_ok, metrics=metrics)
    for url in urls:
        workers.add(Worker(url, [MODEL], is_ours=ours))
    router = Router(
        workers,
        RoutingPolicy(RouterMode.ROUND_ROBIN),
        # Router annotates the concrete WorkerClient; the fakes have the one method it calls.
        client,  # type: ignore[arg-type]
        clock,
        metrics=metrics,
        limits=limits,
        migration_limit=migration_limit,
    )
    return metrics, workers, router


class ScriptedProbe:
    """A probe that answers from a script (default: fail) and records when it ran."""

    def __init__(self, clock: FakeClock, answers: list[bool] | None = None) -> None:
        self.clock = clock
        self.answers = list(answers or [])
        self.calls: list[tuple[str, float]] = []

    async def __call__(self, worker: Worker) -> bool:
        self.calls.append((worker.id, self.clock.now()))
        return self.answers.pop(0) if self.answers else False

    @property
    def times(self) -> list[float]:
        return [t for _, t in self.calls]


def inflight_gauge(metrics: Metrics, worker_id: str) -> float | None:
    child = metrics.worker_inflight_requests.children.get((worker_id,))
    return None if child is None else child.value


def quarantined_gauge(metrics: Metrics, worker_id: str) -> float | None:
    child = metrics.worker_quarantined.children.get((worker_id,))
    return None if child is None else child.value


def make_set(
    clock: FakeClock,
    probe: ScriptedProbe,
    *,
    max_inflight: int | None = None,
    backoff_initial: float = 1.0,
    backoff_max: float = 60.0,
    kv_index: KvIndex | None = None,
) -> tuple[WorkerSet, Metrics]:
    metrics = Metrics()
    workers = WorkerSet(
        clock=clock,
        probe=probe,
        metrics=metrics,
        max_inflight=max_inflight,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        kv_index=kv_index,
    )
    return workers, metrics
