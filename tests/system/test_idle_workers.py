"""Issue 12, item 4: a worker that dies while idle leaves the free set by itself, and a dispatch
whose connection is refused goes to another worker whatever ``--migration-limit`` says."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import polled
from tests.system.fleet_helpers import bad_workers, chat, health, ok, routed_frontend

pytestmark = pytest.mark.usefixtures("safety_net")


@pytest.fixture
def safety_net_seconds() -> float:
    return 30.0


async def test_a_worker_sigkilled_while_idle_is_quarantined_before_a_request_finds_it(
    tmp_path: Path,
) -> None:
    env = {"DYN_WORKER_IDLE_PROBE_INTERVAL_SECS": "0.5"}
    async with bad_workers(a={"behaviour": "ok"}, b={"behaviour": "ok"}) as w:
        a, b = w["a"], w["b"]
        async with routed_frontend(tmp_path, {"m": [a.url, b.url]}, env=env) as fe:
            await ok(fe, chat("m", stream=False))
            await ok(fe, chat("m", stream=False))
            await a.kill()
            t0 = time.monotonic()
            await polled(lambda: fe.worker(a.url).quarantined, "the dead worker quarantined", 10)
            print(f"\nidle worker SIGKILL -> out of the free set: {time.monotonic() - t0:.2f}s")
            _status, states = await health(fe)
            assert states[a.url] in ("quarantined", "probing")
            for _ in range(4):
                await ok(fe, chat("m", stream=True))
            assert fe.value("requests_total", status="success") == 6
            assert fe.value("requests_total", error_type="unavailable") == 0


async def test_a_refused_dispatch_is_retried_elsewhere_with_migration_off(tmp_path: Path) -> None:
    env = {"DYN_WORKER_IDLE_PROBE_INTERVAL_SECS": "0", "DYN_MIGRATION_LIMIT": "0"}
    async with bad_workers(bad={"behaviour": "refuse"}, good={"behaviour": "ok"}) as w:
        bad, good = w["bad"], w["good"]
        # The refusing worker is listed first: round-robin sends it the first request.
        async with routed_frontend(tmp_path, {"m": [bad.url, good.url]}, env=env) as fe:
            for stream in (True, False):
                await ok(fe, chat("m", stream=stream))
            assert fe.worker(bad.url).quarantined
            assert fe.value("model_migration_total") == 0
            assert fe.value("requests_total", status="success") == 2
            fe.assert_idle(2)
