"""Client hang-ups over real sockets, under granian (RSGI) and uvicorn (ASGI).

In each case the engine's own record must show its context killed by the hang-up alone: the engine
hangs forever and no timeout is set, so nothing else can kill it (a frontend that noticed only on
its next write never would, and the safety net fires); how many milliseconds the hang-up takes to
reach the engine is bench/bench_hangup.py's to measure, not a test's. The disconnect and the
cancellation are counted exactly once, the request is counted once as
cancelled, and the in-flight gauge returns to 0.
"""

import asyncio
import socket

import msgspec
import pytest

from dynamo_llm.testing import FakeEngine, running_frontend
from tests.system.raw_http import raw_post, read_events

MODEL = "test-model"

pytestmark = pytest.mark.parametrize("interface", ["rsgi", "asgi"])


def hang_up(writer: asyncio.StreamWriter, how: str) -> None:
    """Close the client side now."""
    sock = writer.get_extra_info("socket")
    if how == "rst":
        writer.transport.abort()
    else:
        sock.shutdown(socket.SHUT_RDWR)
        writer.close()


CASES = {
    "unary": ("/v1/chat/completions", False, 0, "unary"),
    "before-first-item": ("/v1/chat/completions", True, 0, "stream"),
    "mid-stream": ("/v1/chat/completions", True, 2, "stream"),
    "completions-mid-stream": ("/v1/completions", True, 2, "stream"),
}


@pytest.mark.parametrize("how", ["rst", "fin"])
@pytest.mark.parametrize("case", list(CASES))
async def test_client_hang_up_kills_the_engine_context_at_once(
    interface: str, case: str, how: str
) -> None:
    path, stream, hang_after, request_type = CASES[case]
    endpoint = "chat_completions" if "chat" in path else "completions"
    payload: dict[str, object] = {"model": MODEL, "stream": stream}
    if endpoint == "chat_completions":
        payload["messages"] = [{"role": "user", "content": "hi"}]
    else:
        payload["prompt"] = "hi"
    engine = FakeEngine(tokens=["a", "b", "c", "d"], hang_after=hang_after)
    async with running_frontend(engine, model=MODEL, interface=interface) as fe:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", fe.server.port)
            writer.write(raw_post(path, msgspec.json.encode(payload)))
            await writer.drain()
            await engine.called.wait()
            call = engine.last
            await call.waiting.wait()
            if hang_after:
                await read_events(reader, hang_after)
            assert not call.killed.is_set()
            hang_up(writer, how)
            await call.killed.wait()
            await fe.app.wait_until_idle()
        assert call.killed_at is not None
        assert call.closed.is_set()
        assert fe.value("disconnected_clients") == 1
        assert (
            fe.value(
                "model_cancellation_total",
                model=MODEL,
                endpoint=endpoint,
                request_type=request_type,
            )
            == 1
        )
        assert fe.value("requests_total", status="error", error_type="cancelled") == 1
        assert fe.value("requests_total") == 1
        assert fe.value("inflight_requests") == 0
        assert fe.value("queued_requests") == 0


async def test_frontend_serves_normally_after_many_hang_ups(interface: str) -> None:
    engine = FakeEngine(tokens=["a", "b"], hang_after=1)
    async with running_frontend(engine, model=MODEL, interface=interface) as fe:
        async with asyncio.timeout(20):
            for i in range(20):
                _, writer = await asyncio.open_connection("127.0.0.1", fe.server.port)
                payload = {
                    "model": MODEL,
                    "stream": i % 2 == 0,
                    "messages": [{"role": "user", "content": "x"}],
                }
                writer.write(raw_post("/v1/chat/completions", msgspec.json.encode(payload)))
                await writer.drain()
                while len(engine.calls) <= i:
                    engine.called.clear()
                    await engine.called.wait()
                await engine.calls[i].waiting.wait()
                hang_up(writer, "rst")
                await engine.calls[i].killed.wait()
            await fe.app.wait_until_idle()
        assert fe.value("requests_total", error_type="cancelled") == 20
        assert fe.value("disconnected_clients") == 20
        assert fe.value("inflight_requests") == 0
        engine.hang_after = None
        import httpx

        async with httpx.AsyncClient(base_url=fe.base_url) as client:
            r = await client.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
            )
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == "ab"
