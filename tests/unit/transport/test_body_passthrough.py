"""The upstream body: the client's JSON with only what the attempt must change replaced."""

from __future__ import annotations

import json
from typing import Any

from dynamo_llm.engines.base import EngineRequest
from dynamo_llm.engines.endpoints import CHAT, COMPLETIONS
from dynamo_llm.transport import upstream_body

ROUTED = "routed"


def forwards(model: str) -> bool:
    return True


def sent_to_worker(request: EngineRequest, **kwargs: Any) -> Any:
    return json.loads(upstream_body(request, **kwargs))


def chat_requests(body: dict[str, Any]) -> list[EngineRequest]:
    raw = json.dumps(body).encode()
    return CHAT.split(CHAT.decode(raw, forwards), request_id="r", model=ROUTED, raw_body=raw)


def completion_requests(body: dict[str, Any]) -> list[EngineRequest]:
    raw = json.dumps(body).encode()
    params = COMPLETIONS.decode(raw, forwards)
    return COMPLETIONS.split(params, request_id="r", model=ROUTED, raw_body=raw)


CLIENT_CHAT: dict[str, Any] = {
    "model": ROUTED,
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi", "x_part": 1}], "x_msg": 2}
    ],
    "tools": [{"type": "function", "function": {"name": "f"}, "x_tool": 3}],
    "stream": True,
    "stream_options": {"continuous_usage_stats": True, "x_option": 4},
    "max_completion_tokens": 9,
    "cache_prompt": True,
    "repeat_penalty": 1.25,
}


def test_every_key_the_client_sent_goes_upstream_with_only_streaming_forced() -> None:
    [request] = chat_requests(CLIENT_CHAT)
    assert sent_to_worker(request) == {
        **CLIENT_CHAT,
        "stream_options": {"continuous_usage_stats": True, "x_option": 4, "include_usage": True},
    }


def test_the_attempt_changes_model_budget_and_token_ids_and_nothing_else() -> None:
    client = {k: v for k, v in CLIENT_CHAT.items() if k != "stream_options"} | {"stream": False}
    raw = json.dumps(client).encode()
    replay = CHAT.request(
        CHAT.decode(raw, forwards), id="r", model=ROUTED, max_tokens=4, raw_body=raw
    )
    assert sent_to_worker(replay, model="worker-name", return_token_ids=True) == {
        **client,
        "model": "worker-name",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 4,
        "return_token_ids": True,
    }


def test_each_sub_request_of_a_batch_gets_its_prompt_and_no_n() -> None:
    client = {"model": ROUTED, "prompt": ["one", "two"], "n": 2, "x_extra": [1]}
    bodies = [sent_to_worker(r) for r in completion_requests(client)]
    common = {"model": ROUTED, "x_extra": [1], "max_tokens": 16, "stream": True}
    common["stream_options"] = {"include_usage": True}
    prompts = ["one", "one", "two", "two"]
    assert bodies == [{**common, "prompt": prompt} for prompt in prompts]


def test_values_we_leave_alone_go_on_byte_for_byte() -> None:
    # A number no float holds, a float's trailing zero, a message's spacing: all as written.
    message = b'{"role": "user",  "content": "hi", "x": 1e400}'
    raw = b'{"model": "routed", "messages": [' + message + b'], "temperature": 0.50}'
    [request] = CHAT.split(CHAT.decode(raw), request_id="r", model=ROUTED, raw_body=raw)
    assert upstream_body(request) == (
        b'{"model":"routed","messages":[' + message + b'],"temperature":0.50,'
        b'"stream":true,"stream_options":{"include_usage":true}}'
    )


def test_a_request_built_without_a_body_is_encoded_from_its_fields() -> None:
    params = CHAT.decode(b'{"model": "routed", "messages": [{"role": "user", "content": "hi"}]}')
    request = CHAT.request(params, id="r", model=ROUTED, max_tokens=None)
    assert sent_to_worker(request) == {
        "model": ROUTED,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
