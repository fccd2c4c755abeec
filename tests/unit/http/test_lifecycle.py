"""The request lifecycle in simulated time: the disconnect monitor's outcome table, timeouts,
shutdown, without sockets (FakeConnection) and with a fake clock."""

import asyncio
import json
from typing import Any

import msgspec
import pytest

from dynamo_llm.config import Config
from dynamo_llm.errors import EngineError
from dynamo_llm.http.app import ServedModel, create_app
from dynamo_llm.metrics import Metrics
from dynamo_llm.runtime import FakeClock, StopReason
from dynamo_llm.testing import FakeConnection, FakeEngine, make_request

MODEL = "m"


def chat_body(stream: bool = True, **extra: Any) -> bytes:
    return msgspec.json.encode(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}
    )


class Harness:
    def __init__(self, engine: FakeEngine, clock: FakeClock, config: Config) -> None:
        self.engine = engine
        self.clock = clock
        self.metrics = Metrics()
        self.app = create_app(config, [ServedModel(MODEL, engine)], self.metrics, clock)

    def start(
        self, body: bytes, path: str = "/v1/chat/completions"
    ) -> tuple[FakeConnection, asyncio.Task[None]]:
        conn = FakeConnection(body)
        task = asyncio.create_task(self.app.handle(make_request(path), conn))
        return conn, task

    def requests_total(self, status: str, error_type: str, request_type: str = "stream") -> float:
        return self.metrics.requests_total.labels(
            MODEL, "chat_completions", request_type, status, error_type
        ).value

    def disconnects(self) -> float:
        return self.metrics.disconnected_clients.labels().value

    def cancellations(self, request_type: str = "stream") -> float:
        return self.metrics.model_cancellation_total.labels(
            MODEL, "chat_completions", request_type
        ).value

    def gauges_are_zero(self) -> bool:
        return (
            self.metrics.inflight_requests.labels(MODEL).value == 0
            and self.metrics.queued_requests.labels(MODEL).value == 0
        )

    def total_requests(self) -> float:
        total: float = sum(c.value for c in self.metrics.requests_total.children.values())
        return total


def harness(engine_kwargs: dict[str, Any] | None = None, **env: float) -> Harness:
    clock = FakeClock()
    engine = FakeEngine(clock=clock, **(engine_kwargs or {}))
    config = Config.from_env({k: str(v) for k, v in env.items()})
    return Harness(engine, clock, config)


async def finish(task: asyncio.Task[None]) -> None:
    async with asyncio.timeout(5):
        await task


def response_json(conn: FakeConnection) -> Any:
    """The unary response's body, parsed; fails the test if none was written."""
    assert conn.response_body is not None, "no unary response"
    return json.loads(conn.response_body)


def events(conn: FakeConnection) -> list[str]:
    """The SSE events written, each with its trailing blank line."""
    return [e + "\n\n" for e in conn.text.split("\n\n") if e]


async def test_stream_that_ends_sends_done_and_counts_success() -> None:
    h = harness()
    conn, task = h.start(chat_body())
    await finish(task)
    frames = events(conn)
    assert conn.status == 200
    assert frames[-1] == "data: [DONE]\n\n"
    text = "".join(json.loads(f[6:])["choices"][0]["delta"].get("content", "") for f in frames[:-1])
    assert text == "Hello, world!"
    assert h.requests_total("success", "") == 1
    assert h.disconnects() == 0
    assert h.gauges_are_zero()


async def test_backend_error_mid_stream_sends_error_frame_and_is_not_a_disconnect() -> None:
    h = harness({"fail_after": 2, "error": EngineError("backend exploded")})
    conn, task = h.start(chat_body())
    await finish(task)
    frames = events(conn)
    assert len(frames) == 3
    assert frames[-1] == (
        'event: error\ndata: {"error":{"message":"backend exploded","type":"internal_error",'
        '"param":null,"code":null}}\n\n'
    )
    assert "[DONE]" not in conn.text
    assert h.requests_total("error", "internal") == 1
    assert (h.disconnects(), h.cancellations()) == (0, 0)
    assert h.engine.last.ctx.is_killed
    assert h.gauges_are_zero()


