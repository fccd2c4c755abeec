"""A migration's replay passes the client's fields on like the request itself."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dynamo_llm.engines.base import EngineOutput, EngineRequest
from dynamo_llm.engines.endpoints import CHAT, COMPLETIONS
from dynamo_llm.router.migration import MigrationState, migration_budget

EXTRAS = {"cache_prompt": True, "repeat_penalty": 1.2, "x_vendor": {"deep": [1]}}


def forwards(model: str) -> bool:
    return True


def chat_request(**fields: Any) -> EngineRequest:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi", "x_msg": 1}],
        "max_tokens": 5,
        **EXTRAS,
        **fields,
    }
    raw = json.dumps(body).encode()
    params = CHAT.decode(raw, forwards)
    return CHAT.request(params, id="r", model="m", max_tokens=5, raw_body=raw)


def completion_request(**fields: Any) -> EngineRequest:
    raw = json.dumps({"model": "m", "prompt": "once", "max_tokens": 5, **EXTRAS, **fields})
    params = COMPLETIONS.decode(raw.encode(), forwards)
    return COMPLETIONS.request(params, id="r", model="m", max_tokens=5, raw_body=raw.encode())


def replay_body(state: MigrationState, *outputs: EngineOutput) -> dict[str, Any]:
    for out in outputs:
        state.observe(out)
    replay = state.next_replay()
    assert replay is not None and replay.raw_body is not None
    body: dict[str, Any] = json.loads(replay.raw_body)
    return body


def test_a_token_exact_chat_replay_keeps_the_unknown_fields_and_leaves_chat_ones_behind() -> None:
    # Chat-only fields that change nothing of the replay (`tools` make it a chat text
    # continuation, `logprobs` become the completions `logprobs`: issue 9).
    request = chat_request(parallel_tool_calls=False, top_logprobs=3, temperature=0.3)
    body = replay_body(
        MigrationState(request, 1),
        EngineOutput("a", 1, token_ids=[11], prompt_token_ids=[1, 2]),
        EngineOutput("b", 1, token_ids=[12]),
    )
    expected = {"model": "m", "prompt": [1, 2, 11, 12], "max_tokens": 3, "temperature": 0.3}
    assert body == expected | EXTRAS


def test_a_text_replay_of_a_completion_appends_the_text_and_keeps_the_rest() -> None:
    body = replay_body(
        MigrationState(completion_request(echo=True, min_tokens=4), 1),
        EngineOutput(" upon", 1),
    )
    assert body == {"model": "m", "prompt": "once upon", "max_tokens": 4, "min_tokens": 3} | EXTRAS


def test_a_text_replay_of_a_chat_keeps_the_messages_as_the_client_wrote_them() -> None:
    body = replay_body(MigrationState(chat_request(), 1), EngineOutput("par", 1))
    assert body["messages"] == [
        {"role": "user", "content": "hi", "x_msg": 1},
        {"role": "assistant", "content": "par"},
    ]
    assert body["cache_prompt"] is True and body["x_vendor"] == {"deep": [1]}


@pytest.mark.parametrize(
    "field",
    ["guided_json", "guided_regex", "structured_outputs", "grammar", "json_schema", "regex"],
)
def test_an_engine_grammar_at_the_top_level_makes_a_request_unmigratable(field: str) -> None:
    assert migration_budget(chat_request(), 2) == 2
    assert migration_budget(chat_request(**{field: {"type": "object"}}), 2) == 0
