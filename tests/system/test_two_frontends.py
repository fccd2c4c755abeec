"""Two frontends on one etcd in front of the same workers (issue 12, items 5 and 6): both see the
pool, and both send new work to the worker whose *engine* reports the shorter queue, though
neither of them sent the other worker's load."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from pathlib import Path

import httpx
import pytest

from dynamo_llm.router import Worker
from dynamo_llm.testing.etcd import EtcdServer
from tests.helpers import polled
from tests.system.etcd_fleet import etcd_frontend, start_worker, stop_all, urls
from tests.system.fleet_helpers import chat, ok

pytestmark = pytest.mark.usefixtures("safety_net")

INTERVAL = 0.2
HELD = 4


def reports(worker: Worker, requests: int) -> bool:
    return worker.load.reported == requests


@pytest.fixture
def safety_net_seconds() -> float:
    return 60.0


async def test_two_frontends_send_new_work_to_the_worker_whose_engine_is_less_loaded(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    mocker = ("--engine", "mocker", "--speedup-ratio", "1")
    env = {"DYN_ROUTER_MODE": "least-loaded", "DYN_WORKER_METRICS_INTERVAL_SECS": str(INTERVAL)}
    busy, calm = await asyncio.gather(
        start_worker(etcd, "m", *mocker), start_worker(etcd, "m", *mocker)
    )
    assert busy.url is not None and calm.url is not None
    async with (
        etcd_frontend(tmp_path, etcd, env=env) as one,
        etcd_frontend(tmp_path, etcd, env=env) as two,
        httpx.AsyncClient(base_url=busy.url, timeout=30) as direct,
        contextlib.AsyncExitStack() as held,
    ):
        try:
            both = {busy.url, calm.url}
            await one.until(lambda: urls(one) == both)
            await two.until(lambda: urls(two) == both)
            # Load neither frontend sent: long streams straight to one worker's engine.
            long = {**chat("m", stream=True), "max_tokens": 8000}
            for _ in range(HELD):
                response = await held.enter_async_context(
                    direct.stream("POST", "/v1/chat/completions", json=long)
                )
                assert response.status_code == 200
            for fe in (one, two):
                reported = functools.partial(reports, fe.worker(busy.url), HELD)
                await polled(reported, "the engine's queue read by the frontend")
            assert one.value("worker_engine_running_requests", worker=busy.url) == HELD
            sweeps = [one.fleet.scraper.sweeps, two.fleet.scraper.sweeps]  # type: ignore[union-attr]
            t0 = time.monotonic()
            for _ in range(3):
                for fe in (one, two):
                    await ok(fe, {**chat("m", stream=False), "max_tokens": 2})
            elapsed = time.monotonic() - t0
            for fe in (one, two):
                done = fe.value("worker_time_to_first_token_seconds_count", worker=calm.url)
                assert done == 3, "every new request went to the calm worker"
                assert fe.value("worker_time_to_first_token_seconds_count", worker=busy.url) == 0
            # One scrape per worker per interval, whatever the request rate.
            for fe, before in zip((one, two), sweeps, strict=True):
                scraper = fe.fleet.scraper
                assert scraper is not None
                assert scraper.sweeps - before <= elapsed / INTERVAL + 2
        finally:
            await held.aclose()
            await stop_all(busy, calm)
