"""The commands as they run: ``serve`` answering from the mocker, and real ``serve`` and ``worker``
processes (:class:`~dynamo_llm.testing.process.ServerProcess`, ``--http-port 0``, their URL read
from the readiness line on stderr) that exit 0 on a signal or 2 on bad flags."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import pytest

from dynamo_llm.cli import parse_config
from dynamo_llm.engines.mocker import MockerEngine
from dynamo_llm.http.server import HttpServer
from dynamo_llm.testing.process import READY_LINE, ServerProcess
from dynamo_llm.worker import build_app


async def test_serve_with_the_default_engine_answers_from_the_mocker_and_exposes_its_state() -> (
    None
):
    _, config = parse_config(["serve", "--speedup-ratio", "1000", "--http-port", "0"], {})
    app = build_app(config)
    model = app.models["mocker"]
    assert isinstance(model.engine, MockerEngine)
    assert model.context_length == 8192
    async with HttpServer(app, "127.0.0.1", 0) as server, httpx.AsyncClient() as client:
        body = {"model": "mocker", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        resp = await client.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=10)
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        assert answer["usage"]["completion_tokens"] == 3
        assert answer["choices"][0]["finish_reason"] == "length"
        models = (await client.get(f"{server.base_url}/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["mocker"]
        metrics = (await client.get(f"{server.base_url}/metrics")).text
        assert 'dynamo_mocker_kv_blocks_total{model="mocker"} 16384.0' in metrics
        assert 'dynamo_mocker_finished_requests_total{model="mocker"} 1.0' in metrics
        assert 'dynamo_mocker_running_requests{model="mocker"} 0.0' in metrics
        health = (await client.get(f"{server.base_url}/health")).json()
        assert health["models"][0]["engine"] == "mocker"
        assert health["models"][0]["kv_blocks_total"] == 16384


def test_invalid_mocker_parameters_exit_with_status_2_and_say_why() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dynamo_llm", "worker", "--block-size", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "block_size must be at least 1" in result.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["register", "--upstream", "http://127.0.0.1:1"], "needs --discovery-backend etcd"),
        (["register", "--discovery-backend", "etcd"], "needs one --upstream URL"),
        (["serve", "--discovery-backend", "static"], "needs --upstream URL"),
        (
            ["serve", "--discovery-backend", "etcd", "--upstream", "http://127.0.0.1:1"],
            "leave out --upstream",
        ),
    ],
    ids=["register-without-etcd", "register-without-upstream", "static-without-upstream", "both"],
)
def test_contradictory_discovery_flags_exit_with_status_2_and_say_why(
    args: list[str], says: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dynamo_llm", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert says in result.stderr


@pytest.mark.parametrize(
    ("args", "model", "sig"),
    [
        (["serve", "--engine", "echo", "--token-echo-delay-ms", "0"], "echo", signal.SIGTERM),
        (["worker", "--speedup-ratio", "1000", "--model-name", "w"], "w", signal.SIGINT),
        (
            ["serve", "--engine", "echo", "--token-echo-delay-ms", "0", "--event-loop", "asyncio"],
            "echo",
            signal.SIGTERM,
        ),
    ],
    ids=["serve-echo-sigterm", "worker-mocker-sigint", "serve-echo-asyncio-loop"],
)
def test_a_server_process_answers_chat_and_exits_0_on_a_signal(
    args: list[str], model: str, sig: signal.Signals
) -> None:
    # Nothing is in flight at the signal, so the server must not wait out its grace: with 60 s of
    # it and 10 s before stop() resorts to SIGKILL, one that waited would not exit 0.
    grace = ["--graceful-shutdown-timeout-secs", "60"]
    with ServerProcess([*args, "--http-port", "0", *grace]) as proc:
        url = proc.wait_ready(timeout=30)
        assert url.startswith("http://127.0.0.1:")
        assert not url.endswith(":0")
        match = READY_LINE.search(proc.log)
        assert match is not None
        assert match.group("command") == args[0]
        assert match.group("models") == model
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "hello there world"}],
            "max_tokens": 3,
        }
        resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        assert answer["usage"]["completion_tokens"] == 3
        if model == "echo":
            assert answer["choices"][0]["message"]["content"] == "hello there world"
        code = proc.stop(timeout=10, sig=sig)
    assert code == 0, proc.log
    assert "panicked" not in proc.log
    assert "stopped" in proc.log


def test_python_dash_m_without_a_command_prints_usage_and_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dynamo_llm"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "serve" in result.stderr
    assert "worker" in result.stderr
