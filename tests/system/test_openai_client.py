"""The official ``openai`` client, sync and async, against a real frontend.

What the SDK parses is what users get: exact text, ``finish_reason``, ``usage`` (unary and the
``stream_options.include_usage`` chunk), several choices, batches, and errors — a failure in the
middle of a stream must surface as ``openai.APIError`` with the engine's message after the chunks
already produced, and a unary failure as a 500 with the OpenAI error body.

The sync client runs in a worker thread (``asyncio.to_thread``) so the server, which runs in the
test's event loop, keeps serving while the client blocks.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from dynamo_llm.engines.echo import EchoEngine
from dynamo_llm.errors import EngineError
from dynamo_llm.runtime.clock import SystemClock
from dynamo_llm.testing import FakeEngine, Frontend, running_frontend

MODEL = "test-model"
PROMPT = "The quick brown fox jumps over the lazy dog"
PROMPT_TOKENS = 9  # the echo engine's tokens are whitespace-delimited words

INTERFACES = ["rsgi", "asgi"]


@pytest.fixture(params=INTERFACES)
def interface(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def echo() -> EchoEngine:
    return EchoEngine(SystemClock(), delay_ms=0)


def exploding() -> FakeEngine:
    # Yields "Hello" and ",", then fails.
    return FakeEngine(fail_after=2, error=EngineError("backend exploded"))


async def create(
    fe: Frontend,
    kind: str,
    endpoint: str,
    chunks: list[Any] | None = None,
    model: str = MODEL,
    **params: Any,
) -> Any:
    """``<endpoint>.create(**params)`` through the sync or async client.

    Returns the response, or for a stream the list of its chunks; chunks are also appended to
    ``chunks`` as they arrive, so a test can see what came before an error.
    """
    received: list[Any] = [] if chunks is None else chunks
    base_url = f"{fe.base_url}/v1"
    if kind == "async":
        async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0) as client:
            api: Any = client.chat.completions if endpoint == "chat" else client.completions
            result = await api.create(model=model, **params)
            if not params.get("stream"):
                return result
            async with result:
                async for chunk in result:
                    received.append(chunk)
            return received

    def call() -> Any:
        with openai.OpenAI(base_url=base_url, api_key="x", max_retries=0) as client:
            api: Any = client.chat.completions if endpoint == "chat" else client.completions
            result = api.create(model=model, **params)
            if not params.get("stream"):
                return result
            with result:
                for chunk in result:
                    received.append(chunk)
            return received

    return await asyncio.to_thread(call)


def prompt_params(endpoint: str, prompt: str = PROMPT, **params: Any) -> dict[str, Any]:
    if endpoint == "chat":
        return {"messages": [{"role": "user", "content": prompt}], **params}
    return {"prompt": prompt, **params}


def text_of(choice: Any, endpoint: str) -> str:
    if endpoint == "chat":
        return str(choice.message.content)
    return str(choice.text)


def delta_of(choice: Any, endpoint: str) -> str:
    if endpoint == "chat":
        return choice.delta.content or ""
    return str(choice.text)


def texts_by_index(chunks: list[Any], endpoint: str) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + delta_of(choice, endpoint)
    return texts


def finish_by_index(chunks: list[Any]) -> dict[int, str]:
    return {
        choice.index: choice.finish_reason
        for chunk in chunks
        for choice in chunk.choices
        if choice.finish_reason is not None
    }


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_unary_response_echoes_the_prompt_with_usage(
    interface: str, kind: str, endpoint: str
) -> None:
    async with running_frontend(echo(), interface=interface) as fe:
        response = await create(fe, kind, endpoint, **prompt_params(endpoint, max_tokens=50))
    prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"
    assert response.id.startswith(prefix)
    assert response.object == ("chat.completion" if endpoint == "chat" else "text_completion")
    assert response.model == MODEL
    [choice] = response.choices
    assert choice.index == 0
    assert text_of(choice, endpoint) == PROMPT
    assert choice.finish_reason == "stop"
    if endpoint == "chat":
        assert choice.message.role == "assistant"
    assert response.usage.prompt_tokens == PROMPT_TOKENS
    assert response.usage.completion_tokens == PROMPT_TOKENS
    assert response.usage.total_tokens == 2 * PROMPT_TOKENS


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_stream_echoes_the_prompt_chunk_by_chunk(
    interface: str, kind: str, endpoint: str
) -> None:
    async with running_frontend(echo(), interface=interface) as fe:
        chunks = await create(
            fe, kind, endpoint, **prompt_params(endpoint, stream=True, max_tokens=50)
        )
    assert len(chunks) == PROMPT_TOKENS
    assert texts_by_index(chunks, endpoint) == {0: PROMPT}
    assert finish_by_index(chunks) == {0: "stop"}
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-" if endpoint == "chat" else "cmpl-")
    assert all(chunk.usage is None for chunk in chunks)  # not asked for
    if endpoint == "chat":
        assert chunks[0].choices[0].delta.role == "assistant"


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_include_usage_ends_the_stream_with_a_usage_chunk(
    interface: str, kind: str, endpoint: str
) -> None:
    async with running_frontend(echo(), interface=interface) as fe:
        chunks = await create(
            fe,
            kind,
            endpoint,
            **prompt_params(
                endpoint, stream=True, stream_options={"include_usage": True}, max_tokens=50
            ),
        )
    *content, last = chunks
    assert texts_by_index(content, endpoint) == {0: PROMPT}
    assert last.choices == []
    assert last.usage.prompt_tokens == PROMPT_TOKENS
    assert last.usage.completion_tokens == PROMPT_TOKENS
    assert last.usage.total_tokens == 2 * PROMPT_TOKENS
    assert all(chunk.usage is None for chunk in content)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_n_2_returns_two_choices(interface: str, endpoint: str, stream: bool) -> None:
    params = prompt_params(endpoint, n=2, max_tokens=50)
    if stream:
        params.update(stream=True, stream_options={"include_usage": True})
    async with running_frontend(echo(), interface=interface) as fe:
        result = await create(fe, "async", endpoint, **params)
    if stream:
        *content, last = result
        assert texts_by_index(content, endpoint) == {0: PROMPT, 1: PROMPT}
        assert finish_by_index(content) == {0: "stop", 1: "stop"}
        usage = last.usage
    else:
        assert [choice.index for choice in result.choices] == [0, 1]
        assert [text_of(choice, endpoint) for choice in result.choices] == [PROMPT, PROMPT]
        assert [choice.finish_reason for choice in result.choices] == ["stop", "stop"]
        usage = result.usage
    # The prompt is shared by both choices: counted once, as OpenAI does.
    assert usage.prompt_tokens == PROMPT_TOKENS
    assert usage.completion_tokens == 2 * PROMPT_TOKENS


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_a_prompt_list_gets_one_choice_per_prompt_in_order(
    interface: str, stream: bool
) -> None:
    prompts = ["alpha", "bravo charlie", "delta echo foxtrot"]
    params: dict[str, Any] = {"prompt": prompts, "max_tokens": 50}
    if stream:
        params.update(stream=True, stream_options={"include_usage": True})
    async with running_frontend(echo(), interface=interface) as fe:
        result = await create(fe, "async", "completions", **params)
    if stream:
        *content, last = result
        assert texts_by_index(content, "completions") == dict(enumerate(prompts))
        assert finish_by_index(content) == {0: "stop", 1: "stop", 2: "stop"}
        usage = last.usage
    else:
        assert [(c.index, c.text, c.finish_reason) for c in result.choices] == [
            (0, "alpha", "stop"),
            (1, "bravo charlie", "stop"),
            (2, "delta echo foxtrot", "stop"),
        ]
        usage = result.usage
    assert usage.prompt_tokens == 6
    assert usage.completion_tokens == 6


async def test_a_prompt_list_with_n_2_indexes_choices_prompt_major(interface: str) -> None:
    async with running_frontend(echo(), interface=interface) as fe:
        result = await create(
            fe, "async", "completions", prompt=["one two", "three"], n=2, max_tokens=50
        )
    assert [(c.index, c.text) for c in result.choices] == [
        (0, "one two"),
        (1, "one two"),
        (2, "three"),
        (3, "three"),
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(
    ("endpoint", "limit"),
    [("chat", "max_tokens"), ("chat", "max_completion_tokens"), ("completions", "max_tokens")],
)
async def test_max_tokens_cuts_the_text_with_finish_reason_length(
    interface: str, endpoint: str, limit: str, stream: bool
) -> None:
    params = {**prompt_params(endpoint), limit: 3}
    if stream:
        params.update(stream=True, stream_options={"include_usage": True})
    async with running_frontend(echo(), interface=interface) as fe:
        result = await create(fe, "async", endpoint, **params)
    if stream:
        *content, last = result
        assert texts_by_index(content, endpoint) == {0: "The quick brown"}
        assert finish_by_index(content) == {0: "length"}
        usage = last.usage
    else:
        [choice] = result.choices
        assert text_of(choice, endpoint) == "The quick brown"
        assert choice.finish_reason == "length"
        usage = result.usage
    assert usage.completion_tokens == 3


async def test_concurrent_requests_each_get_their_own_answer(interface: str) -> None:
    prompts = [f"request number {i} says {'hi ' * (i % 4)}".strip() for i in range(16)]
    async with running_frontend(echo(), interface=interface) as fe, asyncio.timeout(10):
        async with openai.AsyncOpenAI(
            base_url=f"{fe.base_url}/v1", api_key="x", max_retries=0
        ) as client:

            async def ask(i: int, prompt: str) -> str:
                messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": prompt}]
                if i % 2:
                    stream = await client.chat.completions.create(
                        model=MODEL, messages=messages, stream=True, max_tokens=50
                    )
                    return "".join([c.choices[0].delta.content or "" async for c in stream])
                response = await client.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=50
                )
                return str(response.choices[0].message.content)

            answers = await asyncio.gather(*(ask(i, p) for i, p in enumerate(prompts)))
        await fe.app.wait_until_idle()
        assert answers == prompts
        assert fe.value("requests_total", status="success") == len(prompts)
        assert fe.value("inflight_requests") == 0


# --- engine failures -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "endpoint"), [("async", "chat"), ("sync", "chat"), ("async", "completions")]
)
async def test_an_engine_error_mid_stream_raises_api_error_after_the_first_chunks(
    interface: str, kind: str, endpoint: str
) -> None:
    engine = exploding()
    chunks: list[Any] = []
    async with running_frontend(engine, interface=interface) as fe:
        with pytest.raises(openai.APIError) as info:
            await create(fe, kind, endpoint, chunks, **prompt_params(endpoint, stream=True))
        async with asyncio.timeout(5):
            await fe.app.wait_until_idle()
        assert fe.value("requests_total", status="error", error_type="internal") == 1
        assert fe.value("disconnected_clients") == 0
    error = info.value
    assert not isinstance(error, openai.APIStatusError)  # the stream itself was a 200
    assert error.message == "backend exploded"
    assert error.body == {
        "message": "backend exploded",
        "type": "internal_error",
        "param": None,
        "code": None,
    }
    assert texts_by_index(chunks, endpoint) == {0: "Hello,"}
    assert finish_by_index(chunks) == {}
    assert engine.last.killed.is_set()


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_failing_unary_request_is_a_500_with_the_openai_body(
    interface: str, kind: str, endpoint: str
) -> None:
    async with running_frontend(exploding(), interface=interface) as fe:
        with pytest.raises(openai.InternalServerError) as info:
            await create(fe, kind, endpoint, **prompt_params(endpoint))
    error = info.value
    assert isinstance(error, openai.APIStatusError)
    assert error.status_code == 500
    assert error.message == "Error code: 500 - backend exploded"
    assert error.body == {
        "message": "backend exploded",
        "type": "internal_error",
        "param": None,
        "code": None,
    }


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_an_engine_error_before_the_first_token_of_a_stream_is_a_500(
    interface: str, kind: str
) -> None:
    engine = FakeEngine(fail_after=0, error=EngineError("backend exploded"))
    async with running_frontend(engine, interface=interface) as fe:
        with pytest.raises(openai.InternalServerError) as info:
            await create(fe, kind, "chat", **prompt_params("chat", stream=True))
        async with asyncio.timeout(5):
            await fe.app.wait_until_idle()
        assert fe.value("requests_total", request_type="stream", error_type="internal") == 1
    assert info.value.status_code == 500
    assert info.value.body == {
        "message": "backend exploded",
        "type": "internal_error",
        "param": None,
        "code": None,
    }


async def test_an_unexpected_engine_exception_is_sanitised(interface: str) -> None:
    engine = FakeEngine(fail_after=1, error=RuntimeError("secret at <object at 0x7f00deadbeef>"))
    async with running_frontend(engine, interface=interface) as fe:
        with pytest.raises(openai.InternalServerError) as info:
            await create(fe, "async", "chat", **prompt_params("chat"))
    assert info.value.body == {
        "message": "Internal server error",
        "type": "internal_error",
        "param": None,
        "code": None,
    }
    assert "0x7f" not in str(info.value)


async def test_client_error_statuses_map_to_the_sdk_exceptions(interface: str) -> None:
    async with running_frontend(echo(), interface=interface) as fe:
        with pytest.raises(openai.NotFoundError) as missing:
            await create(fe, "async", "chat", model="nope", **prompt_params("chat"))
        with pytest.raises(openai.BadRequestError) as bad:
            await create(fe, "async", "chat", **prompt_params("chat", temperature=7))
    assert isinstance(missing.value.body, dict) and isinstance(bad.value.body, dict)
    assert missing.value.body["code"] == "model_not_found"
    assert bad.value.body["param"] == "temperature"
    assert bad.value.message == (
        "Error code: 400 - Validation: temperature must be between 0 and 2, got 7"
    )


# --- the wire format of the error frame -----------------------------------------------------------

_TLS = ssl.create_default_context()

ERROR_FRAME = (
    'event: error\ndata: {"error":{"message":"backend exploded","type":"internal_error",'
    '"param":null,"code":null}}'
)


@pytest.mark.parametrize(
    "server",
    [
        "rsgi",
        "asgi",
    ],
)
async def test_the_error_frame_is_an_sse_error_event_with_no_done_after_it(server: str) -> None:
    async with (
        running_frontend(exploding(), interface=server) as fe,
        httpx.AsyncClient(base_url=fe.base_url, timeout=5, verify=_TLS) as client,
    ):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            # The body must end on its own once the error frame is out.
            async with asyncio.timeout(1):
                text = (await response.aread()).decode()
    frames = text.split("\n\n")
    assert frames[-1] == ""  # every frame is terminated by a blank line
    *chunks, error, _ = frames
    assert error == ERROR_FRAME
    assert json.loads(error.split("data: ", 1)[1]) == {
        "error": {
            "message": "backend exploded",
            "type": "internal_error",
            "param": None,
            "code": None,
        }
    }
    assert [
        json.loads(c.removeprefix("data: "))["choices"][0]["delta"]["content"] for c in chunks
    ] == [
        "Hello",
        ",",
    ]
    assert "[DONE]" not in text
