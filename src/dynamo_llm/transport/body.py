"""The body sent upstream: the client's request, with what the attempt changes.

The request always goes upstream as a stream (``stream: true``,
``stream_options.include_usage: true``), so that a unary client is folded by the frontend and
usage is always exact. An attempt may also change the model name (the worker's own name for
it), the prompt and ``n`` (a fan-out sub-request), ``max_tokens`` (a migration's remaining
budget) and ask for token ids (for migration).
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..engines.base import EngineRequest
from ..protocols.chat import ChatCompletionRequest, max_output_tokens
from ..protocols.common import StreamOptions

__all__ = ["upstream_body"]


def upstream_body(
    request: EngineRequest, *, model: str | None = None, return_token_ids: bool = False
) -> bytes:
    """The JSON body sent upstream: the client's request with what the relay needs changed.

    Always ``stream: true`` with ``stream_options.include_usage: true``; ``model`` replaced when
    given; a fan-out sub-request gets its own prompt and ``n`` dropped; a ``max_tokens``
    different from the client's (a migration's remaining budget) replaces it.
    """
    params = request.params
    options = params.stream_options
    changes: dict[str, Any] = {
        "stream": True,
        "stream_options": StreamOptions(
            include_usage=True,
            continuous_usage_stats=options is not None and options.continuous_usage_stats,
        ),
    }
    if model is not None and model != params.model:
        changes["model"] = model
    if (params.n or 1) > 1:
        changes["n"] = None
    if return_token_ids:
        changes["return_token_ids"] = True
    max_tokens = request.max_tokens
    if isinstance(params, ChatCompletionRequest):
        if max_tokens is not None and max_tokens != max_output_tokens(params):
            key = "max_tokens" if params.max_completion_tokens is None else "max_completion_tokens"
            changes[key] = max_tokens
    else:
        prompt = request.prompt
        if prompt is not None and prompt is not params.prompt and prompt != params.prompt:
            changes["prompt"] = prompt
        if max_tokens is not None and max_tokens != params.max_tokens:
            changes["max_tokens"] = max_tokens
    return _encode(msgspec.structs.replace(params, **changes))


_encode = msgspec.json.encode