async def test_unexpected_exception_in_engine_is_sanitised() -> None:
    h = harness({"fail_after": 1, "error": ValueError("secret <object at 0xdeadbeef>")})
    conn, task = h.start(chat_body())
    await finish(task)
    assert "0xdeadbeef" not in conn.text
    assert '"message":"Internal server error"' in conn.text
    assert h.requests_total("error", "internal") == 1


async def test_engine_error_before_first_item_is_an_http_error_not_a_200() -> None:
    h = harness({"fail_after": 0, "error": EngineError("no capacity")})
    conn, task = h.start(chat_body())
    await finish(task)
    assert conn.status == 500
    assert conn.frames == []
    assert response_json(conn)["error"]["message"] == "no capacity"
    assert h.requests_total("error", "internal") == 1


@pytest.mark.parametrize("hang_after", [0, 2], ids=["before-first-item", "mid-stream"])
async def test_client_hang_up_in_stream_phase_kills_engine_and_counts_once(
    hang_after: int,
) -> None:
    h = harness({"hang_after": hang_after})
    conn, task = h.start(chat_body())
    async with asyncio.timeout(5):
        await h.engine.called.wait()
        await h.engine.last.waiting.wait()
    sent_before = len(events(conn))
    conn.hang_up()
    await finish(task)
    call = h.engine.last
    assert call.killed.is_set()
    assert call.ctx.reason is StopReason.CLIENT_DISCONNECT
    assert call.closed.is_set(), "the engine's stream was closed"
    assert len(events(conn)) == sent_before == hang_after
    assert (h.disconnects(), h.cancellations()) == (1, 1)
    assert h.requests_total("error", "cancelled") == 1
    assert h.total_requests() == 1
    assert h.gauges_are_zero()


async def test_client_hang_up_during_unary_request_kills_engine_and_writes_nothing() -> None:
    h = harness({"hang_after": 1})
    conn, task = h.start(chat_body(stream=False))
    async with asyncio.timeout(5):
        await h.engine.called.wait()
        await h.engine.last.waiting.wait()
    conn.hang_up()
    await finish(task)
    assert h.engine.last.killed.is_set()
    assert conn.status is None and conn.frames == []
    assert (h.disconnects(), h.cancellations("unary")) == (1, 1)
    assert h.requests_total("error", "cancelled", "unary") == 1
    assert h.gauges_are_zero()


async def test_zombie_engine_hits_the_inactivity_window_and_gets_an_error_frame() -> None:
    # DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS=1: the HTTP layer waits 2 s.
    h = harness({"hang_after": 2, "honour_cancel": False}, DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS=1)
    conn, task = h.start(chat_body())
    async with asyncio.timeout(5):
        await h.engine.called.wait()
        await h.engine.last.waiting.wait()
    await h.clock.advance(1.999)
    assert not task.done()
    await h.clock.advance(0.001)
    await finish(task)
    frames = events(conn)
    assert frames[-1].startswith('event: error\ndata: {"error":{"message":"The engine sent nothing')
    assert '"type":"timeout_error"' in frames[-1]
    assert "[DONE]" not in conn.text
    assert h.requests_total("error", "response_timeout") == 1
    assert h.requests_total("error", "cancelled") == 0
    assert (h.disconnects(), h.cancellations()) == (0, 0)
    call = h.engine.last
    assert call.ctx.is_killed and call.ctx.reason is StopReason.INACTIVITY_TIMEOUT
    assert call.closed.is_set()
    assert h.gauges_are_zero()


async def test_zombie_before_first_item_gets_a_504() -> None:
    h = harness({"hang_after": 0, "honour_cancel": False}, DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS=1)
    conn, task = h.start(chat_body())
    async with asyncio.timeout(5):
        await h.engine.called.wait()
        await h.engine.last.waiting.wait()
    await h.clock.advance(2)
    await finish(task)
    assert conn.status == 504
    assert response_json(conn)["error"]["type"] == "timeout_error"
    assert h.requests_total("error", "response_timeout") == 1


