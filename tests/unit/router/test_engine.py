"""The Router engine without sockets: a fake worker client, a fake clock."""

import asyncio
from collections.abc import AsyncGenerator

import pytest

from dynamo_llm.engines.base import EngineOutput, EngineRequest, OwnedStream, Usage
from dynamo_llm.engines.endpoints import COMPLETIONS
from dynamo_llm.errors import (
    Cancelled,
    ContextLengthExceeded,
    WorkerResponseTimeout,
    WorkerUnreachable,
)
from dynamo_llm.protocols.completions import decode_completion_request
from dynamo_llm.router import AttemptLimits, Router, WorkerSet
from dynamo_llm.runtime import EngineContext, FakeClock, StopReason
from tests.helpers import registered
from tests.unit.router.helpers import MODEL, inflight, router_over


class FakeClient:
    """Stands in for WorkerClient: scripted per worker URL."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.behaviour: dict[str, str] = {}
        self.opened: list[str] = []
        self.closed: list[str] = []

    async def open_stream(
        self,
        url: str,
        request: EngineRequest,
        ctx: EngineContext,
        *,
        first_token_timeout: float | None = None,
        is_ours: bool = False,
    ) -> AsyncGenerator[EngineOutput, None]:
        self.opened.append(url)
        kind = self.behaviour.get(url, "ok")
        if kind == "refuse":
            raise WorkerUnreachable("connection refused")
        if kind == "no-headers":
            await ctx.killed()  # waits until someone kills the attempt
            raise Cancelled("stopped while waiting for the worker")
        return self._stream(url, ctx, kind)

    async def _stream(
        self, url: str, ctx: EngineContext, kind: str
    ) -> AsyncGenerator[EngineOutput, None]:
        try:
            # "uncounted": a relayed stream, whose worker says the prompt's size at most in its
            # final usage.
            if kind == "role-first":  # a relayed chat: the role chunk carries no token
                yield EngineOutput("", 0)
            counted = kind not in ("uncounted", "role-first")
            yield EngineOutput("a", prompt_tokens=2 if counted else None)
            if kind == "silent":
                await ctx.stopped()
                return
            yield EngineOutput("b", finish_reason="stop", usage=Usage(2, 2))
        finally:
            self.closed.append(url)


def setup(
    *urls: str, limits: AttemptLimits | None = None
) -> tuple[FakeClock, WorkerSet, FakeClient, Router]:
    clock = FakeClock()
    client = FakeClient(clock)
    _, workers, router = router_over(client, urls, clock, limits=limits or AttemptLimits())
    return clock, workers, client, router


def request(rid: str = "r1") -> EngineRequest:
    params = decode_completion_request(b'{"model": "m", "prompt": "hi", "stream": true}')
    return COMPLETIONS.request(params, "hi", id=rid, model=MODEL, max_tokens=16)


async def test_a_stream_never_iterated_gives_its_worker_slot_back_when_closed() -> None:
    _, workers, _client, router = setup("http://a")
    stream = await router.generate(request(), EngineContext("r1"))
    assert isinstance(stream, OwnedStream)
    assert inflight(workers) == {"http://a": 1}
    await stream.aclose()
    assert inflight(workers) == {"http://a": 0}
    await router.aclose()


async def test_a_finished_stream_gives_the_slot_back_once() -> None:
    _, workers, client, router = setup("http://a")
    stream = await router.generate(request(), EngineContext("r1"))
    assert isinstance(stream, OwnedStream)
    texts = [out.text async for out in stream]
    assert texts == ["a", "b"]
    await stream.aclose()
    assert inflight(workers) == {"http://a": 0}
    assert client.closed == ["http://a"]
    await router.aclose()


async def test_a_worker_silent_before_its_headers_is_quarantined_by_the_attempt_timer() -> None:
    clock, workers, client, router = setup("http://a", limits=AttemptLimits(inactivity=1.0))
    client.behaviour["http://a"] = "no-headers"
    ctx = EngineContext("r1")
    task = asyncio.create_task(router.generate(request(), ctx))
    await clock.advance(0.999)
    assert not task.done()
    await clock.advance(0.001)
    with pytest.raises(WorkerResponseTimeout):
        async with asyncio.timeout(5):
            await task
    assert registered(workers, "http://a").quarantined
    assert not ctx.is_stopped, "only the attempt was stopped; the request decides what next"
    assert inflight(workers) == {"http://a": 0}
    await router.aclose()


async def test_silence_mid_stream_quarantines_and_reports_a_response_timeout() -> None:
    clock, workers, client, router = setup("http://a", limits=AttemptLimits(inactivity=1.0))
    client.behaviour["http://a"] = "silent"
    stream = await router.generate(request(), EngineContext("r1"))
    assert isinstance(stream, OwnedStream)
    assert (await stream.__anext__()).text == "a"
    nxt = asyncio.ensure_future(stream.__anext__())
    await clock.advance(1.0)
    with pytest.raises(WorkerResponseTimeout):
        async with asyncio.timeout(5):
            await nxt
    await stream.aclose()
    assert registered(workers, "http://a").quarantined
    assert inflight(workers) == {"http://a": 0}
    await router.aclose()


async def test_a_client_kill_is_not_held_against_the_worker() -> None:
    _, workers, client, router = setup("http://a")
    client.behaviour["http://a"] = "silent"
    ctx = EngineContext("r1")
    stream = await router.generate(request(), ctx)
    assert isinstance(stream, OwnedStream)
    await stream.__anext__()
    nxt = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    ctx.kill(StopReason.CLIENT_DISCONNECT)
    with pytest.raises(StopAsyncIteration):
        async with asyncio.timeout(5):
            await nxt
    await stream.aclose()
    assert not registered(workers, "http://a").quarantined
    assert registered(workers, "http://a").failures == 0
    await router.aclose()


async def test_a_refused_connection_quarantines_and_the_next_requests_go_elsewhere() -> None:
    _, workers, client, router = setup("http://a", "http://b")
    client.behaviour["http://a"] = "refuse"
    stream = await router.generate(request("r1"), EngineContext("r1"))  # retried on b
    assert isinstance(stream, OwnedStream)
    await stream.aclose()
    assert registered(workers, "http://a").quarantined
    for i in range(2):
        stream = await router.generate(request(f"r{i + 2}"), EngineContext(f"r{i + 2}"))
        assert isinstance(stream, OwnedStream)
        await stream.aclose()
    assert client.opened == ["http://a", "http://b", "http://b", "http://b"]
    assert inflight(workers) == {"http://a": 0, "http://b": 0}
    await router.aclose()


async def test_a_refused_dispatch_is_retried_on_another_worker_with_migration_off() -> None:
    _, workers, client, router = setup("http://a", "http://b", "http://c")
    client.behaviour = {"http://a": "refuse", "http://b": "refuse"}
    stream = await router.generate(request(), EngineContext("r1"))
    assert [out.text async for out in stream] == ["a", "b"]
    # Round-robin started at a; each refusing worker is tried once at most, then c serves.
    assert client.opened[0] == "http://a" and client.opened[-1] == "http://c"
    assert len(client.opened) == len(set(client.opened))
    assert all(registered(workers, url).quarantined for url in client.opened[:-1])
    assert inflight(workers) == {"http://a": 0, "http://b": 0, "http://c": 0}
    await router.aclose()


async def test_when_every_worker_refuses_the_client_gets_the_first_refusal() -> None:
    _, workers, client, router = setup("http://a", "http://b")
    client.behaviour = {"http://a": "refuse", "http://b": "refuse"}
    with pytest.raises(WorkerUnreachable):
        await router.generate(request(), EngineContext("r1"))
    assert client.opened == ["http://a", "http://b"]
    assert inflight(workers) == {"http://a": 0, "http://b": 0}
    await router.aclose()


async def test_the_frontends_count_goes_on_a_first_output_that_has_none() -> None:
    _, workers, client, router = setup("http://a")
    seen: list[EngineRequest] = []

    async def prompt_ids(req: EngineRequest) -> list[int] | None:
        seen.append(req)
        return [1, 2, 3]

    router.prompt_ids = prompt_ids
    client.behaviour["http://a"] = "uncounted"
    outs = [out async for out in await router.generate(request(), EngineContext("r1"))]
    assert [out.prompt_tokens for out in outs] == [3, None]
    # A worker that says it on its first output keeps its own count.
    client.behaviour["http://a"] = "ok"
    outs = [out async for out in await router.generate(request("r2"), EngineContext("r2"))]
    assert [out.prompt_tokens for out in outs] == [2, None]
    # The first output with a token gets it: the HTTP layer records the prompt's size with the
    # first token (an output without tokens is not one), so a count on the role chunk was lost.
    client.behaviour["http://a"] = "role-first"
    outs = [out async for out in await router.generate(request("r3"), EngineContext("r3"))]
    assert [out.prompt_tokens for out in outs] == [None, 3, None]
    assert len(seen) == 3 and inflight(workers) == {"http://a": 0}
    await router.aclose()


async def test_a_prompt_longer_than_the_context_window_is_refused_before_dispatch() -> None:
    _, workers, client, router = setup("http://a")

    async def prompt_ids(req: EngineRequest) -> list[int] | None:
        return list(range(10))

    router.prompt_ids = prompt_ids
    router.context_length = lambda model: 20 if model == MODEL else None
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 20 tokens"):
        await router.generate(request(), EngineContext("r1"))  # 10 + max_tokens 16 > 20
    assert client.opened == []
    router.context_length = lambda model: 26
    stream = await router.generate(request("r2"), EngineContext("r2"))
    assert [out.text async for out in stream] == ["a", "b"]
    assert client.opened == ["http://a"] and inflight(workers) == {"http://a": 0}
    await router.aclose()
