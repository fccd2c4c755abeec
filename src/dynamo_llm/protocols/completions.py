"""``/v1/completions``: the request, its validation, and the unary response.

``prompt`` is a string, a list of strings (a batch), a list of token ids, or a list of token-id
lists (a batch). msgspec allows one array type per union, so it is decoded as
``str | list[str | int | list[int]]`` and a mixed list is rejected here; :func:`prompts` gives
the batch as a list either way.
"""

from __future__ import annotations

from typing import Any, NoReturn, cast

import msgspec
from msgspec import UNSET, UnsetType

from .common import (
    MAX_N,
    AcceptsUnknown,
    RequestDecoder,
    StreamOptions,
    UsageInfo,
    check_model,
    check_range,
    check_sampling,
    invalid_type,
    invalid_value,
    stop_list,
)

__all__ = [
    "CompletionChoice",
    "CompletionRequest",
    "CompletionResponse",
    "decode_completion_request",
    "prompts",
    "stop_list",
]

MAX_BEST_OF = 20
MAX_LOGPROBS = 5


class CompletionRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """An OpenAI (legacy) completions request plus the vLLM / Dynamo extras we accept.

    ``max_tokens`` stays None when not sent: OpenAI's default of 16 is the frontend's to apply,
    so that a forwarded request is exactly what the client sent.
    """

    model: str
    prompt: str | list[str | int | list[int]]
    best_of: int | None = None
    echo: bool | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = None
    max_tokens: int | None = None
    n: int | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # vLLM / Dynamo extensions.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    return_token_ids: bool = False
    nvext: dict[str, Any] | None = None


_decoder = RequestDecoder(CompletionRequest)


def decode_completion_request(
    body: bytes, accepts_unknown: AcceptsUnknown | None = None
) -> CompletionRequest:
    """Decode and validate a completions body; raises :class:`~dynamo_llm.errors.DynamoError`.

    Unknown top-level fields are a 400 unless ``accepts_unknown(model)`` says the model's engine
    forwards them.
    """
    req = _decoder.decode(body, accepts_unknown)
    _check_prompt_type(req.prompt)
    check_model(req.model)
    batch = _check_prompt_values(req.prompt)
    check_sampling(req)
    check_range("logprobs", req.logprobs, 0, MAX_LOGPROBS)
    n = 1 if req.n is None else req.n
    if req.best_of is not None:
        if not 0 <= req.best_of <= MAX_BEST_OF:
            invalid_value(
                f"best_of must be between 0 and {MAX_BEST_OF}, got {req.best_of}", "best_of"
            )
        if req.best_of < n:
            invalid_value(
                f"best_of must be greater than or equal to n ({n}), got {req.best_of}", "best_of"
            )
    if batch * n > MAX_N:
        invalid_value(
            f"the number of prompts times n must be at most {MAX_N}, "
            f"got {batch * n} ({batch} prompts, n={n})",
            "prompt",
        )
    return req


def prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The prompt as a batch: a string or one token list becomes a batch of one."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [cast(list[int], prompt)]
    return cast(list[str | list[int]], prompt)


def _check_prompt_type(prompt: str | list[str | int | list[int]]) -> None:
    if isinstance(prompt, str) or not prompt:
        return
    kind = type(prompt[0])
    if not all(type(item) is kind for item in prompt):
        invalid_type(
            "Invalid type for `prompt`: expected a string, an array of strings, an array of "
            "token ids or an array of token id arrays, got a mixed array",
            "prompt",
        )


def _check_prompt_values(prompt: str | list[str | int | list[int]]) -> int:
    """Reject empty prompts and negative token ids; return the batch size."""
    if not prompt:
        _empty_prompt()
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt[0], int):
        _check_token_ids(cast(list[int], prompt))
        return 1
    if not all(prompt):
        _empty_prompt()
    if isinstance(prompt[0], list):
        for ids in cast(list[list[int]], prompt):
            _check_token_ids(ids)
    return len(prompt)


def _check_token_ids(ids: list[int]) -> None:
    if min(ids) < 0:
        invalid_value(f"token ids must not be negative, got {min(ids)}", "prompt")


def _empty_prompt() -> NoReturn:
    invalid_value("The 'prompt' field cannot be empty.", "prompt")


# --- unary response ----------------------------------------------------------------------------


class CompletionChoice(msgspec.Struct, kw_only=True):
    """One choice. ``logprobs`` and ``finish_reason`` are always present (the openai SDK expects
    them); ``token_ids`` only when given (``return_token_ids``)."""

    index: int
    text: str
    logprobs: Any = None
    finish_reason: str | None
    token_ids: list[int] | UnsetType | None = UNSET

    def __post_init__(self) -> None:
        if self.token_ids is None:
            self.token_ids = UNSET


class CompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
