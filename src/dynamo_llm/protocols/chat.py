"""``/v1/chat/completions``: the request, its validation, and the unary response.

The request Struct is decoded straight from the body (see :mod:`.common` for the error path and
for who may send fields we do not know). It names what the frontend validates and what an
in-process engine reads; a request passed on to a worker goes as the client's own JSON (the raw
body, patched), so nothing the client sent is lost, known or not, at the top level or nested.
Messages, content parts and tools are lenient: unknown keys inside them are not errors.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from ..errors import NotImplementedParameter
from .common import (
    AcceptsUnknown,
    RequestDecoder,
    StreamOptions,
    UsageInfo,
    check_model,
    check_positive,
    check_range,
    check_sampling,
    invalid_value,
    stop_list,
)

__all__ = [
    "ChatChoice",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "ContentPart",
    "ResponseMessage",
    "content_text",
    "decode_chat_request",
    "max_output_tokens",
    "stop_list",
]

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_TOP_LOGPROBS = 20

# One part of an array content: {"type": "text", "text": ...}, {"type": "image_url", ...}, ...
ContentPart = dict[str, Any]


def content_text(content: str | list[ContentPart] | None, sep: str = "\n") -> str:
    """The text of a message's content: the string itself, or the ``text`` of its parts joined
    by ``sep`` (parts without a string ``text``, an image or audio, are left out).

    The one reading of a content for everything that needs its text: the mocker's chat template
    and a migration's continued message join parts with newlines; the echo engine and the
    router's prefix text join them with nothing.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return sep.join(text for part in content if isinstance(text := part.get("text"), str))


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text_content(self) -> str:
        """The message's text: the string content, or its text parts joined by newlines."""
        return content_text(self.content)


class ChatCompletionRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """An OpenAI chat request plus the vLLM / Dynamo extras we accept.

    ``max_tokens`` and ``max_completion_tokens`` stay as sent; use :func:`max_output_tokens`.
    """

    model: str
    messages: list[ChatMessage]
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    presence_penalty: float | None = None
    response_format: dict[str, Any] | None = None
    seed: int | None = None
    service_tier: str | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    # vLLM / Dynamo extensions.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    return_token_ids: bool = False
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    nvext: dict[str, Any] | None = None


_decoder = RequestDecoder(ChatCompletionRequest)


def decode_chat_request(
    body: bytes, accepts_unknown: AcceptsUnknown | None = None
) -> ChatCompletionRequest:
    """Decode and validate a chat body; raises :class:`~dynamo_llm.errors.DynamoError`.

    Unknown top-level fields are a 400 unless ``accepts_unknown(model)`` says the model's engine
    forwards them.
    """
    req = _decoder.decode(body, accepts_unknown)
    if req.functions is not None:
        raise NotImplementedParameter(
            "Validation: `functions` is deprecated. Please migrate to use `tools` instead.",
            param="functions",
        )
    if req.function_call is not None:
        raise NotImplementedParameter(
            "Validation: `function_call` is deprecated. Please migrate to use `tool_choice` "
            "instead.",
            param="function_call",
        )
    check_model(req.model)
    if not req.messages:
        invalid_value(
            "The 'messages' field cannot be empty. At least one message is required.", "messages"
        )
    for i, message in enumerate(req.messages):
        if message.role not in ROLES:
            invalid_value(f"Invalid role `{message.role}` in messages[{i}]", "messages")
    check_sampling(req)
    check_range("top_logprobs", req.top_logprobs, 0, MAX_TOP_LOGPROBS)
    check_positive("max_completion_tokens", req.max_completion_tokens)
    return req


def max_output_tokens(req: ChatCompletionRequest) -> int | None:
    """The completion budget: ``max_completion_tokens`` if set, else ``max_tokens``."""
    if req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


# --- unary response ----------------------------------------------------------------------------


class ResponseMessage(msgspec.Struct, kw_only=True):
    """The assistant's message. ``content`` is always present (null with tool calls only);
    ``reasoning_content`` and ``tool_calls`` are omitted when None."""

    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | UnsetType | None = UNSET
    tool_calls: list[dict[str, Any]] | UnsetType | None = UNSET

    def __post_init__(self) -> None:
        # UNSET fields are left out of the JSON; None is accepted for convenience.
        if self.reasoning_content is None:
            self.reasoning_content = UNSET
        if self.tool_calls is None:
            self.tool_calls = UNSET


class ChatChoice(msgspec.Struct, kw_only=True):
    """One choice. ``logprobs`` and ``finish_reason`` are always present (the openai SDK expects
    them); ``token_ids`` only when given (``return_token_ids``)."""

    index: int
    message: ResponseMessage
    logprobs: Any = None
    finish_reason: str | None
    token_ids: list[int] | UnsetType | None = UNSET

    def __post_init__(self) -> None:
        if self.token_ids is None:
            self.token_ids = UNSET


class ChatCompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
