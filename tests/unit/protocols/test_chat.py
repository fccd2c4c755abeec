"""The chat wire model: decoding, every validation error's exact body, and the response shape.

The errors both endpoints share are in ``test_common``."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from dynamo_llm.errors import InvalidRequest, NotImplementedParameter
from dynamo_llm.protocols import (
    ChatChoice,
    ChatCompletionResponse,
    ChatMessage,
    ResponseMessage,
    StreamOptions,
    decode_chat_request,
    max_output_tokens,
)
from tests.unit.protocols.helpers import (
    CHAT_RESPONSE,
    USER,
    assert_rejects,
    chat,
    error,
    invalid,
)

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


def test_text_content_joins_text_parts() -> None:
    assert ChatMessage("user", "plain").text_content() == "plain"
    assert ChatMessage("assistant").text_content() == ""
    parts: list[dict[str, Any]] = [
        {"type": "text", "text": "a"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
        {"type": "text", "text": "b"},
    ]
    assert ChatMessage("user", parts).text_content() == "a\nb"


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
