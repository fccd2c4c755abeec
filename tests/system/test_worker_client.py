"""The remote worker client against real worker processes on loopback.

Each test runs one bad worker (:mod:`dynamo_llm.testing.bad_workers`) and checks what the client
yields or raises, what the worker itself recorded (its request body, its disconnects, with
timestamps from the system-wide monotonic clock), and that no upstream connection is left
acquired afterwards.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import msgspec
import pytest

from dynamo_llm.engines.base import EngineOutput, EngineRequest, Usage
from dynamo_llm.engines.endpoints import CHAT, COMPLETIONS
from dynamo_llm.errors import (
    AllWorkersBusy,
    Cancelled,
    InvalidRequest,
    UpstreamError,
    WorkerDisconnected,
    WorkerResponseTimeout,
    WorkerUnreachable,
)
from dynamo_llm.protocols.chat import ChatCompletionRequest, ChatMessage
from dynamo_llm.protocols.common import StreamOptions
from dynamo_llm.protocols.completions import CompletionRequest
from dynamo_llm.runtime.context import EngineContext
from dynamo_llm.testing.bad_workers import spawn_bad_worker
from dynamo_llm.testing.recording_worker import recording_worker
from dynamo_llm.transport import (
    RemoteStream,
    WorkerClient,
    make_session,
)
from dynamo_llm.transport.auth import WorkerKeys

SERVED = "served-model"
SAFETY_NET = 10.0
TOKENS = [f"tok{i}" for i in range(5)]


@pytest.fixture
async def client() -> AsyncIterator[WorkerClient]:
    session = make_session(connect_timeout=2.0)
    client = WorkerClient(session)
    try:
        yield client
        # No leak: every stream gave its connection back (pooled or closed).
        assert client.pool.open == client.pool.idle
    finally:
        await client.aclose()
        await session.close()


def idle_connections(client: WorkerClient) -> int:
    return client.pool.idle


def chat(
    *,
    stream: bool = True,
    include_usage: bool = False,
    max_tokens: int | None = None,
    return_token_ids: bool = False,
    messages: list[ChatMessage] | None = None,
    request_id: str | None = None,
) -> EngineRequest:
    params = ChatCompletionRequest(
        model=SERVED,
        messages=[ChatMessage("user", "say some tokens")] if messages is None else messages,
        stream=stream,
        stream_options=StreamOptions(include_usage=True) if include_usage else None,
        max_tokens=max_tokens,
        return_token_ids=return_token_ids,
    )
    return CHAT.request(
        params, id=request_id or uuid.uuid4().hex, model=SERVED, max_tokens=max_tokens
    )


def completion(*, stream: bool = True, prompt: str | list[str] = "one two three") -> EngineRequest:
    # A copy typed as the wire's list (list is invariant, so a list[str] is not one).
    wire: str | list[str | int | list[int]] = prompt if isinstance(prompt, str) else list(prompt)
    params = CompletionRequest(model=SERVED, prompt=wire, stream=stream)
    first = prompt if isinstance(prompt, str) else prompt[0]
    return COMPLETIONS.request(params, first, id=uuid.uuid4().hex, model=SERVED, max_tokens=None)


async def collect(stream: RemoteStream) -> list[EngineOutput]:
    return [out async for out in stream]


def sse_events(raw: bytes) -> list[bytes]:
    """The data of each event of a complete SSE body; every event must be a data event."""
    assert raw.endswith(b"\n\n")
    events = raw[:-2].split(b"\n\n")
    assert all(event.startswith(b"data: ") for event in events), events
    return [event[len(b"data: ") :] for event in events]


# --- the relay -------------------------------------------------------------------------------


async def test_relay_passes_complete_events_with_our_id_and_model(client: WorkerClient) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("ok", foreign_ids=True) as w:
        request = chat()
        ctx = EngineContext(request.id)
        stream = await client.open_stream(w.url, request, ctx, model="bad-model")
        outputs = await collect(stream)
        pooled = idle_connections(client)  # before the worker exits and closes it
        seen = await w.request_record(request.id)
    assert not net.expired()

    assert all(out.raw is not None for out in outputs)
    body = b"".join(out.raw or b"" for out in outputs) + b"data: [DONE]\n\n"
    events = sse_events(body)
    assert events[-1] == b"[DONE]"
    chunks = [msgspec.json.decode(data) for data in events[:-1]]
    assert {c["id"] for c in chunks} == {f"chatcmpl-{request.id}"}
    assert {c["model"] for c in chunks} == {SERVED}
    assert stream.upstream_id != f"chatcmpl-{request.id}"  # the worker used its own id
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "".join(TOKENS)
    assert all(c["choices"] for c in chunks), "the usage-only chunk is not relayed"
    assert sum(out.num_tokens for out in outputs) == len(TOKENS)
    assert outputs[-1].finish_reason == "stop"
    assert outputs[-1].usage == Usage(3, len(TOKENS))
    assert sum(out.usage is not None for out in outputs) == 1

    # What the worker received: always a stream with usage, our id, the worker's model name.
    assert seen["completed"] and not seen["disconnected"]
    assert seen["body"]["stream"] is True
    assert seen["body"]["stream_options"] == {"include_usage": True}
    assert seen["body"]["model"] == "bad-model"
    # A finished stream gives its connection back to the pool.
    assert pooled == 1


async def test_relay_from_a_worker_using_our_id_needs_no_rewrite(client: WorkerClient) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("ok", model=SERVED) as w:
        request = chat(include_usage=True)
        stream = await client.open_stream(w.url, request, EngineContext(request.id))
        outputs = await collect(stream)
    assert not net.expired()
    assert stream.upstream_id == f"chatcmpl-{request.id}"
    assert stream.rewrites == ()
    chunks = [msgspec.json.decode(d) for d in sse_events(b"".join(o.raw or b"" for o in outputs))]
    # The client asked for usage: it rides on the last output, for the frontend to render once.
    assert all(c["choices"] for c in chunks)
    assert outputs[-1].usage == Usage(3, len(TOKENS))


async def test_completions_relay_uses_cmpl_ids(client: WorkerClient) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("ok", foreign_ids=True) as w:
        request = completion()
        stream = await client.open_stream(w.url, request, EngineContext(request.id))
        outputs = await collect(stream)
    assert not net.expired()
    chunks = [msgspec.json.decode(d) for d in sse_events(b"".join(o.raw or b"" for o in outputs))]
    assert {c["id"] for c in chunks} == {f"cmpl-{request.id}"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == "".join(TOKENS)
    assert sum(out.num_tokens for out in outputs) == len(TOKENS)


async def test_unary_client_gets_parsed_text_and_usage(client: WorkerClient) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("ok", tokens=8) as w:
        request = chat(stream=False, max_tokens=6)
        stream = await client.open_stream(w.url, request, EngineContext(request.id))
        outputs = await collect(stream)
        seen = await w.request_record(request.id)
    assert not net.expired()
    assert all(out.raw is None for out in outputs)
    assert "".join(out.text for out in outputs) == "".join(f"tok{i}" for i in range(6))
    assert sum(out.num_tokens for out in outputs) == 6
    assert outputs[-1].finish_reason == "length"
    assert outputs[-1].usage == Usage(3, 6)
    assert sum(out.usage is not None for out in outputs) == 1
    assert seen["body"]["stream"] is True  # always streamed upstream, folded by the frontend
    assert seen["body"]["max_tokens"] == 6


async def test_track_tokens_parses_token_ids_and_still_relays(client: WorkerClient) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("ok") as w:
        request = chat(return_token_ids=True)
        stream = await client.open_stream(
            w.url, request, EngineContext(request.id), track_tokens=True
        )
        outputs = await collect(stream)
    assert not net.expired()
    assert all(out.raw is not None for out in outputs)
    assert [i for out in outputs for i in out.token_ids or ()] == list(range(len(TOKENS)))
    assert "".join(out.text for out in outputs) == "".join(TOKENS)
    chunks = [msgspec.json.decode(d) for d in sse_events(b"".join(o.raw or b"" for o in outputs))]
    assert [c["choices"][0].get("token_ids") for c in chunks[1:-1]] == [[i] for i in range(5)]


async def test_track_tokens_without_client_asking_relays_the_bytes_with_their_token_ids(
    client: WorkerClient,
) -> None:
    # With migration on the raw relay is kept: the ids stay in the bytes, for the migration
    # state to parse if the request migrates (it strips them before the client sees them:
    # tests/unit/router/test_migration_raw.py).
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("ok") as w:
        request = chat()
        stream = await client.open_stream(
            w.url, request, EngineContext(request.id), track_tokens=True
        )
        outputs = await collect(stream)
        seen = await w.request_record(request.id)
    assert not net.expired()
    assert seen["body"]["return_token_ids"] is True
    assert all(out.raw is not None for out in outputs)
    relayed = b"".join(out.raw or b"" for out in outputs)
    assert all(f'"token_ids":[{i}]'.encode() in relayed for i in range(len(TOKENS)))


async def test_batch_element_goes_upstream_alone_and_is_parsed(client: WorkerClient) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("ok") as w:
        request = completion(prompt=["alpha beta", "gamma"])
        stream = await client.open_stream(w.url, request, EngineContext(request.id))
        outputs = await collect(stream)
        seen = await w.request_record(request.id)
    assert not net.expired()
    assert seen["body"]["prompt"] == "alpha beta"
    assert all(out.raw is None for out in outputs)
    assert "".join(out.text for out in outputs) == "".join(TOKENS)
    assert outputs[-1].usage == Usage(2, len(TOKENS))


async def test_slow_but_alive_worker_is_not_cut_by_the_first_token_timeout(
    client: WorkerClient,
) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("slow", tokens=4, gap=0.1) as w:
        request = chat()
        stream = await client.open_stream(
            w.url, request, EngineContext(request.id), first_token_timeout=0.25
        )
        outputs = await collect(stream)
    assert not net.expired()
    assert sum(out.num_tokens for out in outputs) == 4


# --- cancellation across the wire ------------------------------------------------------------


async def first_token(stream: RemoteStream) -> EngineOutput:
    async for out in stream:
        if out.num_tokens:
            return out
    raise AssertionError("the stream ended before its first token")


async def test_kill_closes_the_upstream_connection_at_once(client: WorkerClient) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        spawn_bad_worker("ok", tokens=1000, gap=0.01) as w,
    ):
        request = chat()
        ctx = EngineContext(request.id)
        stream = await client.open_stream(w.url, request, ctx)
        await first_token(stream)
        ctx.kill()
        # Before the stream is read again: the kill itself closed the connection (the worker
        # would otherwise stream on for 10 s, past the record's 5 s wait).
        seen = await w.request_record(request.id)
        rest = await collect(stream)  # ends quietly, without draining
    assert not net.expired()
    assert rest == []
    assert seen["disconnected"] and not seen["completed"]
    assert idle_connections(client) == 0


async def test_graceful_stop_of_a_foreign_worker_closes_the_connection(
    client: WorkerClient,
) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        spawn_bad_worker("ok", tokens=1000, gap=0.01) as w,
    ):
        request = chat()
        ctx = EngineContext(request.id)
        stream = await client.open_stream(w.url, request, ctx, is_ours=False)
        await first_token(stream)
        ctx.stop()
        seen = await w.request_record(request.id)  # before the stream is read again, as above
        await collect(stream)
    assert not net.expired()
    assert seen["disconnected"] and not seen["stopped"] and not seen["completed"]


@pytest.mark.parametrize("request_id", ["plain-id", "with/slash?and #hash%"])
async def test_graceful_stop_of_our_worker_asks_it_to_stop_and_reads_to_the_end(
    client: WorkerClient, request_id: str
) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        spawn_bad_worker("ok", tokens=1000, gap=0.01) as w,
    ):
        request = chat(request_id=request_id)
        ctx = EngineContext(request.id)
        stream = await client.open_stream(w.url, request, ctx, is_ours=True)
        await first_token(stream)
        ctx.stop()
        rest = await collect(stream)  # the worker ends the body; no error although no [DONE]
        pooled = idle_connections(client)
        seen = await w.request_record(request.id)
    assert not net.expired()
    assert seen["stopped"] and not seen["disconnected"] and not seen["completed"]
    assert sum(out.num_tokens for out in rest) < 1000
    assert pooled >= 1  # the body ended cleanly: the connection is reusable


async def test_aclose_of_an_abandoned_stream_closes_the_connection(client: WorkerClient) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        spawn_bad_worker("ok", tokens=1000, gap=0.01) as w,
    ):
        request = chat()
        stream = await client.open_stream(w.url, request, EngineContext(request.id))
        await first_token(stream)
        await stream.aclose()
        seen = await w.request_record(request.id)
    assert not net.expired()
    assert seen["disconnected"] and not seen["completed"]


async def test_aclose_of_a_stream_never_iterated_closes_the_connection(
    client: WorkerClient,
) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        spawn_bad_worker("ok", tokens=1000, gap=0.01) as w,
    ):
        request = chat()
        stream = await client.open_stream(w.url, request, EngineContext(request.id))
        await stream.aclose()
        seen = await w.request_record(request.id)
    assert not net.expired()
    assert seen["disconnected"]


async def test_cancelling_the_consumer_closes_the_connection(client: WorkerClient) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        spawn_bad_worker("ok", tokens=1000, gap=0.01) as w,
    ):
        request = chat()
        stream = await client.open_stream(w.url, request, EngineContext(request.id))
        await first_token(stream)
        consumer = asyncio.create_task(collect(stream))
        await asyncio.sleep(0)  # let it start waiting on the socket
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        seen = await w.request_record(request.id)
    assert not net.expired()
    assert seen["disconnected"]


async def test_aclose_from_another_task_ends_a_waiting_consumer_quietly(
    client: WorkerClient,
) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        spawn_bad_worker("ok", tokens=1000, gap=0.01) as w,
    ):
        request = chat()
        stream = await client.open_stream(w.url, request, EngineContext(request.id))
        await first_token(stream)
        consumer = asyncio.create_task(collect(stream))
        await asyncio.sleep(0)  # let it start waiting on the socket
        await stream.aclose()
        await consumer  # ends without an error
        seen = await w.request_record(request.id)
    assert not net.expired()
    assert seen["disconnected"]


@pytest.mark.parametrize("whole", [False, True], ids=["stream", "whole-answer"])
async def test_kill_while_waiting_for_headers_cancels_the_admission(
    client: WorkerClient, whole: bool
) -> None:
    # A whole answer's headers come with it, after the generation (a gap per token here).
    worker = spawn_bad_worker("ok", gap=1.0) if whole else spawn_bad_worker("zombie")
    async with asyncio.timeout(SAFETY_NET) as net, worker as w:
        request = chat(stream=not whole)
        ctx = EngineContext(request.id)
        opening = (
            client.open_answer(w.url, request, ctx)
            if whole
            else client.open_stream(w.url, request, ctx)
        )
        admission = asyncio.create_task(opening)
        await w.record(arrived=request.id)
        ctx.kill()
        with pytest.raises(Cancelled):
            await admission
        seen = await w.request_record(request.id)
    # The zombie never answers and the whole answer is 5 s of generation away: only the kill can
    # have closed the connection by now.
    assert not net.expired()
    assert seen["disconnected"] and not seen["completed"]


# --- faults ----------------------------------------------------------------------------------


async def test_refused_connection_is_unreachable_at_admission(client: WorkerClient) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("refuse") as w:
        request = chat()
        with pytest.raises(WorkerUnreachable) as caught:
            await client.open_stream(w.url, request, EngineContext(request.id))
    assert not net.expired()
    assert caught.value.quarantines and caught.value.migratable
    assert "refused" in caught.value.message


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999", "http://127.0.0.1:port", "http://[::1"])
async def test_a_worker_url_that_is_not_one_is_unreachable(client: WorkerClient, url: str) -> None:
    request = chat()
    with pytest.raises(WorkerUnreachable) as caught:
        await client.open_stream(url, request, EngineContext(request.id))
    assert caught.value.message == "The worker's URL is invalid"


async def test_reachability_is_any_answer_after_one_retry_of_a_close_unanswered(
    client: WorkerClient,
) -> None:
    accepted = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.readuntil(b"\r\n\r\n")
        if accepted > 1:  # the first connection closes unanswered
            writer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        writer.close()

    async with asyncio.timeout(SAFETY_NET) as net:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, spawn_bad_worker("refuse") as refusing:
            assert await client.check_reachable(f"http://127.0.0.1:{port}", within=2.0) is None
            assert accepted == 2
            refused = await client.check_reachable(refusing.url, within=2.0)
    assert not net.expired()
    assert isinstance(refused, WorkerUnreachable) and "refused" in refused.message


async def test_zombie_is_a_response_timeout_after_the_first_token_timeout(
    client: WorkerClient,
) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("zombie") as w:
        request = chat()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(WorkerResponseTimeout) as caught:
            await client.open_stream(
                w.url, request, EngineContext(request.id), first_token_timeout=0.2
            )
        waited = loop.time() - started
        seen = await w.request_record(request.id)
    # The zombie never answers, so only the first-token timer can end the wait (were it ignored,
    # the safety net would fire): it fired with its own error, and not before it was due (asyncio
    # may run a timer up to its clock resolution early).
    assert not net.expired()
    assert caught.value.message == "The worker did not answer within the first-token timeout"
    assert waited >= 0.2 - time.get_clock_info("monotonic").resolution
    assert caught.value.quarantines and not caught.value.migratable
    assert seen["disconnected"]  # the abandoned request was closed on the worker too


async def test_zombie_after_headers_times_out_waiting_for_the_first_event(
    client: WorkerClient,
) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("zombie-after-first") as w:
        request = completion()  # completions: no role chunk, so the worker sends nothing
        stream = await client.open_stream(
            w.url, request, EngineContext(request.id), first_token_timeout=0.2
        )
        with pytest.raises(WorkerResponseTimeout):
            await collect(stream)
        seen = await w.request_record(request.id)
    assert not net.expired()
    assert seen["disconnected"]


async def test_zombie_after_first_event_is_left_to_the_callers_inactivity_timer(
    client: WorkerClient,
) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("zombie-after-first") as w:
        request = chat()
        ctx = EngineContext(request.id)
        stream = await client.open_stream(w.url, request, ctx, first_token_timeout=0.2)
        first = await anext(stream)
        assert first.raw is not None and first.num_tokens == 0  # the role chunk
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await anext(stream)
        ctx.kill()  # what the router does when its timer fires
        await stream.aclose()
        seen = await w.request_record(request.id)
    assert not net.expired()
    assert seen["disconnected"]


@pytest.mark.parametrize("behaviour", ["stop-mid-stream", "die-mid-stream"])
@pytest.mark.parametrize("unary", [False, True])
async def test_stream_ending_without_done_is_a_disconnect_after_the_first_outputs(
    client: WorkerClient, behaviour: str, unary: bool
) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker(behaviour, tokens=50) as w:
        request = chat(stream=not unary)
        stream = await client.open_stream(w.url, request, EngineContext(request.id))
        outputs: list[EngineOutput] = []
        with pytest.raises(WorkerDisconnected) as caught:
            async for out in stream:
                outputs.append(out)
    assert not net.expired()
    assert sum(out.num_tokens for out in outputs) == 3
    assert caught.value.quarantines and caught.value.migratable


async def test_error_event_mid_stream_raises_the_workers_error(client: WorkerClient) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("error-mid-stream") as w:
        request = chat()
        stream = await client.open_stream(w.url, request, EngineContext(request.id))
        outputs: list[EngineOutput] = []
        with pytest.raises(UpstreamError) as caught:
            async for out in stream:
                outputs.append(out)
    assert not net.expired()
    assert sum(out.num_tokens for out in outputs) == 3
    assert caught.value.message == "the worker failed mid-stream (bad worker)"


async def test_http_500_is_an_upstream_error_with_the_workers_message(
    client: WorkerClient,
) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("http-500") as w:
        request = chat()
        with pytest.raises(UpstreamError) as caught:
            await client.open_stream(w.url, request, EngineContext(request.id))
    assert not net.expired()
    assert caught.value.status == 502
    assert caught.value.message == "the worker exploded (bad worker http-500)"
    assert not caught.value.quarantines


async def test_busy_worker_is_all_workers_busy(client: WorkerClient) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("busy") as w:
        request = chat()
        with pytest.raises(AllWorkersBusy) as caught:
            await client.open_stream(w.url, request, EngineContext(request.id))
    assert not net.expired()
    assert caught.value.status == 503 and caught.value.code == "all_workers_busy"


async def test_400_from_the_worker_keeps_its_message_and_param(client: WorkerClient) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("ok") as w:
        request = chat(messages=[])
        with pytest.raises(InvalidRequest) as caught:
            await client.open_stream(w.url, request, EngineContext(request.id))
    assert not net.expired()
    assert caught.value.status == 400
    assert caught.value.message == "messages must be a non-empty list"
    assert caught.value.param == "messages"
    assert not caught.value.quarantines and not caught.value.migratable


@pytest.mark.parametrize("unary", [False, True])
async def test_malformed_sse_is_a_clear_upstream_error(client: WorkerClient, unary: bool) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("malformed-sse") as w:
        request = chat(stream=not unary)
        stream = await client.open_stream(w.url, request, EngineContext(request.id))
        with pytest.raises(UpstreamError) as caught:
            await collect(stream)
    assert not net.expired()
    assert "malformed" in caught.value.message


async def test_a_restarted_worker_serves_again_on_the_same_url(client: WorkerClient) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("ok") as w:
        url = w.url
        await w.kill()
        request = chat()
        with pytest.raises(WorkerUnreachable):
            await client.open_stream(url, request, EngineContext(request.id))
        await w.restart()
        assert w.url == url
        request = chat()
        outputs = await collect(await client.open_stream(url, request, EngineContext(request.id)))
    assert not net.expired()
    assert sum(out.num_tokens for out in outputs) == len(TOKENS)


async def test_probe_and_models(client: WorkerClient) -> None:
    async with asyncio.timeout(SAFETY_NET) as net:
        async with spawn_bad_worker("ok", model="org/the-model") as w:
            assert await client.probe(w.url, within=2.0)
            assert await client.fetch_models(w.url, within=2.0) == ["org/the-model"]
        async with spawn_bad_worker("refuse") as w:
            assert not await client.probe(w.url, within=2.0)
            with pytest.raises(WorkerUnreachable):
                await client.fetch_models(w.url, within=2.0)
    assert not net.expired()


# --- our own worker --------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["id/with?url#chars%", "an id our worker replaces"])
async def test_our_own_worker_is_relayed_as_is_and_stops_gracefully(
    client: WorkerClient, request_id: str
) -> None:
    from dynamo_llm.config import Config
    from dynamo_llm.engines.echo import EchoEngine
    from dynamo_llm.http.app import ServedModel, create_app
    from dynamo_llm.http.server import HttpServer
    from dynamo_llm.runtime.clock import SystemClock

    clock = SystemClock()
    engine = EchoEngine(clock, delay_ms=5)
    app = create_app(
        Config.from_env({}), [ServedModel(SERVED, engine)], clock=clock, control_routes=True
    )
    server = HttpServer(app, "127.0.0.1", 0, interface="rsgi")
    await server.start()
    try:
        async with asyncio.timeout(SAFETY_NET) as net:
            words = " ".join(f"w{i}" for i in range(500))
            request = chat(messages=[ChatMessage("user", words)], request_id=request_id)
            ctx = EngineContext(request.id)
            stream = await client.open_stream(server.base_url, request, ctx, is_ours=True)
            await first_token(stream)
            ctx.stop()
            rest = await collect(stream)  # our worker ends the body without [DONE]: no error
        assert not net.expired()
        assert sum(out.num_tokens for out in rest) < 500
        if request_id.startswith("id/"):
            assert stream.rewrites == ()  # same id, same model: nothing to rewrite
        # The worker was told to stop (not hung up on): the connection went back to the pool.
        assert idle_connections(client) >= 1
    finally:
        await app.shutdown(grace=0, kill_wait=5)
        await server.stop()


async def test_a_worker_key_added_after_start_is_sent_on_the_next_stream() -> None:
    """A key the table gets later (a reloaded ``--upstream-file``) is sent from then on."""
    keys = WorkerKeys()
    session = make_session(connect_timeout=2.0, worker_keys=keys)
    client = WorkerClient(session, keys)
    try:
        async with asyncio.timeout(SAFETY_NET) as net, recording_worker(model=SERVED) as worker:
            await collect(await client.open_stream(worker.url, chat(), EngineContext()))
            keys.replace({worker.url: "wk-late"})
            await collect(await client.open_stream(worker.url, chat(), EngineContext()))
            first, second = await worker.until_received(2)
        assert "authorization" not in first.headers
        assert second.headers["authorization"] == "Bearer wk-late"
        assert not net.expired()
    finally:
        await client.aclose()
        await session.close()


# --- a unary answer taken whole ----------------------------------------------------------------


async def test_a_unary_answer_comes_whole_with_our_id_and_model_and_the_workers_usage(
    client: WorkerClient,
) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("ok", foreign_ids=True) as w:
        request = chat(stream=False)
        outs = [out async for out in await client.open_answer(w.url, request, EngineContext("a"))]
        pooled = idle_connections(client)  # before the worker exits and closes it
        [seen] = (await w.record())["requests"]
    assert not net.expired()
    assert pooled == 1  # read to its end: the connection goes back to the pool
    [out] = outs
    assert out.response is not None
    answer = msgspec.json.decode(out.response)
    assert answer["id"] == f"chatcmpl-{request.id}" and answer["model"] == SERVED
    assert answer["choices"][0]["message"]["content"] == "".join(TOKENS)
    assert out.usage == Usage(answer["usage"]["prompt_tokens"], 5)
    assert not seen["body"]["stream"] and "stream_options" not in seen["body"]


async def test_a_request_of_several_choices_is_still_streamed(client: WorkerClient) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("ok") as w:
        request = completion(stream=False, prompt=["one", "two"])
        stream = await client.open_answer(w.url, request, EngineContext("b"))
        outs = [out async for out in stream]
        [seen] = (await w.record())["requests"]
    assert not net.expired()
    assert all(out.response is None for out in outs) and "".join(o.text for o in outs)
    assert seen["body"]["stream"]


async def test_a_worker_that_dies_while_generating_the_answer_dropped_it(
    client: WorkerClient,
) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, spawn_bad_worker("ok", gap=1.0) as w:
        request = chat(stream=False)
        answer = asyncio.create_task(client.open_answer(w.url, request, EngineContext("d")))
        await w.record(arrived=request.id)
        await w.kill()
        with pytest.raises(WorkerDisconnected):
            await answer
    assert not net.expired()


async def test_the_connection_bound_makes_a_request_wait_for_a_free_connection() -> None:
    session = make_session(connect_timeout=2.0)
    client = WorkerClient(session, max_connections=1)
    try:
        async with (
            asyncio.timeout(SAFETY_NET) as net,
            spawn_bad_worker("ok", tokens=1000, gap=0.01) as w,
        ):
            first, second = chat(), chat()
            first_ctx, second_ctx = EngineContext(first.id), EngineContext(second.id)
            stream = await client.open_stream(w.url, first, first_ctx)
            await first_token(stream)
            waiting = asyncio.ensure_future(client.open_stream(w.url, second, second_ctx))
            while not client.pool.waiting:  # it queued behind the one connection
                await asyncio.sleep(0)
            assert not waiting.done() and client.pool.open == 1
            first_ctx.kill()  # the first stream's connection closes: the waiter takes the slot
            assert await collect(stream) == []
            later = await waiting
            assert (await first_token(later)).num_tokens
            assert client.pool.open == 1
            second_ctx.kill()
            await collect(later)
            seen = await w.request_record(second.id)
        assert not net.expired()
        assert seen["disconnected"]
        assert (client.pool.open, client.pool.waiting) == (0, 0)
    finally:
        await client.aclose()
        await session.close()
