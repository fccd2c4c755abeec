"""Workers that register in a real etcd, and a frontend that lists and watches them (issue 12).

Each test starts its own etcd (``etcd`` fixture, OS-chosen ports, its own data directory),
``dynamo-llm worker --discovery-backend etcd`` processes with a 2 s lease, and the routed
frontend in this process with ``--discovery-backend etcd``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import pytest

from dynamo_llm.discovery.etcd_client import EtcdClient
from dynamo_llm.discovery.instance import decode_instance, instances_prefix
from dynamo_llm.testing.etcd import EtcdServer
from dynamo_llm.testing.tcp_proxy import TcpProxy
from tests.helpers import polled
from tests.system.etcd_fleet import TTL, discovery_of, etcd_frontend, start_worker, stop_all, urls
from tests.system.fleet_helpers import chat, ok, send

pytestmark = pytest.mark.usefixtures("safety_net")


@pytest.fixture
def safety_net_seconds() -> float:
    return 60.0


async def registered(etcd: EtcdServer) -> dict[str, str]:
    """instance id -> URL, as etcd has them now."""
    client = EtcdClient([etcd.url])
    try:
        _, kvs = await client.range_prefix(instances_prefix("dynamo"))
    finally:
        await client.aclose()
    return {kv.key.rsplit("/", 1)[1]: decode_instance(kv.value).url for kv in kvs}


async def test_a_registered_worker_is_served_and_routed_to(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    async with etcd_frontend(tmp_path, etcd) as fe:
        assert (await fe.http.get("/health")).json()["discovery"]["state"] == "connected"
        worker = await start_worker(etcd, "m")
        try:
            t0 = time.monotonic()
            await fe.until(lambda: "m" in fe.app.models)
            await ok(fe, chat("m", stream=True))
            print(f"\nserving -> first request routed: {time.monotonic() - t0:.3f}s")
            instances = await registered(etcd)
            assert list(instances.values()) == [worker.url]
            models = (await fe.http.get("/v1/models")).json()["data"]
            assert [m["id"] for m in models] == ["m"]
            health = (await fe.http.get("/health")).json()
            (described,) = health["models"][0]["workers"]
            assert described["url"] == worker.url
            assert described["instances"] == list(instances)
            assert health["discovery"]["instances"] == 1
            assert fe.value("model_ready", model="m") == 1
        finally:
            await stop_all(worker)
        await fe.until(lambda: "m" not in fe.app.models)
        assert (await fe.http.get("/v1/models")).json()["data"] == []


async def test_sigterm_withdraws_the_key_before_the_worker_stops_and_no_request_fails(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    async with etcd_frontend(tmp_path, etcd) as fe:
        # 20 ms a token: the long stream below outlasts the frontend's view of the withdrawal.
        slow = ("--token-echo-delay-ms", "20")
        first, second = await asyncio.gather(
            start_worker(etcd, "m", *slow), start_worker(etcd, "m", *slow)
        )
        try:
            await fe.until(lambda: urls(fe) == {first.url, second.url})
            # A long stream: its drain keeps its worker's process up after SIGTERM.
            words = " ".join(["word"] * 150)
            payload = {**chat("m", stream=True, content=words), "max_tokens": 150}
            stream = asyncio.create_task(send(fe, payload))
            await polled(lambda: any(w.inflight for w in fe.fleet.workers), "the stream")
            if fe.worker(str(second.url)).inflight:
                first, second = second, first
            first.proc.send_signal(signal.SIGTERM)
            await fe.until(lambda: first.url not in urls(fe))
            assert first.proc.poll() is None  # withdrawn from etcd while still draining
            replies = [await send(fe, chat("m", stream=True)) for _ in range(5)]
            assert [r.status for r in replies] == [200] * 5
            reply = await stream
            assert reply.status == 200 and reply.done, reply.body[-300:]
            assert await asyncio.to_thread(first.proc.wait, 20) == 0, first.log
        finally:
            await stop_all(first, second)
    assert "withdrew instance" in first.log


async def test_a_sigkilled_worker_leaves_routing_within_the_lease_ttl(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    # Idle probes off: this measures the lease alone.
    env = {"DYN_WORKER_IDLE_PROBE_INTERVAL_SECS": "0"}
    async with etcd_frontend(tmp_path, etcd, env=env) as fe:
        first, second = await asyncio.gather(start_worker(etcd), start_worker(etcd))
        try:
            await fe.until(lambda: urls(fe) == {first.url, second.url})
            first.proc.kill()
            t0 = time.monotonic()
            await fe.until(lambda: first.url not in urls(fe))
            print(f"\nSIGKILL -> removed from routing: {time.monotonic() - t0:.2f}s (TTL {TTL}s)")
            assert set((await registered(etcd)).values()) == {second.url}
            for _ in range(5):
                await ok(fe, chat("m", stream=False))
            assert fe.worker(str(second.url)).failures == 0
        finally:
            await stop_all(first, second)


async def test_a_frontend_started_before_etcd_waits_for_it_and_then_serves(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    etcd.kill()
    async with etcd_frontend(tmp_path, etcd) as fe:
        health = await fe.http.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "loading"
        assert health.json()["discovery"]["state"] == "unreachable"
        etcd.start()
        await polled(lambda: discovery_of(fe).connected, "the frontend reaching etcd")
        worker = await start_worker(etcd)
        try:
            await fe.until(lambda: "m" in fe.app.models)
            await ok(fe, chat("m", stream=False))
        finally:
            await stop_all(worker)


async def test_etcd_killed_and_restarted_requests_keep_flowing_and_the_sets_agree(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    async with etcd_frontend(tmp_path, etcd) as fe:
        workers = await asyncio.gather(start_worker(etcd), start_worker(etcd))
        try:
            await fe.until(lambda: urls(fe) == {w.url for w in workers})
            etcd.kill()
            await polled(lambda: not discovery_of(fe).connected, "the frontend losing etcd")
            health = await fe.http.get("/health")
            assert health.status_code == 200
            assert health.json()["discovery"]["state"] == "unreachable"
            for _ in range(6):  # the last known set keeps serving
                await ok(fe, chat("m", stream=True))
            assert urls(fe) == {w.url for w in workers}
            etcd.start()
            await polled(lambda: discovery_of(fe).connected, "the frontend reaching etcd again")
            assert (await fe.http.get("/health")).json()["discovery"]["state"] == "connected"
            assert set(discovery_of(fe).instances) == set(await registered(etcd))
            await ok(fe, chat("m", stream=False))
        finally:
            await stop_all(*workers)


async def test_changes_missed_while_cut_off_from_etcd_are_reconciled_by_instance_id(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    proxy = TcpProxy(etcd.port)
    await proxy.start()
    direct = EtcdClient([etcd.url])
    settings = {"ETCD_ENDPOINTS": proxy.url, "DYN_WORKER_IDLE_PROBE_INTERVAL_SECS": "0"}
    try:
        async with etcd_frontend(tmp_path, etcd, env=settings) as fe:
            leaving, staying = await asyncio.gather(start_worker(etcd), start_worker(etcd))
            try:
                await fe.until(lambda: urls(fe) == {leaving.url, staying.url})
                proxy.cut()
                await polled(lambda: not discovery_of(fe).connected, "the frontend cut off")
                # While the frontend cannot see etcd: one worker withdraws (a delete it never
                # sees), another registers, and the history is compacted away.
                await asyncio.to_thread(leaving.stop)
                newcomer = await start_worker(etcd)
                await polled(lambda: _has(etcd, str(newcomer.url)), "the newcomer's key")
                await direct.compact(await direct.put("unrelated", b""))
                assert urls(fe) == {leaving.url, staying.url}  # the last known set, meanwhile
                resyncs = discovery_of(fe).resyncs
                proxy.restore()
                await fe.until(lambda: urls(fe) == {staying.url, newcomer.url})
                assert discovery_of(fe).resyncs > resyncs
                assert set(discovery_of(fe).instances) == set(await registered(etcd))
                for _ in range(4):
                    await ok(fe, chat("m", stream=False))
            finally:
                await stop_all(leaving, staying)
                with contextlib.suppress(NameError):
                    await stop_all(newcomer)
    finally:
        await direct.aclose()
        await proxy.aclose()


async def _has(etcd: EtcdServer, url: str) -> bool:
    return url in (await registered(etcd)).values()
