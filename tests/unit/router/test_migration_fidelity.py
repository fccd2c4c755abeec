"""A migration's replay keeps what the client will see: logprobs, tool calls (issue 9)."""

from __future__ import annotations

import json
from typing import Any

from dynamo_llm.engines.base import EngineOutput, EngineRequest, Usage
from dynamo_llm.engines.endpoints import CHAT
from dynamo_llm.router.migration import MigrationState

TOOLS = [{"type": "function", "function": {"name": "f"}}]


def chat_request(**fields: Any) -> EngineRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    raw = json.dumps({**body, **fields}).encode()
    params = CHAT.decode(raw, lambda model: True)
    return CHAT.request(params, id="r", model="m", max_tokens=5, raw_body=raw)


FIRST = EngineOutput("a", 1, token_ids=[11], prompt_token_ids=[1, 2])


def test_a_chat_asking_for_logprobs_asks_for_them_on_the_completions_replay() -> None:
    state = MigrationState(chat_request(logprobs=True, top_logprobs=2), 1)
    state.observe(FIRST)
    replay = state.next_replay()
    assert replay is not None and replay.endpoint == "completions"
    assert replay.raw_body is not None
    assert json.loads(replay.raw_body)["logprobs"] == 2
    state = MigrationState(chat_request(logprobs=True, top_logprobs=1), 1)
    state.observe(FIRST)
    replay = state.next_replay()
    assert replay is not None and replay.raw_body is not None
    assert json.loads(replay.raw_body)["logprobs"] == 1, "not the chat's `true`"


def test_the_replays_chunks_come_back_in_the_chat_shape_without_a_second_role() -> None:
    state = MigrationState(chat_request(logprobs=True), 1)
    state.observe(FIRST)
    assert state.next_replay() is not None
    chunk = {
        "object": "text_completion",
        "choices": [{"index": 0, "text": "b", "prompt_token_ids": [1, 2, 11],
                     "logprobs": {"tokens": ["b"], "token_logprobs": [-1.0],
                                  "top_logprobs": [{}], "text_offset": [0]}}],
    }  # fmt: skip
    out = state.observe(EngineOutput("b", 1, token_ids=[12], chunks=[chunk], usage=Usage(3, 1, 3)))
    (choice,) = (out.chunks or [{}])[0]["choices"]
    assert choice["delta"] == {"content": "b"}
    assert "prompt_token_ids" not in choice
    assert choice["logprobs"]["content"][0]["token"] == "b"
    # The request's own usage: the original prompt, both tokens, no cached count from the replay.
    assert out.usage == Usage(2, 2, None)


def test_a_chat_with_tools_continues_as_chat_text_and_not_at_all_inside_a_call() -> None:
    state = MigrationState(chat_request(tools=TOOLS), 1)
    state.observe(FIRST)
    replay = state.next_replay()
    assert replay is not None and replay.endpoint == "chat_completions"
    state = MigrationState(chat_request(tools=TOOLS), 1)
    call = {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c"}]}}]}
    state.observe(EngineOutput("", 1, token_ids=[11], prompt_token_ids=[1, 2], chunks=[call]))
    assert state.next_replay() is None
