"""A unary answer taken whole: read to its end over the request's connection, passed on as the
worker wrote it, our id and model name in it."""

import asyncio
from typing import Any

import msgspec
import pytest

from dynamo_llm.engines.base import Usage
from dynamo_llm.engines.endpoints import CHAT
from dynamo_llm.errors import (
    Cancelled,
    InvalidRequest,
    UpstreamError,
    UpstreamNoStream,
    WorkerDisconnected,
)
from dynamo_llm.protocols.chat import ChatCompletionRequest, ChatMessage
from dynamo_llm.runtime.context import EngineContext
from dynamo_llm.transport import answer as answer_module
from dynamo_llm.transport import upstream_body
from dynamo_llm.transport.answer import read_answer, whole_answer
from dynamo_llm.transport.h1 import Connection

from .test_h1 import FakeTransport

OURS = {"response_id": "chatcmpl-ours", "model": "served"}


def answer(**extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-theirs",
        "object": "chat.completion",
        "created": 7,
        "model": "their-name",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "call_1", "type": "function"}],
                    "reasoning_content": "hmm",
                },
                "logprobs": {"content": [{"token": "a", "logprob": -0.25}]},
                "finish_reason": "tool_calls",
                "stop_reason": 7,
            }
        ],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 3,
            "total_tokens": 8,
            "prompt_tokens_details": {"cached_tokens": 2},
        },
        "x_engine": {"kept": True},
        **extra,
    }


@pytest.mark.parametrize("spaced", [False, True], ids=["compact", "spaced"])
def test_an_answer_is_passed_on_whole_with_only_its_id_and_model_renamed(spaced: bool) -> None:
    sent = answer()
    body = (
        msgspec.json.encode(sent)
        if not spaced
        else msgspec.json.encode(sent).replace(b'":', b'": ').replace(b",", b", ")
    )
    out = whole_answer(200, body, **OURS)
    assert out.response is not None
    assert msgspec.json.decode(out.response) == {**sent, "id": "chatcmpl-ours", "model": "served"}
    if not spaced:
        # Renamed in the bytes: everything else is the worker's own spelling.
        assert out.response == body.replace(b"chatcmpl-theirs", b"chatcmpl-ours").replace(
            b'"their-name"', b'"served"'
        )
    assert out.usage == Usage(5, 3, 2)
    assert (out.num_tokens, out.prompt_tokens, out.finish_reason) == (3, 5, "tool_calls")


def test_an_id_spelt_with_escapes_is_renamed_through_the_decoded_answer() -> None:
    body = msgspec.json.encode(answer()).replace(b'"chatcmpl-theirs"', b'"chatcmpl\\u002dtheirs"')
    out = whole_answer(200, body, **OURS)
    assert out.response is not None
    assert msgspec.json.decode(out.response)["id"] == "chatcmpl-ours"


def test_an_answer_without_usage_has_none_unless_it_carries_every_token_id() -> None:
    bare = answer()
    del bare["usage"]
    out = whole_answer(200, msgspec.json.encode(bare), **OURS)
    assert out.usage is None and out.num_tokens == 1  # unknown: a lower bound, never a zero
    assert out.response is not None and "usage" not in msgspec.json.decode(out.response)

    bare["choices"][0]["token_ids"] = [4, 5, 6]
    bare["prompt_token_ids"] = [1, 2]
    out = whole_answer(200, msgspec.json.encode(bare), **OURS)
    assert out.usage == Usage(2, 3)
    assert out.response is not None
    assert msgspec.json.decode(out.response)["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
    }


def test_an_error_object_is_the_workers_error() -> None:
    body = (
        b'{"error": {"message": "bad temperature", "type": "invalid_request_error", "code": 400}}'
    )
    with pytest.raises(InvalidRequest, match="bad temperature"):
        whole_answer(200, body, **OURS)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", UpstreamNoStream),
        (b"  \n", UpstreamNoStream),
        (b"<html>502 Bad Gateway</html>", UpstreamError),
        (b'{"id": "x", "choices": []}', UpstreamError),
        (b'{"id": "x", "choices": [1]}', UpstreamError),
        (b"[1, 2]", UpstreamError),
    ],
    ids=["empty", "blank", "html", "no-choices", "choice-not-an-object", "not-an-object"],
)
def test_a_body_that_is_not_a_completion_fails_the_request(
    body: bytes, error: type[Exception]
) -> None:
    with pytest.raises(error):
        whole_answer(200, body, **OURS)


