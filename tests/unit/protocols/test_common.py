"""What both endpoints share: a malformed body's exact error, the sampling range checks, the stop
list, and the best-effort model peek."""

from __future__ import annotations

import random
from typing import Any

import pytest

from dynamo_llm.errors import InvalidRequest
from dynamo_llm.protocols import (
    ChatCompletionRequest,
    ChatMessage,
    decode_chat_request,
    decode_completion_request,
    peek_model,
    stop_list,
)
from dynamo_llm.protocols.common import check_sampling
from tests.unit.protocols.helpers import (
    assert_rejects,
    chat,
    completion,
    invalid,
)

# --- errors common to both endpoints, in check order --------------------------------------------

BODY_ERRORS = [
    pytest.param(
        b'{"model": ',
        invalid("Invalid JSON body: Input data was truncated", code="invalid_json"),
        id="truncated",
    ),
    pytest.param(
        b'{"model": "m",}',
        invalid(
            "Invalid JSON body: JSON is malformed: trailing comma in object (byte 14)",
            code="invalid_json",
        ),
        id="trailing-comma",
    ),
    pytest.param(
        b"",
        invalid("Invalid JSON body: Input data was truncated", code="invalid_json"),
        id="empty-body",
    ),
    pytest.param(
        b'{"model": "\xff"}',
        invalid(
            "Invalid JSON body: 'utf-8' codec can't decode byte 0xff in position 0: "
            "invalid start byte",
            code="invalid_json",
        ),
        id="invalid-utf8",
    ),
    pytest.param(
        b'{"model": "m", "x": ' + b"[" * 100_000,
        invalid("Invalid JSON body: JSON nesting is too deep", code="invalid_json"),
        id="deep-nesting",
    ),
    pytest.param(
        b"[]",
        invalid("The request body must be a JSON object", code="invalid_json"),
        id="array",
    ),
    pytest.param(
        b'"hello"',
        invalid("The request body must be a JSON object", code="invalid_json"),
        id="string",
    ),
    pytest.param(
        b"null",
        invalid("The request body must be a JSON object", code="invalid_json"),
        id="null",
    ),
    pytest.param(
        b"[1e400]",
        invalid("The request body must be a JSON object", code="invalid_json"),
        id="array-of-huge-number",
    ),
    pytest.param(
        b'{"model": "m", "zeta": 1, "alpha": {"x": 1}, "temperature": 1}',
        invalid("Unsupported parameter(s): `alpha`, `zeta`", "alpha", "unsupported_parameter"),
        id="unknown-fields-all-listed-sorted",
    ),
    pytest.param(
        b'{"temperature": "hot", "model": "m", "foo": 1}',
        invalid("Unsupported parameter(s): `foo`", "foo", "unsupported_parameter"),
        id="unknown-field-beats-earlier-type-error",
    ),
    pytest.param(
        b'{"foo": 1, "model": "m"',
        invalid("Invalid JSON body: Input data was truncated", code="invalid_json"),
        id="syntax-beats-unknown-field",
    ),
    pytest.param(
        b'{"foo": 1e400, "model": "m"}',
        invalid("Unsupported parameter(s): `foo`", "foo", "unsupported_parameter"),
        id="unknown-field-holding-huge-number",
    ),
    pytest.param(
        b'{"model": 7}',
        invalid("Invalid type for `model`: expected str, got int", "model", "invalid_type"),
        id="model-not-a-string",
    ),
]


@pytest.mark.parametrize("body, expected", BODY_ERRORS)
def test_chat_rejects_malformed_bodies(body: bytes, expected: dict[str, Any]) -> None:
    assert_rejects(decode_chat_request, body, expected)


@pytest.mark.parametrize("body, expected", BODY_ERRORS)
def test_completions_rejects_malformed_bodies(body: bytes, expected: dict[str, Any]) -> None:
    assert_rejects(decode_completion_request, body, expected)


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_p": float("nan")},
        {"presence_penalty": float("-inf")},
        {"logit_bias": {"1": float("nan")}},
        {"min_p": float("nan")},
        {"repetition_penalty": float("nan")},
    ],
)
def test_range_checks_reject_nan_and_infinity(fields: dict[str, Any]) -> None:
    # JSON cannot spell NaN and msgspec rejects overflowing numbers, so build the request directly.
    req = ChatCompletionRequest(model="m", messages=[ChatMessage("user", "x")], **fields)
    with pytest.raises(InvalidRequest) as info:
        check_sampling(req)
    assert info.value.param == next(iter(fields))
    assert info.value.code == "invalid_value"


@pytest.mark.parametrize(
    "stop, expected", [(None, ()), ("\n", ("\n",)), (["a", "b"], ("a", "b")), ([], ())]
)
def test_stop_list_normalises_stop(stop: Any, expected: tuple[str, ...]) -> None:
    assert stop_list(decode_chat_request(chat(stop=stop))) == expected
    assert stop_list(decode_completion_request(completion(stop=stop))) == expected


# --- peek_model ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, model",
    [
        (b'{"model": "llama", "messages": "not a list", "bogus": 1}', "llama"),
        (b'{"temperature": 9, "model": "a/b"}', "a/b"),
        (b'{"model": ""}', ""),
        (b'{"model": 5}', None),
        (b'{"model": null}', None),
        (b'{"messages": []}', None),
        (b'["model"]', None),
        (b'"model"', None),
        (b"", None),
        (b"{", None),
        (b'{"model": "m"', None),
        (b'{"model": "\xff"}', None),
        (b"\x00\xff\xfe", None),
        (b'{"model": "m", "x": ' + b"[" * 100_000, None),
        (b'{"model": "m", "x": 1e400}', "m"),
    ],
)
def test_peek_model_is_best_effort(body: bytes, model: str | None) -> None:
    assert peek_model(body) == model


def test_peek_model_never_raises_on_garbage() -> None:
    rng = random.Random(0)
    valid = chat(temperature=0.5, stop=["\n"])
    bodies = [valid[:i] for i in range(len(valid))]
    for _ in range(2000):
        mutated = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        bodies.append(bytes(mutated))
        bodies.append(rng.randbytes(rng.randint(0, 64)))
    for body in bodies:
        model = peek_model(body)
        assert model is None or isinstance(model, str)
