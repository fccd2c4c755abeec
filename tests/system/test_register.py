"""``dynamo-llm register``: a third-party engine (a fake one here) registered by a sidecar that
holds its lease only while the engine passes the generation probe (issue 12, item 2)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from dynamo_llm.testing.etcd import EtcdServer
from dynamo_llm.testing.process import ServerProcess
from tests.helpers import environ_without_dyn, polled
from tests.system.etcd_fleet import etcd_frontend, urls
from tests.system.fleet_helpers import bad_workers, chat, ok

pytestmark = pytest.mark.usefixtures("safety_net")


@pytest.fixture
def safety_net_seconds() -> float:
    return 60.0


def sidecar(etcd: EtcdServer, url: str) -> ServerProcess:
    args = [
        "register",
        "--upstream",
        url,
        "--discovery-backend",
        "etcd",
        "--etcd-endpoints",
        etcd.url,
        "--discovery-lease-ttl-secs",
        "2",
        "--register-probe-interval-secs",
        "0.2",
        "--worker-probe-timeout-secs",
        "0.5",
    ]
    return ServerProcess(args, env=environ_without_dyn())


async def test_sigstop_of_the_engine_withdraws_it_and_sigcont_brings_it_back(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    async with (
        bad_workers(engine={"behaviour": "ok", "model": "third-party", "owned_by": "vllm"}) as w,
        etcd_frontend(tmp_path, etcd) as fe,
    ):
        engine = w["engine"]
        assert engine.proc is not None
        proc = sidecar(etcd, engine.url)
        try:
            await fe.until(lambda: "third-party" in fe.app.models)
            await ok(fe, chat("third-party", stream=True))
            os.kill(engine.proc.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                await fe.until(lambda: engine.url not in urls(fe))
                print(f"\nengine SIGSTOP -> withdrawn: {time.monotonic() - t0:.2f}s")
                assert "third-party" not in fe.app.models
            finally:
                os.kill(engine.proc.pid, signal.SIGCONT)
            await fe.until(lambda: engine.url in urls(fe))
            await ok(fe, chat("third-party", stream=False))
            # A third-party engine: no stop route; the sidecar registered who it is.
            assert not fe.worker(engine.url).is_ours
            assert fe.worker(engine.url).owner == "vllm"
        finally:
            code = await asyncio.to_thread(proc.stop)
        assert code == 0, proc.log
        assert "fails its probe" in proc.log and "passes its probe" in proc.log
        await polled(lambda: engine.url not in urls(fe), "the sidecar's withdrawal")
