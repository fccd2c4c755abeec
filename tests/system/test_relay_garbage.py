"""A worker's event that is not a JSON object never reaches the client (issue 10, problem 6).

Black-box over real sockets: the routed frontend in front of a scripted worker (an aiohttp app
in this process) that writes chosen bytes, with the garbage in the same write as valid events so
that it reaches the relay inside one buffer, between chunks it would pass on as bytes. Before
the first token the client gets a 502 ``upstream_error``; after it, the stream ends with an
``upstream_error`` frame, and the garbage appears nowhere in what the client read.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.helpers import chat_chunk_event
from tests.system.fleet_helpers import SAFETY_NET, chat, routed_frontend, send

event = chat_chunk_event
ROLE = event("")
TOKENS = [event(f"tok{i}") for i in range(4)]
END = event("", "stop") + b"data: [DONE]\n\n"
SCRIPT = b"<script>alert(1)</script>"


@contextlib.asynccontextmanager
async def scripted_worker(writes: list[bytes]) -> AsyncIterator[str]:
    """A worker whose every streamed answer is ``writes``, one ``write`` each."""

    async def generate(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for data in writes:
            await resp.write(data)
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", generate)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


MID_STREAM = {
    "an HTML tag": b"data: " + SCRIPT + b"\n\n",
    "a JSON array": b"data: [1,2]\n\n",
    "a brace-wrapped line": b"data: {" + SCRIPT + b"\n\n",
    "a second data line": b'data: {"choices":[]}\ndata: ' + SCRIPT + b"}\n\n",
    "a bare line": SCRIPT + b"\n\n",
}


@pytest.mark.parametrize("garbage", MID_STREAM.values(), ids=MID_STREAM.keys())
async def test_garbage_between_relayed_chunks_ends_the_stream_with_an_upstream_error(
    tmp_path: Path, garbage: bytes, safety_net: None
) -> None:
    writes = [ROLE + TOKENS[0], TOKENS[1] + garbage + TOKENS[2] + TOKENS[3], END]
    async with scripted_worker(writes) as url, routed_frontend(tmp_path, {"m": [url]}) as fe:
        reply = await send(fe, chat("m", stream=True))
        assert reply.status == 200
        assert reply.error()["type"] == "upstream_error"
        assert b"alert" not in reply.body and b"[1,2]" not in reply.body
        assert not reply.done
        assert b"tok0" in reply.body and b"tok3" not in reply.body
        await fe.app.wait_until_idle()
        assert fe.value("requests_total", status="error") == 1


async def test_garbage_before_the_first_token_is_a_502(tmp_path: Path, safety_net: None) -> None:
    writes = [b"data: " + SCRIPT + b"\n\n" + ROLE + TOKENS[0], END]
    async with scripted_worker(writes) as url, routed_frontend(tmp_path, {"m": [url]}) as fe:
        reply = await send(fe, chat("m", stream=True))
        assert reply.status == 502
        assert reply.error()["type"] == "upstream_error"
        assert b"alert" not in reply.body
        await fe.app.wait_until_idle()
        assert fe.value("requests_total", status="error") == 1


async def test_a_clean_stream_from_the_same_worker_is_relayed_whole(
    tmp_path: Path, safety_net: None
) -> None:
    writes = [ROLE + TOKENS[0], b"".join(TOKENS[1:]), END]
    async with scripted_worker(writes) as url, routed_frontend(tmp_path, {"m": [url]}) as fe:
        reply = await send(fe, chat("m", stream=True))
        assert reply.status == 200 and reply.done
        assert all(f"tok{i}".encode() in reply.body for i in range(4))


assert SAFETY_NET > 0  # the routed frontend's client waits at most this long per request
