"""The streamed chunk's shape as the transport reads it from a worker."""

from __future__ import annotations

import msgspec

from dynamo_llm.protocols import (
    StreamChunk,
    UsageInfo,
)


def test_a_workers_chunk_is_read_as_it_comes_with_fields_left_out_or_null() -> None:
    chunk = msgspec.json.decode(
        b'{"id":"x","choices":[],"system_fingerprint":"fp","usage":'
        b'{"prompt_tokens":3,"completion_tokens":null,"prompt_tokens_details":null}}',
        type=StreamChunk,
    )
    assert chunk == StreamChunk(id="x", choices=[], usage=UsageInfo(prompt_tokens=3))
