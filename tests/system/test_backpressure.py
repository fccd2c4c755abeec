"""A client that does not read stops its engine being pulled, then is stopped as a slow client.

Black-box over real sockets (issue 11, item 4): the client is a raw socket with a small receive
buffer that sends its streaming request and never reads. Behind the routed frontend, a worker
(an aiohttp app in this process) writes chunks as fast as its connection takes them and counts
what it could write: it must stall far short of its whole answer, because the frontend stops
reading its connection once the client's buffer is full. With the in-process mocker, the
scheduler pauses the sequence instead. Either way, after ``DYN_HTTP_SLOW_CLIENT_TIMEOUT_SECS``
of the client reading nothing, the request ends as ``slow_client`` and the engine is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from dynamo_llm.config import Config
from dynamo_llm.engines.base import EngineOutput, EngineRequest
from dynamo_llm.engines.mocker import MockerConfig, MockerEngine
from dynamo_llm.runtime.context import EngineContext
from dynamo_llm.testing import running_frontend
from tests.system.fleet_helpers import routed_frontend
from tests.system.raw_http import raw_post

TOKENS = 40_000  # about 8 MB of chunks: what a worker writes if nothing holds it back
MOCKER_TOKENS = TOKENS
SLOW = {"DYN_HTTP_SLOW_CLIENT_TIMEOUT_SECS": "1"}


def chunk(i: int) -> bytes:
    choice = {"index": 0, "delta": {"content": f"token number {i} "}, "logprobs": None,
              "finish_reason": None}  # fmt: skip
    obj = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [choice]}  # fmt: skip
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class CountingWorker:
    url: str = ""
    written: int = 0
    completed: bool = False
    ended: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.asynccontextmanager
async def counting_worker() -> AsyncIterator[CountingWorker]:
    """A worker that streams :data:`TOKENS` chunks as fast as its connection takes them."""
    worker = CountingWorker()

    async def generate(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(TOKENS):
                data = chunk(i)
                await resp.write(data)  # waits while the connection's buffers are full
                worker.written += len(data)
            worker.completed = True
            return resp
        finally:
            worker.ended.set()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", generate)
    runner = web.AppRunner(app)
    await runner.setup()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small, fixed send buffer (accepted connections inherit it): the worker stalls soon
    # after the frontend stops reading, rather than after the kernel's autotuned megabytes.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    listener.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, listener)
    await site.start()
    worker.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        yield worker
    finally:
        await runner.cleanup()


async def send_and_never_read(port: int, body: dict[str, object]) -> socket.socket:
    """A raw client with a small receive buffer that sends its request and never reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, raw_post("/v1/chat/completions", json.dumps(body).encode()))
    return sock


def stream_request(model: str) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "go on"}],
        "stream": True,
        "max_tokens": TOKENS,
    }


async def test_a_worker_behind_a_client_that_never_reads_is_held_back_then_stopped(
    tmp_path: Path, safety_net: None
) -> None:
    async with (
        counting_worker() as worker,
        routed_frontend(tmp_path, {"m": [worker.url]}, env=SLOW) as fe,
    ):
        sock = await send_and_never_read(fe.server.port, stream_request("m"))
        try:
            await worker.ended.wait()  # the frontend closed the worker's stream
            await fe.app.wait_until_idle()
        finally:
            sock.close()
        assert not worker.completed
        total = sum(len(chunk(i)) for i in range(TOKENS))
        assert worker.written < total / 4, f"the worker wrote {worker.written} of {total} bytes"
        assert fe.value("requests_total", error_type="slow_client") == 1
        assert fe.value("inflight_requests") == 0


class WatchedMocker:
    """The mocker, handing the test each request's context (killed when the request ends)."""

    def __init__(self) -> None:
        self.inner = MockerEngine(MockerConfig(speedup_ratio=1000.0, context_length=2 * TOKENS))
        self.contexts: asyncio.Queue[EngineContext] = asyncio.Queue()

    async def generate(
        self, request: EngineRequest, ctx: EngineContext
    ) -> AsyncIterator[EngineOutput]:
        self.contexts.put_nowait(ctx)
        return await self.inner.generate(request, ctx)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("interface", ["rsgi", "asgi"])
async def test_the_mocker_pauses_for_a_client_that_never_reads(
    interface: str, safety_net: None
) -> None:
    engine = WatchedMocker()
    config = Config.from_env(SLOW)
    try:
        async with running_frontend(engine, config=config, model="mock", interface=interface) as fe:
            body = {**stream_request("mock"), "max_tokens": MOCKER_TOKENS}
            sock = await send_and_never_read(fe.server.port, body)
            try:
                ctx = await engine.contexts.get()
                await ctx.stopped()  # the slow-client limit stopped it
                await fe.app.wait_until_idle()
            finally:
                sock.close()
            assert fe.value("requests_total", error_type="slow_client") == 1
            # What the frontend pulled before it held the stream: a small buffer's worth under
            # granian; under uvicorn also what the kernel's autotuned send buffer took.
            pulled = fe.value("output_tokens_total")
            assert 0 < pulled < (MOCKER_TOKENS / 10 if interface == "rsgi" else MOCKER_TOKENS)
            assert fe.value("inflight_requests") == 0
    finally:
        await engine.aclose()
