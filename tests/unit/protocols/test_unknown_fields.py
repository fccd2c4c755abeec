"""Unknown request fields: refused for an engine that serves the request, accepted (the known
fields still validated strictly) for one that forwards it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dynamo_llm.errors import DynamoError, InvalidRequest
from dynamo_llm.protocols.chat import ChatCompletionRequest, decode_chat_request
from dynamo_llm.protocols.common import decode_object
from dynamo_llm.protocols.completions import CompletionRequest, decode_completion_request

MESSAGES = [{"role": "user", "content": "hi", "x_nested": 1}]


def forwards(model: str) -> bool:
    return model == "routed"


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "routed", "messages": MESSAGES, **fields}).encode()


def refusal(body: bytes, accepts: Any = forwards) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        decode_chat_request(body, accepts)
    return caught.value


def test_a_forwarding_model_takes_unknown_fields_and_validates_the_known_ones() -> None:
    req = decode_chat_request(chat(cache_prompt=True, temperature=0.5, max_tokens=7), forwards)
    assert isinstance(req, ChatCompletionRequest)
    assert (req.temperature, req.max_tokens, req.messages[0].content) == (0.5, 7, "hi")


def test_a_completions_request_for_a_forwarding_model_takes_them_too() -> None:
    body = b'{"model": "routed", "prompt": "p", "guided_json": {"type": "object"}}'
    req = decode_completion_request(body, forwards)
    assert isinstance(req, CompletionRequest) and req.prompt == "p"


@pytest.mark.parametrize(
    ("body", "message", "code"),
    [
        (chat(cache_prompt=1, temperature="hot"), "Invalid type for `temperature`", "invalid_type"),
        (chat(cache_prompt=1, temperature=3), "temperature must be between", "invalid_value"),
        (chat(cache_prompt=1, n=0), "n must be between", "invalid_value"),
        (chat(cache_prompt=1, functions=[]), "`functions` is deprecated", None),
    ],
    ids=["type", "range", "n", "deprecated"],
)
def test_known_fields_beside_unknown_ones_are_as_strict_as_ever(
    body: bytes, message: str, code: str | None
) -> None:
    with pytest.raises(DynamoError) as caught:
        decode_chat_request(body, forwards)
    assert message in caught.value.message
    if code is not None:
        assert caught.value.code == code


def test_a_model_that_does_not_forward_still_refuses_them_all() -> None:
    body = json.dumps({"model": "local", "messages": MESSAGES, "zeta": 1, "alpha": 2}).encode()
    error = refusal(body)
    assert error.message == "Validation: Unsupported parameter(s): `alpha`, `zeta`"
    assert (error.param, error.code) == ("alpha", "unsupported_parameter")


def test_without_a_predicate_or_a_string_model_unknown_fields_are_refused() -> None:
    assert refusal(chat(foo=1), None).code == "unsupported_parameter"
    body = json.dumps({"model": 7, "messages": MESSAGES, "foo": 1}).encode()
    assert refusal(body).code == "unsupported_parameter"


def test_the_refusal_lists_a_bounded_number_of_cut_names() -> None:
    fields: dict[str, Any] = {f"k{i:05d}": i for i in range(20_000)}
    fields["b" * 300] = 1
    error = refusal(json.dumps({"model": "local", "messages": MESSAGES, **fields}).encode())
    assert error.message == (
        "Validation: Unsupported parameter(s): "
        f"`{'b' * 61}...`, `k00000`, `k00001`, `k00002`, `k00003`, `k00004`, `k00005`, `k00006`"
        " and 19993 more"
    )
    assert error.param == "b" * 61 + "..."


def test_decode_object_keeps_every_value_as_written_or_says_it_cannot() -> None:
    members = decode_object(b'{"model": "m", "x": [1.0, {"y": 1e400}]}')
    assert members is not None
    assert {key: bytes(value) for key, value in members.items()} == {
        "model": b'"m"',
        "x": b'[1.0, {"y": 1e400}]',
    }
    assert decode_object(None) is None
    assert decode_object(b"[1]") is None
