"""The router: remote workers of each model, and the engine that dispatches to them.

The socket-free core, bottom up:

- ``policies``: ``RoutingPolicy`` / ``choose_worker`` choose a worker from a snapshot (pure);
- ``kv_index``: ``KvIndex`` approximates each worker's prefix cache for the ``kv`` mode;
- ``slot``: a worker's in-flight load, and the ``InflightSlot`` a request holds on it;
- ``quarantine``: a worker's health, its back-off and the probe that brings it back;
- ``membership``: ``Worker`` and the ``WorkerSet`` of every registered worker, per model.

On top of them, ``choice`` chooses a request's worker (what the request is routed on, and the
chosen worker's slot taken in the same step); ``attempt`` runs one request on one chosen worker
(its context, its watchdog, reporting the worker down or ok); ``migration`` follows a request's
progress across attempts, with the relayed bytes kept for a replay (``replay_buffer``) and the
replay that continues it on another worker (``continuation``); and ``engine``'s ``Router`` is
the engine the HTTP layer serves, with the I/O to the workers (``WorkerClient``) injected.
"""

from .attempt import Attempt, AttemptLimits
from .engine import Router
from .kv_index import DEFAULT_BLOCK_CHARS, KvIndex, block_hashes
from .membership import ChangeCallback, Probe, UnknownWorker, Worker, WorkerSet, WorkerState
from .migration import MigrationState, migration_budget
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
from .quarantine import Health, Quarantine
from .slot import InflightSlot, WorkerLoad

__all__ = [
    "DEFAULT_BLOCK_CHARS",
    "WORKER_ID_HEADER",
    "Attempt",
    "AttemptLimits",
    "ChangeCallback",
    "Health",
    "InflightSlot",
    "KvIndex",
    "MigrationState",
    "Probe",
    "Quarantine",
    "RoundRobin",
    "Router",
    "RouterMode",
    "RoutingPolicy",
    "UnknownWorker",
    "Worker",
    "WorkerLoad",
    "WorkerSet",
    "WorkerState",
    "WorkerView",
    "block_hashes",
    "choose_worker",
    "free_workers",
    "kv_scores",
    "migration_budget",
]
