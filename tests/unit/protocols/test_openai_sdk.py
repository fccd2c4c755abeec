"""What the official openai SDK sends decodes, and what we answer it reads back."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import msgspec
import openai
import pytest

from dynamo_llm.protocols import (
    StreamOptions,
    decode_chat_request,
    decode_completion_request,
    max_output_tokens,
    prompts,
)
from tests.unit.protocols.helpers import (
    CHAT_RESPONSE,
    COMPLETION_RESPONSE,
)


@pytest.fixture
def sdk() -> Iterator[tuple[openai.OpenAI, list[bytes]]]:
    """An openai client whose transport records request bodies and answers like our frontend."""
    sent: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.content)
        if json.loads(request.content).get("stream"):
            return httpx.Response(
                200, content=b"data: [DONE]\n\n", headers={"content-type": "text/event-stream"}
            )
        if request.url.path.endswith("/chat/completions"):
            return httpx.Response(200, content=msgspec.json.encode(CHAT_RESPONSE))
        return httpx.Response(200, content=msgspec.json.encode(COMPLETION_RESPONSE))

    with (
        httpx.Client(transport=httpx.MockTransport(answer)) as http,
        # The SDK takes a legacy httpx client at run time but annotates only httpx2's.
        openai.OpenAI(
            api_key="k",
            base_url="http://frontend/v1",
            http_client=http,  # type: ignore[arg-type]
        ) as client,
    ):
        yield client, sent


def test_sdk_chat_bodies_decode(sdk: tuple[openai.OpenAI, list[bytes]]) -> None:
    client, sent = sdk
    reply = client.chat.completions.create(
        model="m",
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                ],
            },
        ],
        n=2,
        max_completion_tokens=64,
        stop=["\n"],
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        tool_choice="auto",
        extra_body={"top_k": 20, "chat_template_kwargs": {"enable_thinking": False}},
    )
    req = decode_chat_request(sent[-1])
    assert req.n == 2
    assert max_output_tokens(req) == 64
    assert req.top_k == 20
    assert req.messages[1].text_content() == "What is this?"
    assert msgspec.json.decode(msgspec.json.encode(req)) == json.loads(sent[-1])
    assert reply.choices[0].message.content == "Hi!"
    assert reply.usage is not None
    assert reply.usage.total_tokens == 5


def test_sdk_streaming_chat_body_decodes(sdk: tuple[openai.OpenAI, list[bytes]]) -> None:
    client, sent = sdk
    stream = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    assert list(stream) == []
    req = decode_chat_request(sent[-1])
    assert req.stream is True
    assert req.stream_options == StreamOptions(include_usage=True)


def test_sdk_completion_bodies_decode(sdk: tuple[openai.OpenAI, list[bytes]]) -> None:
    client, sent = sdk
    reply = client.completions.create(model="m", prompt=[[1, 2], [3]], max_tokens=4, n=2)
    req = decode_completion_request(sent[-1])
    assert prompts(req) == [[1, 2], [3]]
    assert (req.max_tokens, req.n) == (4, 2)
    assert reply.choices[0].text == " world"
    assert reply.choices[0].finish_reason == "length"
