"""Shared by the protocols tests: request bodies, the exact error bodies they expect, and a
chat and a completion response as the frontend would answer."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from dynamo_llm.errors import DynamoError, InvalidRequest, render_error
from dynamo_llm.protocols import (
    ChatChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    PromptTokensDetails,
    ResponseMessage,
    UsageInfo,
)

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
