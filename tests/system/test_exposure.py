"""What a hostile client or a load balancer sees at the edge (issue 10): bounded echoes of client
input, ``Allow`` on 405, HTTP/2 only when asked for, and an honest shutdown. Real sockets."""

import asyncio
import signal
import socket

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_llm.testing import FakeEngine, running_frontend
from dynamo_llm.testing.process import ServerProcess
from tests.helpers import environ_without_dyn, wait_for

SAFETY_NET = 10.0
# An error body quotes the client's input clipped: a few KiB at most whatever was sent.
MAX_ERROR_BODY = 4096

CHAT = "/v1/chat/completions"


def chat(model: str = "test-model", stream: bool = False) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


async def test_a_1_mb_model_name_gets_a_small_404() -> None:
    async with running_frontend(FakeEngine()) as fe, httpx.AsyncClient(base_url=fe.base_url) as c:
        resp = await c.post(CHAT, json=chat(model="m" * 1_000_000))
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "model_not_found"
        assert len(resp.content) < MAX_ERROR_BODY
        resp = await c.get("/v1/models/" + "m" * 60_000)
        assert resp.status_code == 404
        assert len(resp.content) < MAX_ERROR_BODY


@pytest.mark.parametrize("size", [8 * 1024, 60 * 1024])
async def test_a_long_path_gets_a_small_404(size: int) -> None:
    async with running_frontend(FakeEngine()) as fe, httpx.AsyncClient(base_url=fe.base_url) as c:
        resp = await c.get("/" + "p" * size)
        assert resp.status_code in (404, 414, 431)
        assert len(resp.content) < MAX_ERROR_BODY


@pytest.mark.parametrize("interface", ["rsgi", "asgi"])
async def test_405_names_the_allowed_methods(interface: str) -> None:
    async with (
        running_frontend(FakeEngine(), interface=interface) as fe,
        httpx.AsyncClient(base_url=fe.base_url) as c,
    ):
        resp = await c.post("/v1/models")
        assert resp.status_code == 405
        assert resp.headers["allow"] == "GET, HEAD"
        resp = await c.get(CHAT)
        assert resp.status_code == 405
        assert resp.headers["allow"] == "POST"


def _first_bytes_after_h2_preface(port: int) -> bytes:
    """What the server answers a client speaking HTTP/2 cleartext with prior knowledge."""
    with socket.create_connection(("127.0.0.1", port), timeout=SAFETY_NET) as sock:
        # The connection preface, then an empty SETTINGS frame (length 0, type 4, flags 0).
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        try:
            return sock.recv(64)
        except ConnectionResetError:
            return b""


async def test_http2_cleartext_is_off_unless_asked_for() -> None:
    async with running_frontend(FakeEngine()) as fe:
        answer = await asyncio.to_thread(_first_bytes_after_h2_preface, fe.server.port)
        # Not an HTTP/2 SETTINGS frame: an HTTP/1.1 error, or the connection closed.
        assert len(answer) < 9 or answer[3] != 0x04, answer
    async with running_frontend(FakeEngine(), http2=True) as fe:
        answer = await asyncio.to_thread(_first_bytes_after_h2_preface, fe.server.port)
        assert len(answer) >= 9 and answer[3] == 0x04, answer


@pytest.mark.parametrize("interface", ["rsgi", "asgi"])
async def test_shutdown_refuses_new_work_and_turns_health_503_while_in_flight_requests_finish(
    interface: str,
) -> None:
    engine = FakeEngine(tokens=["a", "b", "c"], hang_after=1)  # hangs until stopped
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        running_frontend(engine, interface=interface) as fe,
        httpx.AsyncClient(base_url=fe.base_url) as client,
        httpx.AsyncClient(base_url=fe.base_url) as other,
    ):
        assert (await client.get("/health")).status_code == 200
        async with client.stream("POST", CHAT, json=chat(stream=True)) as stream:
            lines = stream.aiter_lines()
            while not (await anext(lines)).startswith("data: "):
                pass  # the first token arrived: the request is in flight
            shutdown = asyncio.create_task(fe.app.shutdown(grace=SAFETY_NET * 2))
            while not fe.app.shutting_down:
                await asyncio.sleep(0)

            health = await other.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "shutting_down"
            assert (await other.get("/live")).status_code == 503
            refused = await other.post(CHAT, json=chat())
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "server_shutting_down"
            assert refused.json()["error"]["type"] == "service_unavailable_error"
            assert refused.headers.get("connection", "").lower() == "close"
            assert not engine.last.ctx.is_stopped  # the request in flight is left alone
            assert len(engine.calls) == 1  # the refused one never reached the engine
        await shutdown  # the client hung up, so nothing is in flight any more
    assert not net.expired()
    assert fe.value("requests_total", error_type="unavailable") == 1
    assert fe.value("requests_total") == 2


