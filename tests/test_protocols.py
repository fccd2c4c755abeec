"""The OpenAI wire models: decoding, every validation error's exact body, and response shapes."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import msgspec
import openai
import pytest

from dynamo_llm.engines.base import EngineOutput, Usage
from dynamo_llm.errors import DynamoError, InvalidRequest, NotImplementedParameter, render_error
from dynamo_llm.http.sse import ChunkRenderer
from dynamo_llm.protocols import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChunkChoice,
    ChunkDelta,
    CompletionChoice,
    CompletionResponse,
    PromptTokensDetails,
    ResponseMessage,
    StreamChunk,
    StreamOptions,
    UsageInfo,
    decode_chat_request,
    decode_completion_request,
    max_output_tokens,
    peek_model,
    prompts,
    stop_list,
)
from dynamo_llm.protocols.common import check_sampling

USER = {"role": "user", "content": "Hello"}


def chat(**fields: Any) -> bytes:
    body: dict[str, Any] = {"model": "m", "messages": [USER]}
    body.update(fields)
    return json.dumps(body).encode()


def completion(**fields: Any) -> bytes:
    body: dict[str, Any] = {"model": "m", "prompt": "Hello"}
    body.update(fields)
    return json.dumps(body).encode()


def error(
    message: str, param: str | None, code: str, type: str = "invalid_request_error"
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> dict[str, Any]:
    return error(f"Validation: {message}", param, code)


def assert_rejects(
    decode: Callable[[bytes], object],
    body: bytes,
    expected: dict[str, Any],
    cls: type[DynamoError] = InvalidRequest,
    status: int = 400,
) -> None:
    with pytest.raises(DynamoError) as info:
        decode(body)
    exc = info.value
    assert type(exc) is cls
    assert exc.status == status
    assert json.loads(render_error(exc)) == expected


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


# --- chat ---------------------------------------------------------------------------------------

CHAT_ERRORS = [
    # Missing fields.
    pytest.param(
        b'{"model": "m"}',
        invalid("Missing required parameter: `messages`", "messages", "missing_required_parameter"),
        id="missing-messages",
    ),
    pytest.param(
        b'{"messages": []}',
        invalid("Missing required parameter: `model`", "model", "missing_required_parameter"),
        id="missing-model",
    ),
    pytest.param(
        chat(messages=[USER, {"content": "no role"}]),
        invalid(
            "Missing required parameter: `messages[1].role`",
            "messages",
            "missing_required_parameter",
        ),
        id="missing-nested-role",
    ),
    # Wrong types.
    pytest.param(
        chat(temperature="hot"),
        invalid(
            "Invalid type for `temperature`: expected float, got str", "temperature", "invalid_type"
        ),
        id="temperature-str",
    ),
    pytest.param(
        chat(temperature=True),
        invalid(
            "Invalid type for `temperature`: expected float, got bool",
            "temperature",
            "invalid_type",
        ),
        id="temperature-bool",
    ),
    pytest.param(
        chat(max_tokens=1.5),
        invalid(
            "Invalid type for `max_tokens`: expected int, got float", "max_tokens", "invalid_type"
        ),
        id="max-tokens-float",
    ),
    pytest.param(
        chat(stream="yes"),
        invalid("Invalid type for `stream`: expected bool, got str", "stream", "invalid_type"),
        id="stream-str",
    ),
    pytest.param(
        chat(messages="Hello"),
        invalid("Invalid type for `messages`: expected array, got str", "messages", "invalid_type"),
        id="messages-str",
    ),
    pytest.param(
        chat(messages=[{"role": 1, "content": "x"}]),
        invalid(
            "Invalid type for `messages[0].role`: expected str, got int",
            "messages",
            "invalid_type",
        ),
        id="nested-role-int",
    ),
    pytest.param(
        chat(messages=[{"role": "user", "content": 5}]),
        invalid(
            "Invalid type for `messages[0].content`: expected str or array, got int",
            "messages",
            "invalid_type",
        ),
        id="content-int",
    ),
    pytest.param(
        chat(messages=[USER, "Hello"]),
        invalid(
            "Invalid type for `messages[1]`: expected object, got str", "messages", "invalid_type"
        ),
        id="message-not-object",
    ),
    pytest.param(
        chat(stop=5),
        invalid("Invalid type for `stop`: expected str or array, got int", "stop", "invalid_type"),
        id="stop-int",
    ),
    pytest.param(
        chat(logit_bias={"50256": "ban"}),
        invalid(
            "Invalid type for `logit_bias[...]`: expected float, got str",
            "logit_bias",
            "invalid_type",
        ),
        id="logit-bias-value-str",
    ),
    pytest.param(
        chat(stream_options={"include_usage": "yes"}, stream=True),
        invalid(
            "Invalid type for `stream_options.include_usage`: expected bool, got str",
            "stream_options",
            "invalid_type",
        ),
        id="stream-options-nested",
    ),
    pytest.param(
        b'{"model": "m", "messages": [], "temperature": 1e400}',
        invalid("Invalid value for `temperature`: number out of range", "temperature"),
        id="number-out-of-range",
    ),
    pytest.param(
        chat(functions="f", messages=[]),
        invalid(
            "Invalid type for `functions`: expected array, got str", "functions", "invalid_type"
        ),
        id="type-beats-deprecated",
    ),
    # Deprecated: 501.
    pytest.param(
        chat(functions=[{"name": "f", "parameters": {}}]),
        error(
            "Validation: `functions` is deprecated. Please migrate to use `tools` instead.",
            "functions",
            "deprecated_parameter",
            "not_implemented_error",
        ),
        id="functions",
    ),
    pytest.param(
        chat(function_call="auto"),
        error(
            "Validation: `function_call` is deprecated. Please migrate to use `tool_choice` "
            "instead.",
            "function_call",
            "deprecated_parameter",
            "not_implemented_error",
        ),
        id="function-call",
    ),
    pytest.param(
        chat(model="", messages=[], function_call={"name": "f"}),
        error(
            "Validation: `function_call` is deprecated. Please migrate to use `tool_choice` "
            "instead.",
            "function_call",
            "deprecated_parameter",
            "not_implemented_error",
        ),
        id="deprecated-beats-values",
    ),
    # Values.
    pytest.param(
        chat(model=""), invalid("The 'model' field cannot be empty.", "model"), id="model-empty"
    ),
    pytest.param(
        chat(model="  "), invalid("The 'model' field cannot be empty.", "model"), id="model-blank"
    ),
    pytest.param(
        chat(messages=[]),
        invalid(
            "The 'messages' field cannot be empty. At least one message is required.", "messages"
        ),
        id="messages-empty",
    ),
    pytest.param(
        chat(messages=[{"role": "robot", "content": "x"}]),
        invalid("Invalid role `robot` in messages[0]", "messages"),
        id="role-unknown",
    ),
    pytest.param(
        chat(messages=[USER, {"role": "User", "content": "x"}]),
        invalid("Invalid role `User` in messages[1]", "messages"),
        id="role-case-sensitive",
    ),
    pytest.param(
        chat(temperature=3.5),
        invalid("temperature must be between 0 and 2, got 3.5", "temperature"),
        id="temperature-high",
    ),
    pytest.param(
        chat(temperature=-0.1),
        invalid("temperature must be between 0 and 2, got -0.1", "temperature"),
        id="temperature-negative",
    ),
    pytest.param(
        chat(temperature=3),
        invalid("temperature must be between 0 and 2, got 3", "temperature"),
        id="temperature-int-shown-as-sent",
    ),
    pytest.param(
        chat(top_p=1.5), invalid("top_p must be between 0 and 1, got 1.5", "top_p"), id="top-p"
    ),
    pytest.param(
        chat(frequency_penalty=-2.5),
        invalid("frequency_penalty must be between -2 and 2, got -2.5", "frequency_penalty"),
        id="frequency-penalty",
    ),
    pytest.param(
        chat(presence_penalty=2.01),
        invalid("presence_penalty must be between -2 and 2, got 2.01", "presence_penalty"),
        id="presence-penalty",
    ),
    pytest.param(
        chat(logit_bias={"1": 5, "2": -101}),
        invalid("logit_bias values must be between -100 and 100, got -101", "logit_bias"),
        id="logit-bias",
    ),
    pytest.param(
        chat(logprobs=True, top_logprobs=21),
        invalid("top_logprobs must be between 0 and 20, got 21", "top_logprobs"),
        id="top-logprobs",
    ),
    pytest.param(chat(n=0), invalid("n must be between 1 and 128, got 0", "n"), id="n-zero"),
    pytest.param(chat(n=129), invalid("n must be between 1 and 128, got 129", "n"), id="n-high"),
    pytest.param(
        chat(max_tokens=0),
        invalid("max_tokens must be greater than 0, got 0", "max_tokens"),
        id="max-tokens-zero",
    ),
    pytest.param(
        chat(max_completion_tokens=-1),
        invalid("max_completion_tokens must be greater than 0, got -1", "max_completion_tokens"),
        id="max-completion-tokens-negative",
    ),
    pytest.param(
        chat(stop=[str(i) for i in range(33)]),
        invalid("stop must have at most 32 entries", "stop"),
        id="stop-too-many",
    ),
    pytest.param(
        chat(stop=""), invalid("stop entries must not be empty", "stop"), id="stop-empty-str"
    ),
    pytest.param(
        chat(stop=["\n", ""]),
        invalid("stop entries must not be empty", "stop"),
        id="stop-empty-entry",
    ),
    pytest.param(
        chat(stream_options={"include_usage": True}),
        invalid(
            "The 'stream_options' field is only allowed when 'stream' is set to true.",
            "stream_options",
        ),
        id="stream-options-without-stream",
    ),
    pytest.param(
        chat(stream=False, stream_options={"include_usage": True}),
        invalid(
            "The 'stream_options' field is only allowed when 'stream' is set to true.",
            "stream_options",
        ),
        id="stream-options-with-stream-false",
    ),
    pytest.param(
        chat(top_k=0),
        invalid("top_k must be -1 (disabled) or at least 1, got 0", "top_k"),
        id="top-k",
    ),
    pytest.param(
        chat(min_p=1.5), invalid("min_p must be between 0 and 1, got 1.5", "min_p"), id="min-p"
    ),
    pytest.param(
        chat(repetition_penalty=0),
        invalid(
            "repetition_penalty must be greater than 0 and at most 2, got 0", "repetition_penalty"
        ),
        id="repetition-penalty",
    ),
    pytest.param(
        chat(min_tokens=-1),
        invalid("min_tokens must be at least 0, got -1", "min_tokens"),
        id="min-tokens",
    ),
    pytest.param(
        chat(model="", messages=[], temperature=9),
        invalid("The 'model' field cannot be empty.", "model"),
        id="first-value-error-wins",
    ),
]


@pytest.mark.parametrize("body, expected", CHAT_ERRORS)
def test_chat_validation_error_has_exact_body(body: bytes, expected: dict[str, Any]) -> None:
    is_deprecated = expected["error"]["type"] == "not_implemented_error"
    cls = NotImplementedParameter if is_deprecated else InvalidRequest
    assert_rejects(decode_chat_request, body, expected, cls, 501 if is_deprecated else 400)


def test_render_error_bytes_are_exact() -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_chat_request(chat(temperature=3.5))
    assert render_error(info.value) == (
        b'{"error":{"message":"Validation: temperature must be between 0 and 2, got 3.5",'
        b'"type":"invalid_request_error","param":"temperature","code":"invalid_value"}}'
    )


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
    "fields",
    [
        {"temperature": 0, "top_p": 0},
        {"temperature": 2, "top_p": 1},
        {"frequency_penalty": -2, "presence_penalty": 2},
        {"logit_bias": {"1": -100, "2": 100}},
        {"logprobs": True, "top_logprobs": 0},
        {"logprobs": True, "top_logprobs": 20},
        {"n": 1},
        {"n": 128},
        {"max_tokens": 1, "max_completion_tokens": 1},
        {"stop": [str(i) for i in range(32)]},
        {"stop": "\n"},
        {"stop": []},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"top_k": -1, "min_p": 0, "repetition_penalty": 2, "min_tokens": 0},
        {"seed": 123456789012345678901234567890},
        {"temperature": None, "stream": None, "stop": None},
    ],
)
def test_chat_accepts_boundary_values(fields: dict[str, Any]) -> None:
    decode_chat_request(chat(**fields))


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool", "function"])
def test_chat_accepts_every_openai_role(role: str) -> None:
    decode_chat_request(chat(messages=[{"role": role, "content": "x"}]))


def test_unknown_keys_inside_messages_and_tools_are_accepted() -> None:
    body = chat(
        messages=[
            {"role": "user", "content": "x", "refusal": None, "cache_control": {"type": "eph"}},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "x": 1}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ],
        tools=[{"type": "function", "function": {"name": "f", "strict": True}, "extra": 1}],
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
    )
    req = decode_chat_request(body)
    assert [m.role for m in req.messages] == ["user", "assistant", "tool"]
    assert req.messages[2].tool_call_id == "c1"
    assert req.tools == [
        {"type": "function", "function": {"name": "f", "strict": True}, "extra": 1}
    ]


def test_chat_request_decodes_every_field() -> None:
    fields: dict[str, Any] = {
        "frequency_penalty": 0.5,
        "logit_bias": {"50256": -100},
        "logprobs": True,
        "top_logprobs": 3,
        "max_tokens": 10,
        "max_completion_tokens": 20,
        "n": 2,
        "presence_penalty": -0.5,
        "response_format": {"type": "json_object"},
        "seed": 7,
        "service_tier": "auto",
        "stop": ["\n"],
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "temperature": 0.7,
        "top_p": 0.9,
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "parallel_tool_calls": False,
        "user": "u",
        "metadata": {"k": "v"},
        "store": False,
        "reasoning_effort": "low",
        "modalities": ["text"],
        "prediction": {"type": "content", "content": "x"},
        "audio": {"voice": "alloy", "format": "wav"},
        "web_search_options": {},
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "min_tokens": 1,
        "ignore_eos": True,
        "return_token_ids": True,
        "continue_final_message": True,
        "add_generation_prompt": False,
        "chat_template_kwargs": {"enable_thinking": False},
        "nvext": {"backend_instance_id": 3},
    }
    body = chat(**fields)
    req = decode_chat_request(body)
    assert req.stream_options == StreamOptions(include_usage=True, continuous_usage_stats=True)
    assert req.return_token_ids is True
    assert req.add_generation_prompt is False
    assert msgspec.json.decode(msgspec.json.encode(req)) == json.loads(body)


def test_reencoding_a_request_emits_only_what_the_client_sent() -> None:
    body = chat(
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}], temperature=0
    )
    req = decode_chat_request(body)
    assert msgspec.json.decode(msgspec.json.encode(req)) == json.loads(body)

    forwarded = msgspec.structs.replace(
        req, stream=True, stream_options=StreamOptions(include_usage=True)
    )
    assert msgspec.json.decode(msgspec.json.encode(forwarded)) == {
        **json.loads(body),
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_chat_defaults() -> None:
    req = decode_chat_request(chat())
    assert (req.stream, req.n, req.temperature, req.stream_options) == (None, None, None, None)
    assert (req.return_token_ids, req.continue_final_message) == (False, False)
    assert req.add_generation_prompt is True
    assert req.messages == [ChatMessage(role="user", content="Hello")]


def test_max_output_tokens_prefers_max_completion_tokens() -> None:
    assert max_output_tokens(decode_chat_request(chat())) is None
    assert max_output_tokens(decode_chat_request(chat(max_tokens=5))) == 5
    assert max_output_tokens(decode_chat_request(chat(max_completion_tokens=7))) == 7
    both = decode_chat_request(chat(max_tokens=5, max_completion_tokens=7))
    assert max_output_tokens(both) == 7


@pytest.mark.parametrize(
    "stop, expected", [(None, ()), ("\n", ("\n",)), (["a", "b"], ("a", "b")), ([], ())]
)
def test_stop_list_normalises_stop(stop: Any, expected: tuple[str, ...]) -> None:
    assert stop_list(decode_chat_request(chat(stop=stop))) == expected
    assert stop_list(decode_completion_request(completion(stop=stop))) == expected


def test_text_content_joins_text_parts() -> None:
    assert ChatMessage("user", "plain").text_content() == "plain"
    assert ChatMessage("assistant").text_content() == ""
    parts: list[dict[str, Any]] = [
        {"type": "text", "text": "a"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
        {"type": "text", "text": "b"},
    ]
    assert ChatMessage("user", parts).text_content() == "a\nb"


# --- completions --------------------------------------------------------------------------------

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


# --- what the official openai SDK sends, and what it reads back ---------------------------------


@pytest.fixture
def sdk() -> Iterator[tuple[openai.OpenAI, list[bytes]]]:
    """An openai client whose transport records request bodies and answers like our frontend."""
    sent: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.content)
        if json.loads(request.content).get("stream"):
            return httpx.Response(
                200, content=b"data: [DONE]\n\n", headers={"content-type": "text/event-stream"}
            )
        if request.url.path.endswith("/chat/completions"):
            return httpx.Response(200, content=msgspec.json.encode(CHAT_RESPONSE))
        return httpx.Response(200, content=msgspec.json.encode(COMPLETION_RESPONSE))

    with (
        httpx.Client(transport=httpx.MockTransport(answer)) as http,
        # The SDK takes a legacy httpx client at run time but annotates only httpx2's.
        openai.OpenAI(
            api_key="k",
            base_url="http://frontend/v1",
            http_client=http,  # type: ignore[arg-type]
        ) as client,
    ):
        yield client, sent


CHAT_RESPONSE = ChatCompletionResponse(
    id="chatcmpl-1",
    created=1700000000,
    model="m",
    choices=[
        ChatChoice(
            index=0,
            message=ResponseMessage(content="Hi!", reasoning_content="greet"),
            finish_reason="stop",
            token_ids=[5, 6],
        )
    ],
    usage=UsageInfo(3, 2, 5, PromptTokensDetails(cached_tokens=1)),
)

COMPLETION_RESPONSE = CompletionResponse(
    id="cmpl-1",
    created=1700000000,
    model="m",
    choices=[CompletionChoice(index=0, text=" world", finish_reason="length")],
    usage=UsageInfo(1, 1, 2),
)


def test_sdk_chat_bodies_decode(sdk: tuple[openai.OpenAI, list[bytes]]) -> None:
    client, sent = sdk
    reply = client.chat.completions.create(
        model="m",
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                ],
            },
        ],
        n=2,
        max_completion_tokens=64,
        stop=["\n"],
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        tool_choice="auto",
        extra_body={"top_k": 20, "chat_template_kwargs": {"enable_thinking": False}},
    )
    req = decode_chat_request(sent[-1])
    assert req.n == 2
    assert max_output_tokens(req) == 64
    assert req.top_k == 20
    assert req.messages[1].text_content() == "What is this?"
    assert msgspec.json.decode(msgspec.json.encode(req)) == json.loads(sent[-1])
    assert reply.choices[0].message.content == "Hi!"
    assert reply.usage is not None
    assert reply.usage.total_tokens == 5


def test_sdk_streaming_chat_body_decodes(sdk: tuple[openai.OpenAI, list[bytes]]) -> None:
    client, sent = sdk
    stream = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    assert list(stream) == []
    req = decode_chat_request(sent[-1])
    assert req.stream is True
    assert req.stream_options == StreamOptions(include_usage=True)


def test_sdk_completion_bodies_decode(sdk: tuple[openai.OpenAI, list[bytes]]) -> None:
    client, sent = sdk
    reply = client.completions.create(model="m", prompt=[[1, 2], [3]], max_tokens=4, n=2)
    req = decode_completion_request(sent[-1])
    assert prompts(req) == [[1, 2], [3]]
    assert (req.max_tokens, req.n) == (4, 2)
    assert reply.choices[0].text == " world"
    assert reply.choices[0].finish_reason == "length"


# --- responses ----------------------------------------------------------------------------------


def test_chat_response_encodes_to_the_openai_shape() -> None:
    assert json.loads(msgspec.json.encode(CHAT_RESPONSE)) == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi!", "reasoning_content": "greet"},
                "logprobs": None,
                "finish_reason": "stop",
                "token_ids": [5, 6],
            }
        ],
        "usage": {
            "prompt_tokens": 3,
            "completion_tokens": 2,
            "total_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 1},
        },
    }


def test_response_omits_unset_extras_but_keeps_logprobs_and_finish_reason() -> None:
    response = ChatCompletionResponse(
        id="chatcmpl-2",
        created=1,
        model="m",
        choices=[
            ChatChoice(
                index=0,
                message=ResponseMessage(content=None, reasoning_content=None, tool_calls=None),
                finish_reason=None,
                token_ids=None,
            )
        ],
    )
    assert msgspec.json.encode(response) == (
        b'{"id":"chatcmpl-2","object":"chat.completion","created":1,"model":"m","choices":'
        b'[{"index":0,"message":{"role":"assistant","content":null},"logprobs":null,'
        b'"finish_reason":null}],"usage":null}'
    )


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


# --- the streamed chunk ---------------------------------------------------------------------------


def _read_frames(*frames: bytes) -> list[StreamChunk]:
    decode = msgspec.json.Decoder(StreamChunk).decode
    return [decode(frame.removeprefix(b"data: ").removesuffix(b"\n\n")) for frame in frames]


def test_rendered_chat_chunks_read_back_through_the_shared_chunk_shape() -> None:
    renderer = ChunkRenderer("chat", "chatcmpl-1", "m", 7, include_usage=True, with_token_ids=True)
    first = renderer.render(EngineOutput("Hi", 1, token_ids=[5], prompt_token_ids=[1, 2]))
    last = renderer.render(EngineOutput("!", 1, finish_reason="stop", usage=Usage(2, 2, 1)))
    chunks = _read_frames(first, last, renderer.finish())
    envelope = StreamChunk(id="chatcmpl-1", object="chat.completion.chunk", created=7, model="m")
    first_choice = ChunkChoice(
        delta=ChunkDelta(role="assistant", content="Hi"), prompt_token_ids=[1, 2], token_ids=[5]
    )
    last_choice = ChunkChoice(delta=ChunkDelta(content="!"), finish_reason="stop")
    usage = UsageInfo(2, 2, 4, PromptTokensDetails(cached_tokens=1))
    assert chunks == [
        msgspec.structs.replace(envelope, choices=[first_choice]),
        msgspec.structs.replace(envelope, choices=[last_choice]),
        msgspec.structs.replace(envelope, choices=[], usage=usage),
    ]


def test_rendered_completion_chunks_read_back_through_the_shared_chunk_shape() -> None:
    renderer = ChunkRenderer("completions", "cmpl-1", "m", 7, include_usage=True)
    fast = renderer.render(EngineOutput(" a", 1))
    other = renderer.render(EngineOutput(" b", 1, index=1, finish_reason="length"))
    chunks = _read_frames(fast, other)
    assert [chunk.choices for chunk in chunks] == [
        [ChunkChoice(index=0, text=" a")],
        [ChunkChoice(index=1, text=" b", finish_reason="length")],
    ]
    assert {chunk.object for chunk in chunks} == {"text_completion"}


def test_the_usage_chunk_is_the_envelope_with_no_choices_and_every_count() -> None:
    renderer = ChunkRenderer("completions", "cmpl-1", "m", 7, include_usage=True)
    renderer.add_usage(Usage(0, 0, 0))  # counts nobody knows are left out (issue 9)
    assert renderer.finish() == (
        b'data: {"id":"cmpl-1","object":"text_completion","created":7,"model":"m","choices":[],'
        b'"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0,'
        b'"prompt_tokens_details":{"cached_tokens":0}}}\n\n'
    )


def test_a_workers_chunk_is_read_as_it_comes_with_fields_left_out_or_null() -> None:
    chunk = msgspec.json.decode(
        b'{"id":"x","choices":[],"system_fingerprint":"fp","usage":'
        b'{"prompt_tokens":3,"completion_tokens":null,"prompt_tokens_details":null}}',
        type=StreamChunk,
    )
    assert chunk == StreamChunk(id="x", choices=[], usage=UsageInfo(prompt_tokens=3))


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
