"""SPEC §11 with etcd discovery: misbehaving workers found through etcd are handled exactly as
workers named by flags (a hang-up reaches the worker, a zombie is cut and quarantined, a broken
stream migrates). The test registers each bad worker itself, as the ``register`` sidecar would
(a zombie would never pass the sidecar's probe)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dynamo_llm.discovery.etcd_client import EtcdClient
from dynamo_llm.discovery.instance import Instance
from dynamo_llm.discovery.registration import Registration
from dynamo_llm.runtime.clock import SystemClock
from dynamo_llm.testing.bad_workers import BadWorker
from dynamo_llm.testing.etcd import EtcdServer
from tests.helpers import polled
from tests.system.etcd_fleet import etcd_frontend, urls
from tests.system.fleet_helpers import HOLD, LIMITS, RawClient, bad_workers, chat, rid, send

pytestmark = pytest.mark.usefixtures("safety_net")

QUIET = {"DYN_WORKER_IDLE_PROBE_INTERVAL_SECS": "0", "DYN_WORKER_METRICS_INTERVAL_SECS": "0"}


@pytest.fixture
def safety_net_seconds() -> float:
    return 60.0


@contextlib.asynccontextmanager
async def registered(etcd: EtcdServer, *workers: BadWorker) -> AsyncIterator[None]:
    """Each worker registered in etcd (model ``m``) for the body of the ``async with``."""
    registrations = []
    for worker in workers:

        def describe(iid: str, url: str = worker.url) -> Instance:
            return Instance(instance_id=iid, url=url, models=("m",), owned_by="engine")

        registration = Registration(
            EtcdClient([etcd.url]), "dynamo", describe, ttl=5, clock=SystemClock()
        )
        registration.start()
        registrations.append(registration)
    try:
        for registration in registrations:
            await registration.wait_registered()
        yield
    finally:
        for registration in registrations:
            await registration.aclose()


async def test_a_hang_up_mid_stream_reaches_a_worker_found_through_etcd(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    async with (
        bad_workers(steady={"behaviour": "ok", "tokens": 3, "gap": HOLD, "model": "m"}) as w,
        registered(etcd, w["steady"]),
        etcd_frontend(tmp_path, etcd, env=QUIET) as fe,
    ):
        worker = w["steady"]
        await fe.until(lambda: worker.url in urls(fe))
        request_id = rid()
        client = await RawClient.send(fe, chat("m", stream=True), {"X-Request-Id": request_id})
        await client.events(2)
        client.hang_up()
        seen = await worker.request_record(request_id)
        assert seen["disconnected"], seen
        await fe.app.wait_until_idle()
        assert fe.value("requests_total", error_type="cancelled") == 1
        fe.assert_idle(1)


async def test_a_zombie_found_through_etcd_is_cut_and_quarantined_and_the_request_migrates(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    env = {**QUIET, **LIMITS, "DYN_MIGRATION_LIMIT": "1"}
    async with (
        bad_workers(
            zombie={"behaviour": "zombie", "model": "m"}, good={"behaviour": "ok", "model": "m"}
        ) as w,
        registered(etcd, w["zombie"], w["good"]),
        etcd_frontend(tmp_path, etcd, env=env) as fe,
    ):
        zombie, good = w["zombie"], w["good"]
        await fe.until(lambda: urls(fe) == {zombie.url, good.url})
        replies = [await send(fe, chat("m", stream=True)) for _ in range(2)]
        assert all(r.status == 200 and r.done for r in replies), [r.body[-200:] for r in replies]
        await polled(lambda: fe.worker(zombie.url).quarantined, "the zombie quarantined")
        assert fe.value("model_migration_total", migration_type="new_request") >= 1
        await fe.app.wait_until_idle()
        fe.assert_idle(2)


async def test_a_stream_that_breaks_on_a_worker_found_through_etcd_migrates(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    env = {**QUIET, **LIMITS, "DYN_MIGRATION_LIMIT": "1"}
    async with (
        bad_workers(
            stops={"behaviour": "stop-mid-stream", "model": "m"},
            good={"behaviour": "ok", "model": "m"},
        ) as w,
        registered(etcd, w["stops"], w["good"]),
        etcd_frontend(tmp_path, etcd, env=env) as fe,
    ):
        await fe.until(lambda: urls(fe) == {w["stops"].url, w["good"].url})
        replies = [await send(fe, chat("m", stream=True)) for _ in range(2)]
        assert all(r.status == 200 and r.done for r in replies), [r.body[-200:] for r in replies]
        assert fe.value("model_migration_total", migration_type="ongoing_request") == 1
        assert fe.worker(w["stops"].url).quarantined
        await fe.app.wait_until_idle()
        fe.assert_idle(2)