def _exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on one connection and read until the server closes it (or goes quiet)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass  # still open: whatever it answered is in ``received``
        return received


_SMUGGLED = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
_TE_BODY = b"0\r\n\r\n" + _SMUGGLED
CL_TE = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(_TE_BODY)).encode() + b"\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n" + _TE_BODY
)


@pytest.mark.parametrize("interface", ["rsgi", "asgi"])
async def test_a_request_with_both_content_length_and_transfer_encoding_smuggles_nothing(
    interface: str,
) -> None:
    async with running_frontend(FakeEngine(), interface=interface) as fe:
        answer = await asyncio.to_thread(_exchange, fe.server.port, CL_TE)
    assert answer.count(b"HTTP/1.1 ") == 1, answer  # one answer, to one request
    assert answer.startswith(b"HTTP/1.1 4"), answer
    assert b'"object":"list"' not in answer  # the smuggled GET /v1/models was not served
    assert fe.value("requests_total", status="success") == 0


@pytest.mark.parametrize("interface", ["rsgi", "asgi"])
async def test_an_oversized_declared_body_gets_413_before_100_continue(interface: str) -> None:
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000000\r\nExpect: 100-continue\r\n\r\n"
    )
    async with running_frontend(FakeEngine(), interface=interface) as fe:
        answer = await asyncio.to_thread(_exchange, fe.server.port, request)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b"100 Continue" not in answer
    assert b"request_too_large" in answer


async def test_every_counter_and_gauge_has_a_sample_before_the_first_request() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    async with running_frontend(FakeEngine()) as fe:
        families = list(text_string_to_metric_families(fe.metrics_text()))
    per_worker = {
        "dynamo_frontend_router_kv_mode",
        "dynamo_frontend_router_kv_events",
        "dynamo_frontend_router_kv_event_gaps",
        "dynamo_frontend_router_kv_event_silences",
    }
    empty = [
        f.name
        for f in families
        if f.type in ("counter", "gauge")
        and not f.samples
        and "worker" not in f.name
        and f.name not in per_worker
    ]
    assert empty == []  # per-worker series appear with their worker
    by_name = {f.name: f for f in families}
    started = by_name["dynamo_frontend_requests_started"].samples
    assert {(s.labels["endpoint"], s.labels["request_type"]) for s in started} == {
        ("chat_completions", "unary"),
        ("chat_completions", "stream"),
        ("completions", "unary"),
        ("completions", "stream"),
    }
    per_model = [
        s for f in families if f.type == "counter" for s in f.samples if "model" in s.labels
    ]
    assert per_model and all(s.value == 0 for s in per_model)


def test_sigterm_turns_health_503_refuses_new_work_and_lets_the_request_in_flight_finish() -> None:
    """A real ``serve`` and a real SIGTERM: at once ``/health`` and ``/live`` say 503 and a new
    request gets 503 ``server_shutting_down`` with ``Connection: close`` (counted), while the
    stream already running gets its grace period and ends cleanly; then the process exits 0."""
    args = ["serve", "--engine", "mocker", "--http-port", "0"]
    env = {**environ_without_dyn(), "DYN_HTTP_GRACEFUL_SHUTDOWN_TIMEOUT_SECS": "60"}
    body = {
        "model": "mocker",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1000,  # several seconds in real time: still streaming after the SIGTERM
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with (
        ServerProcess(args, env=env) as proc,
        httpx.Client(base_url=proc.wait_ready(timeout=30), timeout=30) as client,
        httpx.Client(base_url=client.base_url, timeout=30) as other,
    ):
        with client.stream("POST", CHAT, json=body) as stream:
            lines = stream.iter_lines()
            while not next(lines).startswith("data: "):
                pass  # the first token: the request is in flight
            metrics = other.get("/metrics").text  # before the signal: a counted baseline
            proc.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: other.get("/live").status_code == 503, "shutdown to begin")
            health = other.get("/health")
            assert (health.status_code, health.json()["status"]) == (503, "shutting_down")
            refused = other.post(CHAT, json={**body, "stream": False, "stream_options": None})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "server_shutting_down"
            assert refused.headers["connection"].lower() == "close"
            draining = other.get("/metrics").text
            rest = "\n".join(lines)
        assert proc.proc.wait(timeout=30) == 0, proc.log
    assert rest.rstrip().endswith("data: [DONE]")
    assert '"finish_reason":"length"' in rest
    assert '"completion_tokens":1000' in rest
    assert _refused_while_draining(metrics) == 0
    assert _refused_while_draining(draining) == 1


def _refused_while_draining(metrics_text: str) -> float:
    """``requests_total`` of mocker chat requests refused as ``unavailable`` (503)."""
    wanted = {"model": "mocker", "endpoint": "chat_completions", "error_type": "unavailable"}
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "dynamo_frontend_requests_total"
        and wanted.items() <= sample.labels.items()
    )
