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


# A supervisor of one child that serves and exits at once, then (its successor) serves until
# stopped; a SIGTERM comes at the moment ``argv[2]`` names (to the parent, or to the child just
# forked), and the parent prints its exit status and how many children it started.
_SUPERVISED = """
import logging, os, signal, socket, sys, time
from dynamo_llm import supervisor
from dynamo_llm.supervisor import Supervisor

supervisor.RESTART_DELAY = float(sys.argv[1])
spawned = []
spawn, on_ready = Supervisor._spawn, Supervisor._on_ready

def counted(self, index):
    spawned.append(index)
    return spawn(self, index)

def stop_once_the_successor_serves(self, child):
    on_ready(self, child)
    if len(spawned) == 2 and child.serving:
        os.kill(os.getpid(), signal.SIGTERM)

class StopAsItRestarts(logging.Handler):
    def emit(self, record):
        if "restarting it" in record.getMessage():
            os.kill(os.getpid(), signal.SIGTERM)

def stopped_as_it_forks(self, ready):
    os.kill(os.getpid(), signal.SIGTERM)  # before the child's own signal handling is set
    child(self, ready)

Supervisor._spawn, child = counted, Supervisor._child
if sys.argv[2] == "restarting":
    logging.getLogger("dynamo_llm.supervisor").addHandler(StopAsItRestarts())
elif sys.argv[2] == "forking":
    Supervisor._child = stopped_as_it_forks
else:
    Supervisor._on_ready = stop_once_the_successor_serves

def child_main(sock, directory, announce):
    announce("serving")
    if len(spawned) == 1:
        return 3  # the first child dies at once
    time.sleep(60)
    return 0

sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen()
status = Supervisor(child_main, sock, 1, stop_within=5.0, announce=print).run()
print(status, len(spawned))
"""


def _supervise(restart_delay: float, stop: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", _SUPERVISED, str(restart_delay), stop],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=environ_without_dyn(),
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_a_stop_while_a_child_waits_to_be_restarted_starts_no_other() -> None:
    # The delay is long: a supervisor sleeping it out would start the successor after the stop.
    assert _supervise(5.0, "restarting") == ["serving", "0", "1"]


def test_a_child_that_died_soon_after_starting_is_restarted_after_the_delay() -> None:
    assert _supervise(0.2, "when-the-successor-serves") == ["serving", "0", "2"]


def test_a_child_signalled_as_it_forks_stops_rather_than_serve_on() -> None:
    # Not the parent's handler in the child's copy (which would swallow the stop): it dies of
    # the signal before serving, and so the parent stops with its status.
    assert _supervise(0.2, "forking") == [str(-signal.SIGTERM), "1"]


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
