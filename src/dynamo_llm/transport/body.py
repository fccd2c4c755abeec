"""The body sent upstream: the client's own JSON, with only what the attempt must change.

Pass-through is the rule: the worker gets every key the client sent, fields the frontend does
not know (``cache_prompt``, ``guided_json``, any ``extra_body`` field) and keys nested in
messages, content parts and tools alike, byte-for-value as sent. So the body is the request's
``raw_body`` decoded into a dict and patched, never re-encoded from the validated Struct (which
holds only the fields we know). The patch:

- ``stream: true`` and ``stream_options.include_usage: true`` (the client's other stream options
  kept): a unary client is folded by the frontend, and usage is always the engine's own count;
- ``model``: the worker's own name for the model, when it differs;
- ``n`` removed, ``prompt`` replaced: a fan-out sub-request (one choice, one prompt of a batch);
- ``max_tokens`` (or ``max_completion_tokens``, whichever the client used) when the attempt's
  budget differs from the client's (OpenAI's default of 16 for completions, applied by us);
- ``return_token_ids: true`` when the attempt tracks tokens (for migration).

A migration's replay arrives with its own ``raw_body`` (the client's JSON with the replay's
changes, :mod:`~dynamo_llm.router.migration`) and is patched the same way. A request built in
code without a body, or one whose body a dict cannot hold (a number no float represents), is
encoded from its validated Struct instead.

Cost, measured on this 2-core VM (``python -m timeit`` over a 200-byte and a 2 KB chat body with
unknown fields): 1.6 / 5.3 µs per body, against 1.3 / 3.2 µs for the Struct re-encode it replaces.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..engines.base import EngineRequest
from ..protocols.chat import ChatCompletionRequest, max_output_tokens
from ..protocols.common import decode_object

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
    body = decode_object(request.raw_body)
    if body is None:
        body = msgspec.to_builtins(params)
    options = body.get("stream_options")
    body["stream"] = True
    body["stream_options"] = (
        {**options, "include_usage": True} if isinstance(options, dict) else _USAGE_ONLY.copy()
    )
    if model is not None and model != params.model:
        body["model"] = model
    if (params.n or 1) > 1:
        body.pop("n", None)
    if return_token_ids:
        body["return_token_ids"] = True
    max_tokens = request.max_tokens
    if isinstance(params, ChatCompletionRequest):
        if max_tokens is not None and max_tokens != max_output_tokens(params):
            key = "max_tokens" if params.max_completion_tokens is None else "max_completion_tokens"
            body[key] = max_tokens
    else:
        prompt = request.prompt
        if prompt is not None and prompt is not params.prompt and prompt != params.prompt:
            body["prompt"] = prompt
        if max_tokens is not None and max_tokens != params.max_tokens:
            body["max_tokens"] = max_tokens
    return _encode(body)


_USAGE_ONLY: dict[str, Any] = {"include_usage": True}
_encode = msgspec.json.encode
