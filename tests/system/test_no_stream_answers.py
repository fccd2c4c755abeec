"""A 200 that carries no event stream is the request's failure, not a dead worker (issue 9, 7).

Against the worker client directly, over loopback: an empty 200 and a JSON body raise
``UpstreamNoStream`` (a 502 naming the worker's status and what its body said; it does not
quarantine, it asks for a probe), while a connection cut before any event stays
``WorkerDisconnected`` (quarantine, migratable), as does a stream that started and ended without
``[DONE]`` (``test_worker_client``).
"""

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest

from dynamo_llm.engines.base import EngineOutput, EngineRequest
from dynamo_llm.engines.endpoints import COMPLETIONS
from dynamo_llm.errors import UpstreamNoStream, WorkerDisconnected
from dynamo_llm.protocols.completions import decode_completion_request
from dynamo_llm.runtime import EngineContext
from dynamo_llm.testing.health_workers import scripted_worker, worker_client
from dynamo_llm.transport import WorkerClient
from dynamo_llm.transport.errors import no_stream_error, summarize_body

SAFETY_NET = 10.0


@pytest.fixture
async def client() -> AsyncIterator[WorkerClient]:
    async with worker_client() as client:
        yield client


def completion(*, stream: bool = True) -> EngineRequest:
    body = {"model": "m", "prompt": "a prompt", "stream": stream}
    params = decode_completion_request(msgspec.json.encode(body))
    return COMPLETIONS.request(params, "a prompt", id="r1", model="m", max_tokens=None)


async def run(client: WorkerClient, url: str, *, stream: bool = True) -> list[EngineOutput]:
    request = completion(stream=stream)
    stream_ = await client.open_stream(url, request, EngineContext(request.id))
    return [out async for out in stream_]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
async def test_an_empty_200_is_a_no_stream_error_that_asks_for_a_probe(
    client: WorkerClient, stream: bool
) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, scripted_worker(model="m", default="empty") as w:
        with pytest.raises(UpstreamNoStream) as caught:
            await run(client, w.url, stream=stream)
    assert not net.expired()
    error = caught.value
    assert (error.status, error.type, error.code) == (502, "upstream_error", "no_event_stream")
    assert error.message == "The worker answered HTTP 200 with an empty body"
    assert not error.quarantines and not error.migratable and error.probes_worker


async def test_a_json_body_is_a_no_stream_error_with_the_workers_message(
    client: WorkerClient,
) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        scripted_worker(model="m", default="json-error") as w,
    ):
        with pytest.raises(UpstreamNoStream) as caught:
            await run(client, w.url)
        seen = await w.wait_for(lambda s: s.ended)
    assert not net.expired()
    assert caught.value.message == (
        "The worker answered HTTP 200 (application/json) with a body that is not an event "
        "stream: the prompt is too long for this engine (scripted)"
    )
    assert not seen.disconnected, "the answer was read to its end"


async def test_a_connection_cut_before_any_event_is_still_a_disconnect(
    client: WorkerClient,
) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, scripted_worker(model="m", default="cut") as w:
        with pytest.raises(WorkerDisconnected) as caught:
            await run(client, w.url)
    assert not net.expired()
    assert caught.value.quarantines and caught.value.migratable


@pytest.mark.parametrize(
    ("body", "summary"),
    [
        (b"", ""),
        (b"  \n", ""),
        (
            b'{"error": {"message": "prompt too long", "type": "invalid_request_error"}}',
            "prompt too long",
        ),
        (b'{"error": "TGI says no", "error_type": "validation"}', "TGI says no"),
        (b'{"detail": "FastAPI says no"}', "FastAPI says no"),
        (b"<html>\n<body>Bad Gateway</body></html>", "<html>"),
        (b'{"id": "cmpl-1", "choices": []}', '{"id": "cmpl-1", "choices": []}'),
        (b"\xff\xfe binary \x00 junk", "\ufffd\ufffd binary  junk"),
    ],
    ids=["empty", "blank", "openai", "tgi", "fastapi", "html", "unary-answer", "binary"],
)
def test_a_body_is_summarised_in_a_few_printable_words(body: bytes, summary: str) -> None:
    assert summarize_body(body) == summary


def test_a_long_body_is_cut_short_in_the_message() -> None:
    error = no_stream_error(200, "text/plain", b"x" * 5000)
    assert error.message.startswith("The worker answered HTTP 200 (text/plain) with a body")
    assert error.message.endswith("x...")
    assert len(error.message) < 300