def test_the_body_for_a_whole_answer_keeps_streaming_off_and_drops_the_stream_options() -> None:
    raw = (
        b'{"model": "served", "messages": [{"role": "user", "content": "hi"}], "stream": false,'
        b' "stream_options": {"include_usage": true}, "x_extra": [1]}'
    )
    params = ChatCompletionRequest(model="served", messages=[ChatMessage("user", "hi")])
    request = CHAT.request(params, id="r1", model="served", max_tokens=None, raw_body=raw)
    assert msgspec.json.decode(upstream_body(request, stream=False)) == {
        "model": "served",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "x_extra": [1],
    }


# --- the body read over the request's connection -------------------------------------------------

JSON_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
)


class FakePool:
    def __init__(self) -> None:
        self.put_back_conns: list[Connection] = []

    def put_back(self, _key: object, conn: Connection) -> None:
        self.put_back_conns.append(conn)

    def forget(self, _key: object, _conn: Connection) -> None:
        pass


async def answering(pool: FakePool | None = None) -> tuple[Connection, FakeTransport]:
    """A connection whose worker began a chunked JSON answer (its head only, so far)."""
    conn = Connection(pool, "worker")  # type: ignore[arg-type]  # duck-typed pool
    transport = FakeTransport()
    conn.connection_made(transport)
    head = asyncio.ensure_future(conn.request(b"POST / HTTP/1.1\r\n\r\n"))
    await asyncio.sleep(0)
    conn.data_received(JSON_HEAD)
    await head
    return conn, transport


async def test_an_answer_in_many_chunks_is_read_whole_and_its_connection_pooled() -> None:
    pool = FakePool()
    conn, transport = await answering(pool)
    reading = asyncio.ensure_future(read_answer(conn, EngineContext("a")))
    await asyncio.sleep(0)
    for piece in (b'{"id":', b' "x",', b' "choices": []}'):
        conn.data_received(b"%x\r\n%s\r\n" % (len(piece), piece))
        await asyncio.sleep(0)
    assert not reading.done()
    conn.data_received(b"0\r\n\r\n")
    assert await reading == b'{"id": "x", "choices": []}'
    assert pool.put_back_conns == [conn] and not transport.closed


async def test_a_drop_mid_answer_is_a_disconnect_and_closes_the_connection() -> None:
    conn, _transport = await answering()
    reading = asyncio.ensure_future(read_answer(conn, EngineContext("b")))
    conn.data_received(b'5\r\n{"id"\r\n')
    await asyncio.sleep(0)
    conn.connection_lost(ConnectionResetError())
    with pytest.raises(WorkerDisconnected, match="before its answer ended"):
        await reading
    assert conn.closed


@pytest.mark.parametrize("stopped_first", [False, True], ids=["mid-answer", "before-the-read"])
async def test_a_kill_closes_the_connection_at_once_and_cancels(stopped_first: bool) -> None:
    conn, transport = await answering()
    ctx = EngineContext("c")
    if stopped_first:
        ctx.kill()
    reading = asyncio.ensure_future(read_answer(conn, ctx))
    await asyncio.sleep(0)
    if not stopped_first:
        assert not transport.closed
        ctx.kill()
        assert transport.closed  # at once, from the stop callback: the worker sees the close
    with pytest.raises(Cancelled):
        await reading


async def test_an_answer_past_the_bound_fails_and_closes_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(answer_module, "MAX_ANSWER", 16)
    conn, transport = await answering()
    piece = b"x" * 17
    conn.data_received(b"%x\r\n%s\r\n" % (len(piece), piece))
    with pytest.raises(UpstreamError, match="larger than 16 bytes"):
        await read_answer(conn, EngineContext("d"))
    assert transport.closed