async def test_zombie_unary_request_gets_a_504() -> None:
    h = harness({"hang_after": 1, "honour_cancel": False}, DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS=1)
    conn, task = h.start(chat_body(stream=False))
    async with asyncio.timeout(5):
        await h.engine.called.wait()
        await h.engine.last.waiting.wait()
    await h.clock.advance(2)
    await finish(task)
    assert conn.status == 504
    assert h.requests_total("error", "response_timeout", "unary") == 1
    assert h.engine.last.ctx.is_killed
    assert h.gauges_are_zero()


async def test_slow_engine_with_gaps_shorter_than_the_window_completes() -> None:
    # Window 2 x 5 = 10 s; five tokens 4 s apart: 20 s in all, never 10 s of silence.
    h = harness(
        {"gap": 4.0, "tokens": ["a", "b", "c", "d", "e"]}, DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS=5
    )
    conn, task = h.start(chat_body())
    async with asyncio.timeout(5):
        await h.engine.called.wait()
        for _ in range(5):
            await h.engine.last.waiting.wait()
            await h.clock.advance(4.0)
        await finish(task)
    assert h.clock.now() == 20.0
    assert events(conn)[-1] == "data: [DONE]\n\n"
    assert len(events(conn)) == 6
    assert h.requests_total("success", "") == 1
    assert h.gauges_are_zero()


async def test_first_token_timeout_gives_504_before_any_byte() -> None:
    h = harness({"gap": 10.0}, DYN_HTTP_FIRST_TOKEN_TIMEOUT_SECS=3)
    conn, task = h.start(chat_body())
    async with asyncio.timeout(5):
        await h.engine.called.wait()
        await h.engine.last.waiting.wait()
    await h.clock.advance(3)
    await finish(task)
    assert conn.status == 504
    assert h.requests_total("error", "response_timeout") == 1
    assert h.engine.last.killed.is_set()


async def test_request_deadline_ends_a_live_stream_with_an_error_frame() -> None:
    h = harness({"gap": 1.0, "tokens": ["t"] * 10}, DYN_HTTP_REQUEST_TIMEOUT_SECS=3)
    conn, task = h.start(chat_body())
    async with asyncio.timeout(5):
        await h.engine.called.wait()
        for _ in range(3):
            await h.engine.last.waiting.wait()
            await h.clock.advance(1.0)
        await finish(task)
    assert '"code":"deadline_exceeded"' in events(conn)[-1]
    assert h.engine.last.ctx.reason is StopReason.DEADLINE
    assert h.requests_total("error", "response_timeout") == 1


async def test_kill_that_happens_before_the_source_ends_is_a_cancellation() -> None:
    h = harness({"hang_after": 1})
    conn, task = h.start(chat_body())
    async with asyncio.timeout(5):
        await h.engine.called.wait()
        await h.engine.last.waiting.wait()
    # Killed from elsewhere (not the client, not a timeout): the engine honours it and ends its
    # stream normally, which must not be mistaken for a natural end.
    h.engine.last.ctx.kill(StopReason.EXPLICIT)
    await finish(task)
    assert "[DONE]" not in conn.text
    assert h.requests_total("error", "cancelled") == 1
    assert h.requests_total("success", "") == 0
    assert (h.disconnects(), h.cancellations()) == (0, 0)


async def test_shutdown_waits_for_grace_then_kills_with_reason_shutdown() -> None:
    h = harness({"hang_after": 1}, DYN_HTTP_GRACEFUL_SHUTDOWN_TIMEOUT_SECS=5)
    conn, task = h.start(chat_body())
    async with asyncio.timeout(5):
        await h.engine.called.wait()
        await h.engine.last.waiting.wait()
    shutdown = asyncio.create_task(h.app.shutdown())
    await h.clock.advance(4.9)
    assert not h.engine.last.ctx.is_stopped, "requests in flight get the grace period"
    assert h.app.shutting_down
    await h.clock.advance(0.1)
    async with asyncio.timeout(5):
        await shutdown
    await finish(task)
    assert h.engine.last.ctx.reason is StopReason.SHUTDOWN
    assert '"type":"service_unavailable_error"' in events(conn)[-1]
    assert h.requests_total("error", "cancelled") == 1
    assert h.gauges_are_zero()


