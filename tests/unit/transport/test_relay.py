"""The raw relay passes in-progress chunks on as bytes and leaves only decisions to the parser."""

from __future__ import annotations

from typing import Any

from dynamo_llm.transport.events import EventParser
from dynamo_llm.transport.relay import RawRelay
from tests.helpers import chat_chunk_event


def chunk(content: str | None, finish: str | None = None, **extra: Any) -> bytes:
    return chat_chunk_event(content, finish, chunk_id="up-1", model="up", **extra)


FIRST = chunk("")
TOKENS = [chunk(f"tok{i}") for i in range(5)]
FINISH = chunk("", "stop")
USAGE = chunk(None, usage={"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7})
DONE = b"data: [DONE]\n\n"


def relay_after_first() -> tuple[RawRelay, EventParser]:
    relay = RawRelay(response_id="chatcmpl-ours", model="ours", fast=True)
    parser = EventParser(relay, keep_raw=True, sees_all=False)
    assert parser.parse(FIRST) is not None
    return relay, parser


def test_a_buffer_of_in_progress_chunks_is_relayed_whole_and_rewritten() -> None:
    relay, _ = relay_after_first()
    out, rest = relay.pass_on(b"".join(TOKENS))
    assert rest == b""
    assert out is not None and out.num_tokens == 5
    assert out.raw is not None and b'"up-1"' not in out.raw and b'"model":"ours"' in out.raw


def test_the_tokens_before_the_last_events_are_relayed_and_only_the_end_is_parsed() -> None:
    relay, parser = relay_after_first()
    out, rest = relay.pass_on(b"".join(TOKENS) + FINISH + USAGE + DONE)
    assert out is not None and out.num_tokens == 5
    assert rest == FINISH + USAGE + DONE
    last = parser.parse(rest)
    assert parser.done
    assert last is not None and last.finish_reason == "stop"
    assert last.usage is not None and last.usage.completion_tokens == 5


def test_a_buffer_that_starts_with_a_decision_goes_wholly_to_the_parser() -> None:
    relay, _ = relay_after_first()
    assert relay.pass_on(FINISH + DONE) == (None, FINISH + DONE)
    assert relay.pass_on(b": keep-alive\n\n" + TOKENS[0]) == (None, b": keep-alive\n\n" + TOKENS[0])


def test_a_paused_relay_sends_everything_to_the_parser() -> None:
    relay, _ = relay_after_first()
    relay.pause()
    assert relay.pass_on(TOKENS[0]) == (None, TOKENS[0])


def test_a_buffer_of_one_in_progress_chunk_is_relayed_as_one_token() -> None:
    relay, _ = relay_after_first()
    out, rest = relay.pass_on(TOKENS[0])
    assert rest == b""
    assert out is not None and out.num_tokens == 1
    assert out.raw == TOKENS[0].replace(b'"up-1"', b'"chatcmpl-ours"').replace(
        b'"model":"up"', b'"model":"ours"'
    )


def test_one_event_that_is_not_one_object_line_goes_to_the_parser() -> None:
    # Each holds an in-progress chunk's ending, so only the events-are-objects check stops it.
    body = TOKENS[0].removeprefix(b"data: ").removesuffix(b"\n\n")
    for event in (
        b'data: {"a":1}\ndata: ' + body + b"\n\n",  # a second data line
        b"event: x\ndata: " + body + b"\n\n",  # not opened by `data: {`
        b"data: " + body + b" ]\n\n",  # not closed by `}`
        b"data: " + body + b"\n}\n\n",  # a line of its own for the last brace
        b"data: " + body[:20] + b"\n" + body[20:] + b"\n\n",  # a line break inside
    ):
        assert relay_after_first()[0].pass_on(event) == (None, event), event
