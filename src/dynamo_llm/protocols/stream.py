"""One streamed chunk on the wire: the shape the SSE renderer writes and the transport reads.

A streamed response is a run of ``data:`` events, each one chunk: ``chat.completion.chunk``
(a ``delta`` per choice) or ``text_completion`` (a ``text`` per choice), then the usage-only
chunk (``"choices":[]`` and ``usage``) when the client asked for it. These Structs are that
shape, and both directions use them:

- **Reading** (:mod:`dynamo_llm.transport`): a worker's chunk decodes into :class:`StreamChunk`.
  Every field is optional, so a chunk is taken as the worker sends it (a field left out, or
  ``null`` where we write a number); fields we do not read (``logprobs``, ``system_fingerprint``)
  are skipped by the decoder. The top-level ``error`` and ``prompt_token_ids`` are what workers
  add: an error event, and vLLM's chat prompt ids. Where every field must survive (folding,
  fan-out, migration) the chunk is also kept as plain dicts; :func:`carries_output` and
  :func:`chat_choice` read those.
- **Writing** (:mod:`dynamo_llm.http.sse`): ``omit_defaults`` leaves out every field still
  None, so the renderer encodes a chunk's envelope (``id``, ``object``, ``created``,
  ``model``) once per request from these Structs (the usage chunk, which carries a worker's
  own keys too, is written as a plain object in the same order).

Neither side encodes or decodes a Struct per token. The renderer writes each token's choice as
bytes after the envelope, in :class:`ChunkChoice`'s field order (plus ``"logprobs":null``),
because a Struct encode per token costs more than two concatenations; the transport's raw relay
passes a worker's chunks on as bytes and decodes only the first one and the last few.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .common import UsageInfo

CHAT_CHUNK = "chat.completion.chunk"
COMPLETION_CHUNK = "text_completion"


class ChunkDelta(msgspec.Struct, omit_defaults=True):
    """A chat choice's increment: ``role`` on a choice's first chunk, then ``content``."""

    role: str | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct, omit_defaults=True):
    """One choice of a chunk: a ``delta`` (chat) or a ``text`` (completions).

    ``prompt_token_ids`` (vLLM's field, on a completion's first chunk) and ``token_ids`` are
    there when token ids were asked for (``return_token_ids``).
    """

    index: int = 0
    delta: ChunkDelta | None = None
    text: str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None
    finish_reason: str | None = None


class StreamChunk(msgspec.Struct, omit_defaults=True):
    """One chunk of a streamed response (the envelope, its choices, and the final usage)."""

    id: str | None = None
    object: str | None = None
    created: int | None = None
    model: str | None = None
    choices: list[ChunkChoice] | None = None
    usage: UsageInfo | None = None
    error: Any = None
    prompt_token_ids: list[int] | None = None


# The keys of a chat delta or a completion choice that are not generated output.
_NOT_OUTPUT = frozenset({"role", "index", "finish_reason", "stop_reason", "logprobs", "token_ids"})


def carries_output(choice: dict[str, Any]) -> bool:
    """Whether a worker's choice (plain dict) carries generated output: text, or a tool call,
    reasoning or a refusal in its delta (an output with no token ids counts one token)."""
    if choice.get("text"):
        return True
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return False
    return any(value for key, value in delta.items() if key not in _NOT_OUTPUT)


def chat_choice(choice: dict[str, Any]) -> dict[str, Any]:
    """A completion choice (plain dict) as a chat chunk's choice: ``text`` as the delta's
    ``content``, completions logprobs as chat logprobs, every other key kept.

    For a chat request continued on ``/v1/completions`` (a token-exact migration), whose chunks
    the client must still see as chat chunks.
    """
    out: dict[str, Any] = {}
    for key, value in choice.items():
        if key == "text":
            out["delta"] = {"content": value}
        elif key == "logprobs":
            out["logprobs"] = chat_logprobs(value) if isinstance(value, dict) else value
        else:
            out[key] = value
    out.setdefault("delta", {})
    return out


def chat_logprobs(logprobs: dict[str, Any]) -> dict[str, Any]:
    """Completions logprobs (``tokens``, ``token_logprobs``, ``top_logprobs``) as chat logprobs
    (``content``: one entry per token with its ``bytes`` and ``top_logprobs``)."""
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    content = []
    for at, token in enumerate(tokens):
        top = tops[at] if at < len(tops) and isinstance(tops[at], dict) else {}
        content.append(
            {
                "token": token,
                "logprob": values[at] if at < len(values) else None,
                "bytes": list(str(token).encode()),
                "top_logprobs": [
                    {"token": t, "logprob": p, "bytes": list(str(t).encode())}
                    for t, p in top.items()
                ],
            }
        )
    return {"content": content, "refusal": None}
