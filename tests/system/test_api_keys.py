"""API keys from every source, a key file that changes under a running server, ``x-api-key``,
``--protect-metrics`` and a worker's own key in ``--upstream-file`` (issue 10, "What to build"
1 and 2). Black-box over real sockets: ``serve`` and ``worker`` processes, a routed frontend on
granian in front of fake workers that check the header."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest

from dynamo_llm.config import Config
from dynamo_llm.fleet import build_routed_app
from dynamo_llm.runtime.clock import SystemClock
from dynamo_llm.testing import FakeEngine, running_frontend, serving
from dynamo_llm.testing.process import ServerProcess
from dynamo_llm.testing.recording_worker import recording_worker
from tests.helpers import environ_without_dyn, wait_for, write

SAFETY_NET = 30.0
MOCKER = ["--engine", "mocker", "--speedup-ratio", "1000", "--http-port", "0"]


def _status(base: str, key: str, header: str = "authorization") -> int:
    value = f"Bearer {key}" if header == "authorization" else key
    return httpx.get(f"{base}/v1/models", headers={header: value}, timeout=10).status_code


def _kept(base: str, proc: ServerProcess, problem: str) -> bool:
    """Whether the last good key still works and the log said why the file is ignored."""
    assert _status(base, "sk-file-2-planted") == 200
    return any(
        problem in line and "keeping the last 1 key(s)" in line for line in proc.log.splitlines()
    )


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_every_key_source_counts_and_the_key_file_is_reloaded_without_a_restart(
    command: str, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    write(keys, "# the ops team's keys\n\nsk-file-1-planted\n")
    env = {**environ_without_dyn(), "DYN_API_KEY": "sk-env-planted"}
    args = [command, *MOCKER, "--log-level", "debug", "--api-key-file", str(keys)]
    args += ["--api-key", "sk-flag-1-planted", "--api-key", "sk-flag-2-planted"]
    with ServerProcess(args, env=env) as proc:
        base = proc.wait_ready(timeout=30)
        for key in (
            "sk-env-planted",
            "sk-flag-1-planted",
            "sk-flag-2-planted",
            "sk-file-1-planted",
        ):
            assert _status(base, key) == 200, key
            assert _status(base, key, header="x-api-key") == 200, key
        assert _status(base, "sk-file-2-planted") == 401
        assert _status(base, "sk-file-1-planted", header="x-other-key") == 401

        write(keys, "sk-file-2-planted\n")
        assert _status(base, "sk-file-2-planted", header="x-api-key") == 200  # its first use
        wait_for(lambda: _status(base, "sk-file-1-planted") == 401, "the removed key refused")
        assert _status(base, "sk-flag-1-planted") == 200  # the flags' keys do not go with it

        # A broken file is noticed (and logged) by the requests that look at it.
        write(keys, "# all commented out\n")
        wait_for(lambda: _kept(base, proc, "no key in it"), "the empty file logged")
        keys.unlink()
        wait_for(lambda: _kept(base, proc, "No such file"), "the missing file logged")
        assert httpx.get(f"{base}/metrics", timeout=10).status_code == 200  # not protected
    assert proc.returncode == 0, proc.log
    assert "planted" not in proc.log


def test_a_key_file_that_holds_no_key_is_a_start_up_error(tmp_path: Path) -> None:
    """An empty file must not mean "no authentication": the server refuses to start."""
    keys = tmp_path / "keys"
    keys.write_text("# to be filled in\n")
    with ServerProcess(["serve", *MOCKER, "--api-key-file", str(keys)]) as proc:
        proc.proc.wait(timeout=60)
    assert proc.returncode == 2, proc.log
    assert f"dynamo-llm serve: error: API key file {keys}: no key in it" in proc.log
    assert "serving" not in proc.log


async def test_protected_metrics_need_a_key_and_the_probes_stay_open() -> None:
    env = {"DYN_API_KEY": "sk-client-planted", "DYN_PROTECT_METRICS": "1"}
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        running_frontend(FakeEngine(), environ=env) as fe,
        httpx.AsyncClient(base_url=fe.base_url) as c,
    ):
        refused = await c.get("/metrics", headers={"x-api-key": "wrong"})
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert (await c.get("/metrics")).status_code == 401
        for path in ("/health", "/live"):
            assert (await c.get(path)).status_code == 200, path
        text = (await c.get("/metrics", headers={"x-api-key": "sk-client-planted"})).text
        assert "dynamo_frontend_requests_total" in text
        assert 'error_type="unauthorized"' not in text  # a refused scrape is no request
        ok = await c.get("/metrics", headers={"authorization": "Bearer sk-client-planted"})
        assert ok.status_code == 200
    assert not net.expired()


def _chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def test_a_worker_with_its_own_key_in_the_upstream_file_is_sent_that_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The per-worker key overrides ``--upstream-api-key`` for that worker only, follows the file
    when it is reloaded, and is never shown."""
    own, own_2, shared = "wk-own-planted", "wk-own-2-planted", "wk-shared-planted"
    client = {"authorization": "Bearer ck-planted"}
    path = tmp_path / "workers.yaml"
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        recording_worker(model="own-model", api_key=own) as a,
        recording_worker(model="shared-model", api_key=shared) as b,
    ):
        write(path, f"own-model:\n  - url: {a.url}\n    api_key: {own}\nshared-model: [{b.url}]\n")
        config = Config.from_env({}).replace(
            upstream_file=str(path), upstream_api_key=shared, api_keys=("ck-planted",)
        )
        with caplog.at_level(logging.DEBUG, logger="dynamo_llm"):
            async with (
                serving(build_routed_app(config, SystemClock())) as fe,
                httpx.AsyncClient(base_url=fe.base_url, headers=client) as c,
            ):
                for model in ("own-model", "shared-model"):
                    resp = await c.post("/v1/chat/completions", json=_chat(model))
                    assert resp.status_code == 200, resp.text
                assert a.received[0].headers["authorization"] == f"Bearer {own}"
                assert b.received[0].headers["authorization"] == f"Bearer {shared}"

                a.api_key = own_2  # the worker's key is rotated, then the file
                write(path, f"own-model:\n  - url: {a.url}\n    api_key: {own_2}\n")
                while caplog.text.count(f"upstream file {path}:") < 2:
                    await asyncio.sleep(0.02)
                resp = await c.post("/v1/chat/completions", json=_chat("own-model"))
                assert resp.status_code == 200, resp.text
                assert a.received[-1].headers["authorization"] == f"Bearer {own_2}"
                shown = [(await c.get(p)).text for p in ("/health", "/metrics", "/openapi.json")]
        assert (a.refused, b.refused) == (0, 0)
    assert not net.expired()
    assert a.url.removeprefix("http://") in shown[0]  # the worker is shown, its key is not
    for text in [*shown, caplog.text]:
        assert "planted" not in text
