"""``--num-workers``: N processes on one socket the parent owns, one ``/metrics`` adding them
up, SIGTERM draining every one, a dead one restarted; and a second server on a port in use
failing at start (issue 11, item 2)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_llm.config import Config
from dynamo_llm.engines.echo import EchoEngine
from dynamo_llm.http.app import App, ServedModel, create_app
from dynamo_llm.http.server import AddressInUse, HttpServer, listen_socket
from dynamo_llm.runtime.clock import SystemClock
from dynamo_llm.testing.process import ServerProcess
from tests.helpers import environ_without_dyn, wait_for

ECHO = ["serve", "--engine", "echo", "--model-name", "echo", "--http-port", "0"]
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "one two three"}]}


def _children(pid: int) -> set[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(child) for child in text.split()}


def _total(url: str, name: str, **labels: str) -> float:
    """One scrape (a fresh connection, so any process may answer): ``name`` summed."""
    text = httpx.get(f"{url}/metrics", headers={"connection": "close"}, timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == f"dynamo_frontend_{name}"
        and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m dynamo_llm *args`` to its end (a command expected to fail at start)."""
    return subprocess.run(
        [sys.executable, "-m", "dynamo_llm", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environ_without_dyn(),
    )


def _two_workers(token_delay_ms: str) -> ServerProcess:
    args = [*ECHO, "--token-echo-delay-ms", token_delay_ms, "--num-workers", "2"]
    return ServerProcess(args, env=environ_without_dyn())


def _open_stream(stack: ExitStack, url: str, words: int = 3) -> httpx.Response:
    """A streaming chat of ``words`` tokens, open (closed with ``stack``), its headers in."""
    client = stack.enter_context(httpx.Client(timeout=10))
    text = " ".join(f"w{i}" for i in range(words))
    body = {**CHAT, "messages": [{"role": "user", "content": text}], "stream": True}
    return stack.enter_context(client.stream("POST", f"{url}/v1/chat/completions", json=body))


def _chat(url: str, **extra: object) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={**CHAT, **extra},
        headers={"connection": "close"},
        timeout=10,
    )


def test_n_workers_serve_and_metrics_add_up_whichever_process_answers() -> None:
    with _two_workers("0") as proc:
        url = proc.wait_ready(timeout=30)
        assert "2 processes" in proc.log
        assert len(_children(proc.pid)) == 2
        for _ in range(20):
            answer = _chat(url)
            assert answer.status_code == 200, answer.text
        wait_for(lambda: _total(url, "requests_total", status="success") == 20, "20 counted")
        for _ in range(10):
            assert _total(url, "requests_total", status="success") == 20
            assert _total(url, "output_tokens_total") == 60
            assert _total(url, "request_duration_seconds_count") == 20
            assert _total(url, "model_ready") == 1
        assert proc.stop() == 0


def test_a_worker_process_that_dies_is_restarted_and_its_gauges_leave_with_it() -> None:
    with _two_workers("5000") as proc:
        url = proc.wait_ready(timeout=30)
        with ExitStack() as stack:
            assert _open_stream(stack, url).status_code == 200
            wait_for(lambda: _total(url, "inflight_requests") == 1, "the stream in flight")
            before = _children(proc.pid)
            for pid in before:
                os.kill(pid, signal.SIGKILL)
            wait_for(
                lambda: len(_children(proc.pid)) == 2 and not _children(proc.pid) & before,
                "two new worker processes",
            )
        assert "restarting it" in proc.log
        wait_for(lambda: _total(url, "inflight_requests") == 0, "the dead stream's gauge gone")
        assert httpx.get(f"{url}/v1/models", timeout=5).status_code == 200
        assert proc.stop() == 0


def test_sigterm_drains_the_requests_of_every_process_then_exits_0() -> None:
    with _two_workers("100") as proc:
        url = proc.wait_ready(timeout=30)
        with ExitStack() as stack:
            # 20 tokens 100 ms apart: both are still running when the signal comes.
            lines = [_open_stream(stack, url, words=20).iter_lines() for _ in range(2)]
            for it in lines:
                assert next(it).startswith("data: ")  # the first chunk: in flight
            proc.proc.send_signal(signal.SIGTERM)
            for it in lines:
                assert "data: [DONE]" in list(it)
        assert proc.stop() == 0
        assert proc.log.count("shutdown requested") == 2


def test_a_worker_process_that_cannot_start_stops_the_parent_with_its_status() -> None:
    result = _run("serve", "--http-port", "0", "--num-workers", "2", "--block-size", "0")
    assert result.returncode == 2
    assert "block_size must be at least 1" in result.stderr


@pytest.mark.parametrize("interface", ["rsgi", "asgi"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_second_server_on_a_port_in_use_fails_at_start(interface: str, workers: str) -> None:
    with ServerProcess([*ECHO, "--http-interface", interface], env=environ_without_dyn()) as first:
        port = first.wait_ready(timeout=30).rsplit(":", 1)[1]
        second = _run(*ECHO[:-1], port, "--http-interface", interface, "--num-workers", workers)
        assert second.returncode == 1
        assert f"127.0.0.1:{port} is already in use" in second.stderr
        assert _chat(first.wait_ready()).status_code == 200  # the first one is untouched


@pytest.mark.parametrize("interface", ["rsgi", "asgi"])
async def test_an_http_server_on_a_port_in_use_raises_address_in_use(interface: str) -> None:
    def app() -> App:
        return create_app(Config(), [ServedModel("echo", EchoEngine(SystemClock()))])

    async with HttpServer(app(), interface=interface) as first:
        second = HttpServer(app(), port=first.port, interface=interface)
        with pytest.raises(AddressInUse, match="already in use"):
            await second.start()


def test_the_listening_socket_passes_no_delay_on_to_its_connections() -> None:
    # Without TCP_NODELAY a stream's small writes wait for the client's delayed ACK (Nagle):
    # events arrive in bunches. Linux copies the option to every accepted connection.
    with listen_socket("127.0.0.1", 0) as sock, socket.create_connection(sock.getsockname()):
        accepted, _ = sock.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
