"""What a migration's replay gives the client (its chunks in the client's shape, the request's own
usage: issue 9), and the requests that cannot migrate at all."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dynamo_llm.engines.base import EngineOutput, EngineRequest, Usage
from dynamo_llm.engines.endpoints import CHAT
from dynamo_llm.router.migration import MigrationState, migration_budget


def chat_request(**fields: Any) -> EngineRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    raw = json.dumps({**body, **fields}).encode()
    params = CHAT.decode(raw, lambda model: True)
    return CHAT.request(params, id="r", model="m", max_tokens=5, raw_body=raw)


FIRST = EngineOutput("a", 1, token_ids=[11], prompt_token_ids=[1, 2])


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


@pytest.mark.parametrize(
    "field",
    ["guided_json", "guided_regex", "structured_outputs", "grammar", "json_schema", "regex"],
)
def test_an_engine_grammar_at_the_top_level_makes_a_request_unmigratable(field: str) -> None:
    assert migration_budget(chat_request(), 2) == 2
    assert migration_budget(chat_request(**{field: {"type": "object"}}), 2) == 0
