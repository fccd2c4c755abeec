"""The router's socket-free core: worker set, quarantine, routing policies, KV prefix index.

``WorkerSet`` knows every worker and its state and owns each worker's in-flight count;
``RoutingPolicy`` / ``choose_worker`` choose one from a snapshot; ``KvIndex`` approximates each
worker's prefix cache for the ``kv`` mode. The engine that dispatches to the chosen worker is
built on top of these.
"""

from .kv_index import DEFAULT_BLOCK_CHARS, KvIndex, block_hashes
from .policies import (
    WORKER_ID_HEADER,
    RoundRobin,
    RouterMode,
    RoutingPolicy,
    WorkerView,
    choose_worker,
    free_workers,
    kv_scores,
)
from .workers import (
    ChangeCallback,
    InflightSlot,
    Probe,
    UnknownWorker,
    Worker,
    WorkerSet,
    WorkerState,
)

__all__ = [
    "DEFAULT_BLOCK_CHARS",
    "WORKER_ID_HEADER",
    "ChangeCallback",
    "InflightSlot",
    "KvIndex",
    "Probe",
    "RoundRobin",
    "RouterMode",
    "RoutingPolicy",
    "UnknownWorker",
    "Worker",
    "WorkerSet",
    "WorkerState",
    "WorkerView",
    "block_hashes",
    "choose_worker",
    "free_workers",
    "kv_scores",
]
