"""The frontend's tokenization (``--tokenizer MODEL_DIR``) against vLLM's own (issue 13).

vLLM says which ids it computed for a prompt when asked with ``return_token_ids``
(``prompt_token_ids``: top-level in a chat response, on the choice in a completion); the
frontend's :class:`~dynamo_llm.tokenization.ModelTokenizer` over the same model folder must
give exactly those, for chats (system, multi-turn, tools, tool calls, content parts) and
completions. A frontend started with ``--tokenizer`` then records the prompt's length once.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from dynamo_llm.engines.base import EngineRequest
from dynamo_llm.protocols.chat import ChatCompletionRequest, decode_chat_request
from dynamo_llm.protocols.completions import decode_completion_request
from dynamo_llm.tokenization import ModelTokenizer
from tests.engines.clients import WEATHER_TOOL, only
from tests.engines.harness import MODEL, Pair, metric_sum, wait_until
from tests.engines.tiny_model import TinyModel

TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
CHATS: dict[str, dict[str, Any]] = {
    "system-multi-turn": {
        "messages": [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "The weather in Paris?"},
            {"role": "assistant", "content": "Sunny."},
            {"role": "user", "content": "And in Rome, today?"},
        ]
    },
    "tools": {
        "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "20 celsius"},
            {"role": "user", "content": "Thanks, and Tokyo?"},
        ],
        "tools": [WEATHER_TOOL],
    },
    "content-parts": {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "First part."},
                    {"type": "text", "text": "Second part, with 42 numbers."},
                ],
            }
        ]
    },
}
PROMPTS = ["The weather in Paris is", " two  spaces\nand a line", 'é ü 1234 {"name": 1}']


def engine_ids(pair: Pair, path: str, body: dict[str, Any]) -> list[int]:
    body = {"model": MODEL, "max_tokens": 1, "temperature": 0.0, "return_token_ids": True, **body}
    response = pair.engines[0].post(path, body)
    assert response.status_code == 200, response.text
    result = response.json()
    ids = result.get("prompt_token_ids") or result["choices"][0].get("prompt_token_ids")
    assert isinstance(ids, list), result
    return ids


def chat_request(body: dict[str, Any]) -> EngineRequest:
    params = decode_chat_request(json.dumps({"model": MODEL, **body}).encode())
    assert isinstance(params, ChatCompletionRequest)
    return EngineRequest(
        id="t", model=MODEL, endpoint="chat_completions", params=params, messages=params.messages
    )


def completion_request(prompt: str) -> EngineRequest:
    params = decode_completion_request(json.dumps({"model": MODEL, "prompt": prompt}).encode())
    return EngineRequest(id="t", model=MODEL, endpoint="completions", params=params, prompt=prompt)


@only("vllm")
def test_tokenization_of_chats_equals_vllms_prompt_token_ids(
    fleet: Pair, tiny_model: TinyModel
) -> None:
    tokenizer = ModelTokenizer.load(str(tiny_model.path))
    for name, body in CHATS.items():
        ours = asyncio.run(tokenizer.prompt_ids(chat_request(body)))
        assert ours == engine_ids(fleet, "/v1/chat/completions", body), name
    # The same conversation turn by turn: the later turns reuse the cached prefix.
    messages = CHATS["system-multi-turn"]["messages"]
    for turn in range(2, len(messages) + 1, 2):
        body = {"messages": messages[:turn]}
        ours = asyncio.run(tokenizer.prompt_ids(chat_request(body)))
        assert ours == engine_ids(fleet, "/v1/chat/completions", body), turn


@only("vllm")
def test_tokenization_of_completions_equals_vllms_prompt_token_ids(
    fleet: Pair, tiny_model: TinyModel
) -> None:
    tokenizer = ModelTokenizer.load(str(tiny_model.path))
    for prompt in PROMPTS:
        ours = asyncio.run(tokenizer.prompt_ids(completion_request(prompt)))
        assert ours == engine_ids(fleet, "/v1/completions", {"prompt": prompt}), prompt


@only("vllm")
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "streamed"])
def test_a_frontend_with_the_tokenizer_records_the_prompt_length_once(
    fleet: Pair, tiny_model: TinyModel, stream: bool
) -> None:
    fe = fleet.frontend(tokenizer=str(tiny_model.path))
    body = {**CHATS["tools"], "model": MODEL, "max_tokens": 2, "stream": stream}
    want = len(engine_ids(fleet, "/v1/chat/completions", CHATS["tools"]))

    def recorded() -> tuple[float, float]:
        m = fe.metrics()
        return (
            metric_sum(m, "dynamo_frontend_input_sequence_tokens_sum", model=MODEL),
            metric_sum(m, "dynamo_frontend_input_sequence_tokens_count", model=MODEL),
        )

    before = recorded()
    response = httpx.post(fe.base_url + "/chat/completions", json=body, timeout=120.0)
    assert response.status_code == 200, response.text
    wait_until(lambda: recorded()[1] > before[1], 10.0, 0.1, "the request recorded")
    total, count = recorded()
    assert (total - before[0], count - before[1]) == (want, 1)


@only("vllm")
def test_a_prompt_past_the_context_window_is_refused_by_the_frontend(
    fleet: Pair, tiny_model: TinyModel
) -> None:
    fe = fleet.frontend(tokenizer=str(tiny_model.path), context_length=64)
    body = {
        "model": MODEL,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "Paris " * 80}],
    }
    response = httpx.post(fe.base_url + "/chat/completions", json=body, timeout=120.0)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length is 64 tokens" in error["message"]
