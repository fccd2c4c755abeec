"""With migration on, a worker's bytes are relayed raw and parsed only if a replay needs them
(``router/replay_buffer.py``)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dynamo_llm.engines.base import EngineOutput, EngineRequest
from dynamo_llm.engines.endpoints import CHAT
from dynamo_llm.http.sse import ChunkRenderer
from dynamo_llm.router.migration import MigrationState
from dynamo_llm.router.replay_buffer import ReplayBuffer, strip_token_ids


def chat_request(**fields: Any) -> EngineRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    raw = json.dumps({**body, **fields}).encode()
    params = CHAT.decode(raw, lambda model: True)
    return CHAT.request(params, id="r", model="m", max_tokens=10, raw_body=raw)


def event(choice: dict[str, Any], **top: Any) -> bytes:
    full = {"index": 0, "logprobs": None, "finish_reason": None, **choice}
    obj = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [full], **top}  # fmt: skip
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


FIRST = EngineOutput(
    "",
    0,
    prompt_token_ids=[1, 2, 3],
    prompt_tokens=3,
    raw=event({"delta": {"role": "assistant", "content": ""}}, prompt_token_ids=[1, 2, 3]),
)
TOKENS = event({"delta": {"content": "a"}, "token_ids": [7]}) + event(
    {"delta": {"content": "b"}, "token_ids": [8]}
)


def test_relayed_bytes_reach_the_client_without_the_token_ids_it_did_not_ask_for() -> None:
    state = MigrationState(chat_request(), budget=1)
    first = state.observe(FIRST)
    out = state.observe(EngineOutput(raw=TOKENS, num_tokens=2))
    for raw in (first.raw, out.raw):
        assert raw is not None and b"token_ids" not in raw
        for line in raw.split(b"\n\n"):
            if line:
                json.loads(line.removeprefix(b"data: "))  # still JSON
    assert out.raw is not None and b'"content":"a"' in out.raw


def test_a_client_that_asked_for_token_ids_keeps_them() -> None:
    state = MigrationState(chat_request(return_token_ids=True), budget=1)
    out = state.observe(EngineOutput(raw=TOKENS, num_tokens=2))
    assert out.raw == TOKENS


def test_the_replay_is_token_exact_from_the_kept_bytes() -> None:
    state = MigrationState(chat_request(), budget=1)
    state.observe(FIRST)
    state.observe(EngineOutput(raw=TOKENS, num_tokens=2))
    assert state.generated == 2
    replay = state.next_replay()
    assert replay is not None and replay.raw_body is not None
    body = json.loads(replay.raw_body)
    assert body["prompt"] == [1, 2, 3, 7, 8]
    assert body["max_tokens"] == 8


def test_without_token_ids_the_kept_bytes_give_the_text_to_continue() -> None:
    state = MigrationState(chat_request(), budget=1)
    state.observe(EngineOutput("", 0, raw=event({"delta": {"role": "assistant", "content": ""}})))
    raw = event({"delta": {"content": "Hel"}}) + event({"delta": {"content": "lo"}})
    state.observe(EngineOutput(raw=raw, num_tokens=2))
    replay = state.next_replay()
    assert replay is not None and replay.raw_body is not None
    body = json.loads(replay.raw_body)
    assert body["messages"][-1] == {"role": "assistant", "content": "Hello"}
    assert body["continue_final_message"] is True


def test_a_finished_stream_does_not_migrate_even_from_kept_bytes() -> None:
    state = MigrationState(chat_request(), budget=1)
    state.observe(FIRST)
    state.observe(EngineOutput(raw=TOKENS, num_tokens=2))
    state.observe(EngineOutput("", 0, finish_reason="stop", raw=event({"delta": {}})))
    assert state.next_replay() is None


def test_the_buffer_gives_each_events_text_and_ids_in_order_once() -> None:
    buffer = ReplayBuffer()
    role = event({"delta": {"role": "assistant", "content": ""}})
    buffer.keep(role + TOKENS, 3)
    buffer.keep(b"data: not json\n\n" + event({"delta": {"content": "c"}}), 1)
    assert buffer and buffer.tokens == 4
    assert buffer.drain() == [("a", [7]), ("b", [8]), ("c", None)]
    assert not buffer and buffer.tokens == 0 and buffer.drain() == []


def test_token_ids_go_in_any_spelling_and_the_events_stay_json() -> None:
    spaced = b'data: {"token_ids": [1, 2], "choices": [], "prompt_token_ids" : null}\n\n'
    for raw in (TOKENS, spaced):
        stripped, _ = strip_token_ids(raw)
        assert b"token_ids" not in stripped
        for line in filter(None, stripped.split(b"\n\n")):
            json.loads(line.removeprefix(b"data: "))


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_the_ids_our_workers_write_go_from_the_chunk_and_the_choice_alike(kind: str) -> None:
    # A chat's prompt ids after its choices (the chunk's own), a completion's on its choice, as
    # vLLM puts them: stripped, the events are those of a request that never asked for ids.
    first = EngineOutput("Hi", 1, token_ids=[5], prompt_token_ids=[1, 2])
    then = EngineOutput(" there", 1, token_ids=[6], finish_reason="length")
    asked = ChunkRenderer(kind, "x-1", "m", 7, with_token_ids=True)
    plain = ChunkRenderer(kind, "x-1", "m", 7)
    raw = asked.render(first) + asked.render(then)
    assert raw.count(b'"prompt_token_ids":[1,2]') == 1
    stripped, extra = strip_token_ids(raw)
    assert (stripped, extra) == (plain.render(first) + plain.render(then), 0)


def test_a_packed_event_counts_every_token_its_ids_list() -> None:
    # vLLM packs several tokens into one event on a busy machine; the relay counts events, the
    # ids the frontend asked for say how many tokens there were (issue 9: ITL per token).
    state = MigrationState(chat_request(), budget=1)
    state.observe(FIRST)
    packed = event({"delta": {"content": "abc"}, "token_ids": [7, 8, 9]}) + event(
        {"delta": {"content": "d"}, "token_ids": [10]}
    )
    out = state.observe(EngineOutput(raw=packed, num_tokens=2))
    assert out.num_tokens == 4 and state.generated == 4
    assert out.raw is not None and b"token_ids" not in out.raw
    empty = event({"delta": {"content": ""}, "token_ids": []})
    empty += event({"delta": {}}, token_ids=None)
    assert state.observe(EngineOutput(raw=empty, num_tokens=2)).num_tokens == 2, "as relayed"
    replay = state.next_replay()
    assert replay is not None and replay.raw_body is not None
    assert json.loads(replay.raw_body)["prompt"] == [1, 2, 3, 7, 8, 9, 10]
