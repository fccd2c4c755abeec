"""The replay (``router/continuation.py``): it passes the client's fields on like the request
itself, keeps what the client asked for (logprobs) and continues a chat with tools as chat."""

from __future__ import annotations

import json
from typing import Any

from dynamo_llm.engines.base import EngineOutput, EngineRequest
from dynamo_llm.engines.endpoints import CHAT, COMPLETIONS
from dynamo_llm.router.migration import MigrationState

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


TOOLS = [{"type": "function", "function": {"name": "f"}}]
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


def test_a_chat_with_tools_continues_as_chat_text_and_not_at_all_inside_a_call() -> None:
    state = MigrationState(chat_request(tools=TOOLS), 1)
    state.observe(FIRST)
    replay = state.next_replay()
    assert replay is not None and replay.endpoint == "chat_completions"
    state = MigrationState(chat_request(tools=TOOLS), 1)
    call = {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c"}]}}]}
    state.observe(EngineOutput("", 1, token_ids=[11], prompt_token_ids=[1, 2], chunks=[call]))
    assert state.next_replay() is None
