"""The aggregator: where a unary answer puts the prompt's token ids (vLLM's places)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from dynamo_llm.engines.base import EngineOutput, Usage
from dynamo_llm.http.aggregate import Aggregator


def fold(kind: str, *outputs: EngineOutput, with_token_ids: bool = True) -> dict[str, Any]:
    aggregator = Aggregator(kind, "x-1", "m", 7, choices=1, with_token_ids=with_token_ids)
    for out in outputs:
        aggregator.add(out)
    answer: dict[str, Any] = msgspec.json.decode(aggregator.render())
    return answer


ENGINE_OUTPUTS = (
    EngineOutput("Hi", 1, token_ids=[5], prompt_token_ids=[1, 2], prompt_tokens=2),
    EngineOutput("!", 1, token_ids=[6], finish_reason="stop", usage=Usage(2, 2)),
)


def test_an_engines_chat_answer_has_the_prompts_ids_at_its_top_level_after_the_usage() -> None:
    answer = fold("chat", *ENGINE_OUTPUTS)
    assert list(answer)[-2:] == ["usage", "prompt_token_ids"]
    assert answer["prompt_token_ids"] == [1, 2]
    assert answer["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi!"},
            "logprobs": None,
            "finish_reason": "stop",
            "token_ids": [5, 6],
        }
    ]


def test_an_engines_completion_answer_has_the_prompts_ids_on_its_choice() -> None:
    answer = fold("completions", *ENGINE_OUTPUTS)
    assert "prompt_token_ids" not in answer
    assert answer["choices"] == [
        {
            "index": 0,
            "text": "Hi!",
            "logprobs": None,
            "finish_reason": "stop",
            "token_ids": [5, 6],
            "prompt_token_ids": [1, 2],
        }
    ]


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_no_token_ids_are_written_unless_asked_for(kind: str) -> None:
    answer = fold(kind, *ENGINE_OUTPUTS, with_token_ids=False)
    assert "token_ids" not in msgspec.json.encode(answer).decode()


def chunk(obj: str, choice: dict[str, Any], **top: Any) -> EngineOutput:
    body = {"id": "w", "object": obj, "created": 1, "model": "w", "choices": [choice], **top}
    return EngineOutput("", 1, chunks=[body])


def test_a_workers_chunks_keep_a_chats_ids_at_the_top_and_a_completions_on_its_choice() -> None:
    chat = fold(
        "chat",
        chunk(
            "chat.completion.chunk",
            {"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "token_ids": [5]},
            prompt_token_ids=[1, 2],
        ),
        chunk("chat.completion.chunk", {"index": 0, "delta": {}, "finish_reason": "stop"}),
    )
    assert chat["prompt_token_ids"] == [1, 2]
    assert "prompt_token_ids" not in chat["choices"][0]
    completion = fold(
        "completions",
        chunk(
            "text_completion",
            {"index": 0, "text": "Hi", "prompt_token_ids": [1, 2], "token_ids": [5]},
        ),
        chunk("text_completion", {"index": 0, "text": "", "finish_reason": "stop"}),
    )
    assert "prompt_token_ids" not in completion
    assert completion["choices"][0]["prompt_token_ids"] == [1, 2]
    hidden = fold(
        "chat",
        chunk(
            "chat.completion.chunk",
            {"index": 0, "delta": {"content": "Hi"}, "token_ids": [5]},
            prompt_token_ids=[1, 2],
        ),
        with_token_ids=False,
    )
    assert "token_ids" not in msgspec.json.encode(hidden).decode()