async def test_shutdown_returns_at_once_when_idle_and_lets_finishing_requests_finish() -> None:
    h = harness({"gap": 1.0})
    conn, task = h.start(chat_body())
    async with asyncio.timeout(5):
        await h.engine.called.wait()
    shutdown = asyncio.create_task(h.app.shutdown())
    for _ in range(4):
        await h.engine.last.waiting.wait()
        await h.clock.advance(1.0)
    async with asyncio.timeout(5):
        await shutdown
        await finish(task)
    assert events(conn)[-1] == "data: [DONE]\n\n"
    assert h.requests_total("success", "") == 1


async def test_batch_completion_hang_up_kills_every_sub_request() -> None:
    h = harness({"hang_after": 1})
    body = msgspec.json.encode({"model": MODEL, "prompt": ["a", "b", "c"], "stream": True})
    conn, task = h.start(body, "/v1/completions")
    async with asyncio.timeout(5):
        while len(h.engine.calls) < 3:
            await h.engine.called.wait()
            h.engine.called.clear()
        for call in h.engine.calls:
            await call.waiting.wait()
    conn.hang_up()
    await finish(task)
    assert [c.request.id.rsplit("-", 1)[1] for c in h.engine.calls] == ["0", "1", "2"]
    assert all(c.killed.is_set() and c.closed.is_set() for c in h.engine.calls)
    assert (
        h.metrics.requests_total.labels(MODEL, "completions", "stream", "error", "cancelled").value
        == 1
    )
    assert h.metrics.disconnected_clients.labels().value == 1
    assert h.gauges_are_zero()


async def test_include_usage_adds_a_usage_chunk_before_done() -> None:
    h = harness()
    conn, task = h.start(chat_body(stream_options={"include_usage": True}))
    await finish(task)
    usage_chunk = json.loads(events(conn)[-2][6:])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 4
    assert usage_chunk["usage"]["prompt_tokens"] == 3


async def test_worker_stop_route_stops_the_request_gracefully() -> None:
    h = harness({"hang_after": 1})
    h.app.control_routes = True
    _, task = h.start(chat_body(), path="/v1/chat/completions")
    async with asyncio.timeout(5):
        await h.engine.called.wait()
        await h.engine.last.waiting.wait()
    control = FakeConnection(b"")
    request_id = h.engine.last.ctx.id
    await h.app.handle(make_request(f"/v1/requests/{request_id}/stop"), control)
    assert control.status == 200
    assert response_json(control) == {"id": request_id, "stopped": 1}
    await finish(task)
    call = h.engine.last
    assert call.stopped.is_set() and not call.killed.is_set()
    assert h.requests_total("error", "cancelled") == 1
    missing = FakeConnection(b"")
    await h.app.handle(make_request("/v1/requests/nope/stop"), missing)
    assert missing.status == 404


async def test_stop_route_is_off_unless_enabled() -> None:
    h = harness()
    conn = FakeConnection(b"")
    await h.app.handle(make_request("/v1/requests/x/stop"), conn)
    assert conn.status == 404
    assert response_json(conn)["error"]["code"] == "route_not_found"


async def test_a_burst_is_written_once_and_nothing_waits_behind_a_slow_engine() -> None:
    # Four tokens ready at once, then the engine waits before the fifth.
    h = harness({"tokens": ["a", "b", "c", "d", "e"], "gaps": [0, 0, 0, 0, 5.0]})
    conn, task = h.start(chat_body())
    async with asyncio.timeout(5):
        await h.engine.called.wait()
        await h.engine.last.waiting.wait()
    assert len(conn.frames) == 1, "the burst went out as one write"
    assert len(events(conn)) == 4, "and it was written before the engine waited"
    await h.clock.advance(5.0)
    await finish(task)
    assert len(events(conn)) == 6  # five chunks and [DONE]
    assert events(conn)[-1] == "data: [DONE]\n\n"
