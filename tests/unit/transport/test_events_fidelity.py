"""The slow path keeps what a worker sends, and says what it does not know (issue 9)."""

from __future__ import annotations

import json
from typing import Any

from dynamo_llm.engines.base import EngineOutput, Usage
from dynamo_llm.transport.events import EventParser
from dynamo_llm.transport.relay import RawRelay


def event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
    return event({"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "up",
                  "choices": choices, **extra})  # fmt: skip


ROLE = chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
CALL = chunk(
    [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f"}}]},
      "finish_reason": None}],
    x_engine=1,
)  # fmt: skip
FINISH = chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls", "stop_reason": 7}])
USAGE = chunk(
    [],
    usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4,
           "prompt_tokens_details": {"cached_tokens": 2, "audio_tokens": 0},
           "completion_tokens_details": {"reasoning_tokens": 0}},
    timings={"predicted_n": 1},
)  # fmt: skip
DONE = b"data: [DONE]\n\n"


def parser(*, keep_raw: bool, usage_chunk: bool = True) -> EventParser:
    relay = RawRelay(response_id="chatcmpl-ours", model="ours", fast=False)
    return EventParser(relay, keep_raw=keep_raw, usage_chunk=usage_chunk)


def run(p: EventParser, *parts: bytes) -> list[EngineOutput]:
    outs = [p.parse(part) for part in parts]
    return [out for out in outs if out is not None]


def test_the_parsed_mode_keeps_every_chunk_as_the_worker_sent_it() -> None:
    p = parser(keep_raw=False)
    outs = run(p, ROLE + CALL, FINISH + USAGE + DONE)
    assert [c["choices"][0]["delta"] for c in outs[0].chunks or ()] == [
        {"role": "assistant", "content": ""},
        {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f"}}]},
    ]
    assert outs[0].num_tokens == 1, "a tool-call delta is output"
    last = outs[-1]
    assert last.finish_reason == "tool_calls"
    assert last.usage == Usage(
        3,
        1,
        2,
        {"prompt_tokens_details": {"audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 0}},
    )  # fmt: skip
    # The finishing chunk, then the usage chunk (for its other keys).
    assert [c["choices"] for c in last.chunks or ()][1] == []
    assert (last.chunks or [])[1]["timings"] == {"predicted_n": 1}


def test_the_usage_chunks_keys_go_on_the_relayed_finishing_chunk_when_no_usage_is_asked() -> None:
    p = parser(keep_raw=True, usage_chunk=False)
    outs = run(p, ROLE + CALL, FINISH, USAGE, DONE)
    assert len(outs) == 2, "the finishing chunk waits for the usage chunk"
    raw = outs[-1].raw or b""
    finishing = json.loads(raw.removeprefix(b"data: "))
    assert finishing["choices"][0]["finish_reason"] == "tool_calls"
    assert finishing["timings"] == {"predicted_n": 1}
    assert finishing["id"] == "chatcmpl-ours" and finishing["model"] == "ours"
    assert outs[-1].usage is not None and outs[-1].usage.completion_tokens == 1


def test_a_stream_cut_after_its_finishing_chunk_still_delivers_it() -> None:
    p = parser(keep_raw=True, usage_chunk=False)
    assert run(p, ROLE, FINISH)[-1].finish_reason is None
    held = p.take_held()
    assert held is not None and held.finish_reason == "tool_calls"
    assert p.take_held() is None


def test_without_usage_the_counts_are_the_reported_token_ids_or_unknown() -> None:
    with_ids = chunk(
        [{"index": 0, "text": "ab", "token_ids": [5, 6], "prompt_token_ids": [1, 2, 3],
          "finish_reason": "length"}]
    )  # fmt: skip
    outs = run(parser(keep_raw=False), with_ids + DONE)
    assert outs[-1].usage == Usage(3, 2)
    assert outs[0].prompt_tokens == 3
    without = chunk([{"index": 0, "text": "ab", "finish_reason": "length"}])
    assert run(parser(keep_raw=False), without + DONE)[-1].usage == Usage(None, None)
    assert run(parser(keep_raw=True), with_ids + DONE)[-1].usage == Usage(3, 2)
