"""Shared by the etcd discovery tests: workers that register in a real etcd, and the frontend
that watches it (``routed_frontend`` with ``--discovery-backend etcd``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from dynamo_llm.discovery.etcd import EtcdDiscovery
from dynamo_llm.testing.etcd import EtcdServer
from dynamo_llm.testing.process import ServerProcess
from tests.helpers import environ_without_dyn
from tests.system.fleet_helpers import RoutedFrontend, routed_frontend

TTL = 2
"""The workers' lease TTL in these tests (seconds): a dead worker leaves within about this."""


def worker_args(etcd: EtcdServer, model: str = "m", *extra: str) -> list[str]:
    return [
        "worker",
        "--engine",
        "echo",
        "--token-echo-delay-ms",
        "1",
        "--model-name",
        model,
        "--http-port",
        "0",
        "--discovery-backend",
        "etcd",
        "--etcd-endpoints",
        etcd.url,
        "--discovery-lease-ttl-secs",
        str(TTL),
        *extra,
    ]


async def start_worker(etcd: EtcdServer, model: str = "m", *extra: str) -> ServerProcess:
    """A ``dynamo-llm worker`` registering in ``etcd``, once it serves (not yet registered)."""
    proc = ServerProcess(worker_args(etcd, model, *extra), env=environ_without_dyn())
    await asyncio.to_thread(proc.wait_ready, 30)
    return proc


async def stop_all(*procs: ServerProcess) -> None:
    await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))


@contextlib.asynccontextmanager
async def etcd_frontend(
    tmp_path: Path, etcd: EtcdServer, *, env: Mapping[str, str] | None = None
) -> AsyncIterator[RoutedFrontend]:
    settings = {"DYN_DISCOVERY_BACKEND": "etcd", "ETCD_ENDPOINTS": etcd.url, **(env or {})}
    async with routed_frontend(tmp_path, env=settings) as fe:
        yield fe


def discovery_of(fe: RoutedFrontend) -> EtcdDiscovery:
    discovery = fe.fleet.discovery
    assert isinstance(discovery, EtcdDiscovery)
    return discovery


def urls(fe: RoutedFrontend) -> set[str]:
    return {w.url for w in fe.fleet.workers}
