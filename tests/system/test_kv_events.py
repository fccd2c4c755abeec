"""Precise KV routing end to end (issue 13): mocker workers publish their KV events, a ``kv``
frontend follows them, and its index matches what the workers really cache.

Real ``dynamo-llm worker`` processes with ``--kv-events-port 0`` and a small KV cache (so the
workload evicts); the frontend finds their endpoints in an ``--upstream-file``. The workers'
true cache is what their ``/health`` reports (``kv_blocks_cached``, the block pool's own count).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynamo_llm.router.kv_blocks import KvEventSource, WorkerBlocks
from dynamo_llm.testing.etcd import EtcdServer
from dynamo_llm.testing.process import ServerProcess
from tests.helpers import environ_without_dyn, polled
from tests.system.etcd_fleet import etcd_frontend, start_worker, stop_all
from tests.system.fleet_helpers import RoutedFrontend, routed_frontend

pytestmark = pytest.mark.usefixtures("safety_net")

BLOCK = 4
BLOCKS = 48


@pytest.fixture
def safety_net_seconds() -> float:
    return 90.0


async def start_mocker() -> ServerProcess:
    args = [
        "worker",
        "--engine",
        "mocker",
        "--model-name",
        "m",
        "--http-port",
        "0",
        "--speedup-ratio",
        "1000",
        "--block-size",
        str(BLOCK),
        "--num-gpu-blocks-override",
        str(BLOCKS),
        "--kv-events-port",
        "0",
    ]
    proc = ServerProcess(args, env=environ_without_dyn())
    await asyncio.to_thread(proc.wait_ready, 30)
    return proc


async def worker_health(proc: ServerProcess) -> dict[str, Any]:
    assert proc.url is not None
    async with httpx.AsyncClient(base_url=proc.url, timeout=10) as client:
        response = await client.get("/health")
    model: dict[str, Any] = response.json()["models"][0]
    return model


async def upstream_entry(proc: ServerProcess) -> dict[str, Any]:
    health = await worker_health(proc)
    return {
        "url": proc.url,
        "kv_events_endpoint": health["kv_events_endpoint"],
        "kv_events_replay_endpoint": health["kv_events_replay_endpoint"],
    }


@pytest.fixture
async def workers() -> AsyncIterator[list[ServerProcess]]:
    procs = list(await asyncio.gather(start_mocker(), start_mocker()))
    try:
        yield procs
    finally:
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))


async def kv_frontend(
    tmp_path: Path, procs: list[ServerProcess], name: str = "upstreams.json"
) -> tuple[Path, Any]:
    path = tmp_path / name
    path.write_text(json.dumps({"m": [await upstream_entry(p) for p in procs]}))
    env = {"DYN_UPSTREAM_FILE": str(path), "DYN_ROUTER_MODE": "kv"}
    return path, routed_frontend(tmp_path, env=env)


def entry(fe: RoutedFrontend, proc: ServerProcess) -> WorkerBlocks | None:
    intake = fe.fleet.kv_intake
    assert intake is not None and proc.url is not None
    return intake.index.get(proc.url)


async def in_sync(fe: RoutedFrontend, procs: list[ServerProcess]) -> None:
    """Wait until the frontend's index holds as many blocks as each worker's pool caches."""
    for proc in procs:
        truth = (await worker_health(proc))["kv_blocks_cached"]

        def matches(proc: ServerProcess = proc, truth: int = truth) -> bool:
            blocks = entry(fe, proc)
            return blocks is not None and len(blocks) == truth

        await polled(matches, f"index of {proc.url} at {truth} blocks")


def sample(metrics: str, name: str) -> float:
    line = next(
        line for line in metrics.splitlines() if line.startswith(f"dynamo_frontend_{name} ")
    )
    return float(line.split()[1])


def words(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


async def complete(client: httpx.AsyncClient, prompt: str) -> dict[str, Any]:
    body = {"model": "m", "prompt": prompt, "max_tokens": 2}
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def cached_tokens(result: dict[str, Any]) -> int:
    details = result["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


async def test_the_index_follows_the_workers_true_caches_through_evictions(
    tmp_path: Path, workers: list[ServerProcess]
) -> None:
    # Traffic before the frontend exists: it learns that warm cache by replay.
    assert workers[0].url is not None
    async with httpx.AsyncClient(base_url=workers[0].url, timeout=30) as direct:
        await complete(direct, words("early", 30))
    _path, frontend = await kv_frontend(tmp_path, workers)
    async with frontend as fe:
        await polled(
            lambda: (
                fe.fleet.kv_intake is not None
                and fe.fleet.kv_intake.precise_workers() == {w.url for w in workers}
            ),
            "both workers precise",
        )
        await in_sync(fe, workers)
        early = entry(fe, workers[0])
        assert early is not None and len(early) > 0
        # Enough distinct prompts to overflow the 48-block caches many times over.
        for i in range(30):
            await complete(fe.http, words(f"p{i}x", 20 + i % 7))
        await in_sync(fe, workers)
        health = (await fe.http.get("/health")).json()
        modes = {w["id"]: w["kv_mode"] for w in health["models"][0]["workers"]}
        assert modes == {w.url: "precise" for w in workers}
        metrics = (await fe.http.get("/metrics")).text
        assert "router_kv_events_total" in metrics and 'event="removed"' in metrics


async def test_a_prefix_cached_by_other_traffic_is_routed_to_the_worker_holding_it(
    tmp_path: Path, workers: list[ServerProcess]
) -> None:
    _path, frontend = await kv_frontend(tmp_path, workers)
    async with frontend as fe:
        await polled(
            lambda: (
                fe.fleet.kv_intake is not None and len(fe.fleet.kv_intake.precise_workers()) == 2
            ),
            "both workers precise",
        )
        prefix = words("shared", 24)
        for holder in workers:
            # Warmed by someone else (straight to the worker): this frontend routed none of it.
            assert holder.url is not None
            async with httpx.AsyncClient(base_url=holder.url, timeout=30) as direct:
                await complete(direct, prefix + f" {holder.pid}")
            await in_sync(fe, workers)
            tail = f"{holder.pid} and a new question"
            result = await complete(fe.http, prefix + " " + tail)
            # Only the holder has those blocks: a cache hit means the request went there.
            assert cached_tokens(result) >= 20, result
            prefix = words(f"other{holder.pid}", 24)
        metrics = (await fe.http.get("/metrics")).text
        predicted = sample(metrics, "router_kv_predicted_cached_tokens_total")
        reported = sample(metrics, "router_kv_reported_cached_tokens_total")
        assert predicted == reported >= 40, metrics


async def test_a_worker_that_leaves_the_fleet_leaves_the_index(
    tmp_path: Path, workers: list[ServerProcess]
) -> None:
    path, frontend = await kv_frontend(tmp_path, workers)
    async with frontend as fe:
        intake = fe.fleet.kv_intake
        assert intake is not None
        await polled(lambda: len(intake.precise_workers()) == 2, "both workers precise")
        for i in range(4):
            await complete(fe.http, words(f"leave{i}", 12))
        await in_sync(fe, workers)
        gone = workers[1]
        path.write_text(json.dumps({"m": [await upstream_entry(workers[0])]}))
        await polled(lambda: entry(fe, gone) is None, "the removed worker's entry dropped")
        assert intake.subscriber(str(gone.url)) is None
        metrics = (await fe.http.get("/metrics")).text
        assert f'router_kv_mode{{worker="{gone.url}"}}' not in metrics


async def test_a_worker_registered_in_etcd_advertises_its_kv_events(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    extra = ("--engine", "mocker", "--speedup-ratio", "1000", "--kv-events-port", "0")
    proc = await start_worker(etcd, "m", *extra)
    try:
        health = await worker_health(proc)
        env = {"DYN_ROUTER_MODE": "kv"}
        async with etcd_frontend(tmp_path, etcd, env=env) as fe:
            await fe.until(lambda: {w.url for w in fe.fleet.workers} == {proc.url})
            worker = next(iter(fe.fleet.workers))
            assert worker.kv_events == KvEventSource(
                health["kv_events_endpoint"], health["kv_events_replay_endpoint"], 64
            )
            intake = fe.fleet.kv_intake
            assert intake is not None
            await polled(lambda: intake.precise_workers() == {worker.id}, "the worker precise")
    finally:
        await stop_all(proc)
