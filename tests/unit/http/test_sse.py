"""The SSE renderer: the chunks it writes read back through the shared chunk shape."""

from __future__ import annotations

import msgspec

from dynamo_llm.engines.base import EngineOutput, Usage
from dynamo_llm.http.sse import ChunkRenderer
from dynamo_llm.protocols import (
    ChunkChoice,
    ChunkDelta,
    PromptTokensDetails,
    StreamChunk,
    UsageInfo,
)


def _read_frames(*frames: bytes) -> list[StreamChunk]:
    decode = msgspec.json.Decoder(StreamChunk).decode
    return [decode(frame.removeprefix(b"data: ").removesuffix(b"\n\n")) for frame in frames]


def test_rendered_chat_chunks_read_back_through_the_shared_chunk_shape() -> None:
    renderer = ChunkRenderer("chat", "chatcmpl-1", "m", 7, include_usage=True, with_token_ids=True)
    first = renderer.render(EngineOutput("Hi", 1, token_ids=[5], prompt_token_ids=[1, 2]))
    last = renderer.render(EngineOutput("!", 1, finish_reason="stop", usage=Usage(2, 2, 1)))
    chunks = _read_frames(first, last, renderer.finish())
    envelope = StreamChunk(id="chatcmpl-1", object="chat.completion.chunk", created=7, model="m")
    first_choice = ChunkChoice(delta=ChunkDelta(role="assistant", content="Hi"), token_ids=[5])
    last_choice = ChunkChoice(delta=ChunkDelta(content="!"), finish_reason="stop")
    usage = UsageInfo(2, 2, 4, PromptTokensDetails(cached_tokens=1))
    assert chunks == [
        # The prompt's ids on the chunk itself, as vLLM's chat puts them.
        msgspec.structs.replace(envelope, choices=[first_choice], prompt_token_ids=[1, 2]),
        msgspec.structs.replace(envelope, choices=[last_choice]),
        msgspec.structs.replace(envelope, choices=[], usage=usage),
    ]


def test_rendered_completion_chunks_read_back_through_the_shared_chunk_shape() -> None:
    renderer = ChunkRenderer("completions", "cmpl-1", "m", 7, include_usage=True)
    fast = renderer.render(EngineOutput(" a", 1))
    other = renderer.render(EngineOutput(" b", 1, index=1, finish_reason="length"))
    chunks = _read_frames(fast, other)
    assert [chunk.choices for chunk in chunks] == [
        [ChunkChoice(index=0, text=" a")],
        [ChunkChoice(index=1, text=" b", finish_reason="length")],
    ]
    assert {chunk.object for chunk in chunks} == {"text_completion"}


def test_the_prompts_ids_go_where_vllm_puts_them_only_when_asked_for() -> None:
    out = EngineOutput("Hi", 1, token_ids=[5], prompt_token_ids=[1, 2])
    chat = ChunkRenderer("chat", "chatcmpl-1", "m", 7, with_token_ids=True).render(out)
    assert chat == (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m",'
        b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"token_ids":[5],'
        b'"logprobs":null,"finish_reason":null}],"prompt_token_ids":[1,2]}\n\n'
    )
    completion = ChunkRenderer("completions", "cmpl-1", "m", 7, with_token_ids=True).render(out)
    assert completion == (
        b'data: {"id":"cmpl-1","object":"text_completion","created":7,"model":"m",'
        b'"choices":[{"index":0,"text":"Hi","prompt_token_ids":[1,2],"token_ids":[5],'
        b'"logprobs":null,"finish_reason":null}]}\n\n'
    )
    for kind in ("chat", "completions"):
        plain = ChunkRenderer(kind, "x-1", "m", 7).render(out)
        assert b"token_ids" not in plain


def test_the_usage_chunk_is_the_envelope_with_no_choices_and_every_count() -> None:
    renderer = ChunkRenderer("completions", "cmpl-1", "m", 7, include_usage=True)
    renderer.add_usage(Usage(0, 0, 0))  # counts nobody knows are left out (issue 9)
    assert renderer.finish() == (
        b'data: {"id":"cmpl-1","object":"text_completion","created":7,"model":"m","choices":[],'
        b'"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0,'
        b'"prompt_tokens_details":{"cached_tokens":0}}}\n\n'
    )
