"""The JSON Schema of the requests states what the validators enforce, from the same constants
(the schema fuzzer in tests/system/test_schema_fuzz.py checks the whole; these pin the parts that
are easy to get subtly wrong)."""

from __future__ import annotations

import re
import sys

import pytest

from dynamo_llm.errors import InvalidRequest
from dynamo_llm.protocols.chat import decode_chat_request
from dynamo_llm.protocols.common import WHITESPACE
from dynamo_llm.protocols.completions import decode_completion_request
from dynamo_llm.protocols.schema import NON_BLANK, wire_schemas
from tests.unit.protocols.helpers import chat, completion


def test_the_model_pattern_blanks_exactly_what_strip_removes() -> None:
    assert "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace()) == WHITESPACE
    for c in map(chr, range(0x3100)):
        assert (re.search(NON_BLANK, c) is None) == (not c.strip()), hex(ord(c))


@pytest.mark.parametrize("model", [" ", "\u3000\t", "\x1c", "\u00a0"])
def test_a_blank_model_is_refused(model: str) -> None:
    with pytest.raises(InvalidRequest, match="cannot be empty"):
        decode_chat_request(chat(model=model))


def test_an_in_process_engine_forbids_unknown_fields_and_the_router_allows_them() -> None:
    strict, lenient = wire_schemas(False), wire_schemas(True)
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        assert strict[name]["additionalProperties"] is False
        assert "additionalProperties" not in lenient[name]
    # Messages always take keys we do not model.
    assert "additionalProperties" not in strict["ChatMessage"]


def test_wire_schemas_is_a_copy_the_caller_may_change() -> None:
    wire_schemas(False)["CompletionRequest"]["properties"].clear()
    assert wire_schemas(False)["CompletionRequest"]["properties"]


def test_a_number_without_a_fractional_part_is_an_integer_as_the_schema_says() -> None:
    req = decode_completion_request(completion(n=2.0, max_tokens=3.0, prompt=[1.0, 2.0]))
    assert (req.n, req.max_tokens, req.prompt) == (2, 3, [1, 2])
    assert all(type(v) is int for v in (req.n, req.max_tokens, *req.prompt))
    chat_req = decode_chat_request(chat(top_logprobs=2.0, seed=1e3, temperature=1))
    assert (chat_req.top_logprobs, chat_req.seed) == (2, 1000)
    assert type(chat_req.seed) is int


def test_a_fractional_number_is_still_no_integer() -> None:
    with pytest.raises(InvalidRequest, match="expected int, got float"):
        decode_completion_request(completion(n=2.5))
