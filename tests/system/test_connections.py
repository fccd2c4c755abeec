"""Connections are not a limit: slow clients are closed after the read timeout, and many open
connections do not keep a probe or a new chat waiting (issue 11, item 3).

Behaviour only, on real sockets: speed and the 10 000-connection figures are in
``bench/bench_connections.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from dynamo_llm.config import Config
from dynamo_llm.engines.echo import EchoEngine
from dynamo_llm.runtime.clock import SystemClock
from dynamo_llm.testing import FakeEngine, Frontend, running_frontend
from tests.system.raw_http import status_of

INTERFACES = ["rsgi", "asgi"]
READ_TIMEOUT = 0.3
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}]}


@pytest_asyncio.fixture(params=INTERFACES)
async def frontend(request: pytest.FixtureRequest) -> AsyncIterator[Frontend]:
    config = Config(http_read_timeout_secs=READ_TIMEOUT, token_echo_delay_ms=0)
    async with running_frontend(
        EchoEngine(SystemClock(), delay_ms=0), model="echo", config=config, interface=request.param
    ) as fe:
        yield fe


async def _open(fe: Frontend, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", fe.server.port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def _read_until_closed(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


async def _answer_until_closed(fe: Frontend, data: bytes) -> bytes:
    """Send ``data`` on a new connection, then read what comes until the frontend closes it."""
    reader, writer = await _open(fe, data)
    try:
        return await _read_until_closed(reader)
    finally:
        writer.close()


@pytest.mark.usefixtures("safety_net")
async def test_a_client_that_trickles_its_headers_is_disconnected_after_the_read_timeout(
    frontend: Frontend,
) -> None:
    # granian's header read timeout; under uvicorn, ours (http/header_timeout.py).
    answer = await _answer_until_closed(frontend, b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
    assert b"200 OK" not in answer


@pytest.mark.usefixtures("safety_net")
async def test_a_connection_that_sends_nothing_is_closed_after_the_read_timeout(
    frontend: Frontend,
) -> None:
    assert await _answer_until_closed(frontend, b"") == b""


@pytest.mark.usefixtures("safety_net")
async def test_a_kept_alive_connection_must_send_its_next_headers_in_time(
    frontend: Frontend,
) -> None:
    first = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
    reader, writer = await _open(frontend, first)
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        assert status_of(head) == 200
        if b"content-length:" in head.lower():
            await reader.readexactly(
                int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            )
        else:  # chunked (uvicorn)
            await reader.readuntil(b"\r\n0\r\n\r\n")
        # The next request's headers trickle: a byte now, never the rest.
        writer.write(b"G")
        await writer.drain()
        assert await _read_until_closed(reader) == b""
    finally:
        writer.close()


@pytest.mark.usefixtures("safety_net")
async def test_a_client_that_trickles_its_body_gets_408_and_is_disconnected(
    frontend: Frontend,
) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    reader, writer = await _open(frontend, head + b'{"model": "echo", ')
    try:
        answer = await _read_until_closed(reader)
    finally:
        writer.close()
    assert status_of(answer) == 408, answer[:300]
    assert b"request_timeout" in answer
    assert frontend.value("requests_total", error_type="validation") == 1
    assert frontend.value("inflight_requests") == 0


@pytest.mark.usefixtures("safety_net")
async def test_many_slow_and_idle_connections_do_not_keep_a_probe_or_a_chat_waiting(
    frontend: Frontend,
) -> None:
    opened = []
    try:
        for i in range(150):  # half trickle their headers, half their body
            data = (
                b"GET /health HTTP/1.1\r\nHost: l\r\n"
                if i % 2
                else b"POST /v1/chat/completions HTTP/1.1\r\nHost: l\r\nContent-Length: 99\r\n\r\n{"
            )
            opened.append(await _open(frontend, data))
        async with httpx.AsyncClient(base_url=frontend.base_url, timeout=5) as client:
            assert (await client.get("/health")).status_code == 200
            assert (await client.get("/v1/models")).status_code == 200
            chat = await client.post("/v1/chat/completions", json=CHAT)
            assert chat.status_code == 200
            assert chat.json()["choices"][0]["message"]["content"] == "hello there"
    finally:
        for _, writer in opened:
            writer.close()


@pytest.mark.parametrize("interface", INTERFACES)
async def test_a_body_near_the_default_limit_is_answered_correctly(interface: str) -> None:
    limit = Config().body_limit_bytes
    content = "x" * (limit - 200)
    engine = FakeEngine(["ok"])
    async with (
        running_frontend(engine, model="m", interface=interface) as fe,
        httpx.AsyncClient(base_url=fe.base_url, timeout=30) as client,
    ):
        body = {"model": "m", "messages": [{"role": "user", "content": content}]}
        answer = await client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text[:300]
        assert answer.json()["choices"][0]["message"]["content"] == "ok"
        messages = engine.last.request.messages
        assert messages is not None
        assert messages[0].content == content
        over = {"model": "m", "messages": [{"role": "user", "content": content + "x" * 400}]}
        assert (await client.post("/v1/chat/completions", json=over)).status_code == 413
