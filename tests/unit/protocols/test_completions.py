"""The completions wire model: decoding, every validation error's exact body, the response shape."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from dynamo_llm.protocols import (
    CompletionChoice,
    CompletionResponse,
    UsageInfo,
    decode_completion_request,
    prompts,
)
from tests.unit.protocols.helpers import (
    USER,
    assert_rejects,
    completion,
    invalid,
)

COMPLETION_ERRORS = [
    pytest.param(
        b'{"model": "m"}',
        invalid("Missing required parameter: `prompt`", "prompt", "missing_required_parameter"),
        id="missing-prompt",
    ),
    pytest.param(
        completion(prompt=5),
        invalid(
            "Invalid type for `prompt`: expected str or array, got int", "prompt", "invalid_type"
        ),
        id="prompt-int",
    ),
    pytest.param(
        completion(prompt=[[1, 2.5]]),
        invalid(
            "Invalid type for `prompt[0][1]`: expected int, got float", "prompt", "invalid_type"
        ),
        id="prompt-token-float",
    ),
    pytest.param(
        completion(prompt=[1, "a"]),
        invalid(
            "Invalid type for `prompt`: expected a string, an array of strings, an array of "
            "token ids or an array of token id arrays, got a mixed array",
            "prompt",
            "invalid_type",
        ),
        id="prompt-mixed",
    ),
    pytest.param(
        completion(logprobs=True),
        invalid("Invalid type for `logprobs`: expected int, got bool", "logprobs", "invalid_type"),
        id="logprobs-bool",
    ),
    pytest.param(
        completion(messages=[USER]),
        invalid("Unsupported parameter(s): `messages`", "messages", "unsupported_parameter"),
        id="chat-field-on-completions",
    ),
    pytest.param(
        completion(model=""),
        invalid("The 'model' field cannot be empty.", "model"),
        id="model-empty",
    ),
    *(
        pytest.param(
            completion(prompt=prompt),
            invalid("The 'prompt' field cannot be empty.", "prompt"),
            id=f"prompt-empty-{i}",
        )
        for i, prompt in enumerate(["", [], [""], [[]], ["a", ""], [[1], []]])
    ),
    *(
        pytest.param(
            completion(prompt=prompt),
            invalid("token ids must not be negative, got -3", "prompt"),
            id=f"prompt-negative-token-{i}",
        )
        for i, prompt in enumerate([[1, -3], [[1], [2, -3]]])
    ),
    pytest.param(
        completion(temperature=2.5),
        invalid("temperature must be between 0 and 2, got 2.5", "temperature"),
        id="temperature",
    ),
    pytest.param(
        completion(logprobs=6),
        invalid("logprobs must be between 0 and 5, got 6", "logprobs"),
        id="logprobs",
    ),
    pytest.param(
        completion(logprobs=-1),
        invalid("logprobs must be between 0 and 5, got -1", "logprobs"),
        id="logprobs-negative",
    ),
    pytest.param(
        completion(max_tokens=0),
        invalid("max_tokens must be greater than 0, got 0", "max_tokens"),
        id="max-tokens",
    ),
    pytest.param(completion(n=200), invalid("n must be between 1 and 128, got 200", "n"), id="n"),
    pytest.param(
        completion(best_of=21),
        invalid("best_of must be between 0 and 20, got 21", "best_of"),
        id="best-of-high",
    ),
    pytest.param(
        completion(best_of=2, n=3),
        invalid("best_of must be greater than or equal to n (3), got 2", "best_of"),
        id="best-of-below-n",
    ),
    pytest.param(
        completion(prompt=["p"] * 43, n=3),
        invalid(
            "the number of prompts times n must be at most 128, got 129 (43 prompts, n=3)", "prompt"
        ),
        id="batch-times-n",
    ),
    pytest.param(
        completion(stop=["x"] * 33), invalid("stop must have at most 32 entries", "stop"), id="stop"
    ),
    pytest.param(
        completion(stream_options={"include_usage": True}),
        invalid(
            "The 'stream_options' field is only allowed when 'stream' is set to true.",
            "stream_options",
        ),
        id="stream-options-without-stream",
    ),
]


@pytest.mark.parametrize("body, expected", COMPLETION_ERRORS)
def test_completions_validation_error_has_exact_body(body: bytes, expected: dict[str, Any]) -> None:
    assert_rejects(decode_completion_request, body, expected)


@pytest.mark.parametrize(
    "prompt, batch",
    [
        ("Hello", ["Hello"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_prompts_gives_the_batch_as_a_list(prompt: Any, batch: list[Any]) -> None:
    assert prompts(decode_completion_request(completion(prompt=prompt))) == batch


def test_completion_request_decodes_every_field_and_reencodes_as_sent() -> None:
    body = completion(
        prompt=["a", "b"],
        best_of=2,
        echo=True,
        frequency_penalty=0.1,
        logit_bias={"1": 1},
        logprobs=5,
        max_tokens=8,
        n=2,
        presence_penalty=0.2,
        seed=1,
        stop="\n",
        stream=True,
        stream_options={"include_usage": True},
        suffix="end",
        temperature=1,
        top_p=0.5,
        user="u",
        top_k=5,
        min_p=0.1,
        repetition_penalty=1.2,
        min_tokens=2,
        ignore_eos=False,
        return_token_ids=True,
        nvext={"ignore_eos": True},
    )
    req = decode_completion_request(body)
    assert req.max_tokens == 8
    assert msgspec.json.decode(msgspec.json.encode(req)) == json.loads(body)


def test_completions_max_tokens_is_left_unset_for_the_frontend() -> None:
    req = decode_completion_request(completion())
    assert req.max_tokens is None
    assert msgspec.json.encode(req) == b'{"model":"m","prompt":"Hello"}'


def test_completions_batch_of_128_is_accepted() -> None:
    assert len(prompts(decode_completion_request(completion(prompt=["p"] * 64, n=2)))) == 64


def test_completion_response_encodes_to_the_openai_shape() -> None:
    response = CompletionResponse(
        id="cmpl-1",
        created=2,
        model="m",
        choices=[
            CompletionChoice(index=0, text="a", finish_reason="stop"),
            CompletionChoice(index=1, text="b", finish_reason="length", token_ids=[9]),
        ],
        usage=UsageInfo(prompt_tokens=1, completion_tokens=2, total_tokens=3),
    )
    assert json.loads(msgspec.json.encode(response)) == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 2,
        "model": "m",
        "choices": [
            {"index": 0, "text": "a", "logprobs": None, "finish_reason": "stop"},
            {
                "index": 1,
                "text": "b",
                "logprobs": None,
                "finish_reason": "length",
                "token_ids": [9],
            },
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
