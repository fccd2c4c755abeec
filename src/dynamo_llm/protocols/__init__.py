"""OpenAI wire models, one module per endpoint: decoding, validation, unary responses."""

from .chat import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ContentPart,
    ResponseMessage,
    content_text,
    decode_chat_request,
    max_output_tokens,
)
from .common import (
    PromptTokensDetails,
    StreamOptions,
    UsageInfo,
    peek_model,
    stop_list,
    usage_info,
)
from .completions import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    decode_completion_request,
    prompts,
)
from .stream import ChunkChoice, ChunkDelta, StreamChunk

__all__ = [
    "ChatChoice",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "ChunkChoice",
    "ChunkDelta",
    "CompletionChoice",
    "CompletionRequest",
    "CompletionResponse",
    "ContentPart",
    "PromptTokensDetails",
    "ResponseMessage",
    "StreamChunk",
    "StreamOptions",
    "UsageInfo",
    "content_text",
    "decode_chat_request",
    "decode_completion_request",
    "max_output_tokens",
    "peek_model",
    "prompts",
    "stop_list",
    "usage_info",
]
