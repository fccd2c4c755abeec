"""Server-sent events: rendering engine outputs as OpenAI chunks, and the fixed frames.

Rendering is on the per-token path, so a renderer builds each request's constant JSON prefix
once and then makes an engine's chunk with one JSON string encode and two concatenations; it
never builds a dict per token. The chunk's shape is :mod:`dynamo_llm.protocols.stream`, which
the transport reads workers' chunks with: the envelope is encoded from its Structs, and the
per-token choice is written as bytes in its field order. Outputs that carry ``raw`` bytes (a
relaying engine) are passed through as-is by the caller and never reach a renderer.

A worker's parsed outputs carry its chunks (``EngineOutput.chunks``): those are re-encoded as
the worker sent them, every field kept (tool calls, logprobs, keys of its own), with our id,
model, creation time and choice index, and without token ids the client did not ask for. The
usage chunk is the engines' usage with the worker's own usage keys and the other top-level keys
of its usage chunk (llama.cpp's ``timings``); when no count is known there is no usage chunk
(logged), rather than a chunk of zeros.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from ..engines.base import EngineOutput, Usage
from ..errors import DynamoError, render_error
from ..protocols.common import usage_info
from ..protocols.stream import CHAT_CHUNK, COMPLETION_CHUNK, StreamChunk

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),
]

log = logging.getLogger("dynamo_llm.http")

_encode = msgspec.json.encode
_ENVELOPE = frozenset({"id", "object", "created", "model", "usage"})
_TOKEN_IDS = frozenset({"token_ids", "prompt_token_ids"})
_TAIL_OPEN = b',"logprobs":null,"finish_reason":null}]}\n\n'


def error_frame(exc: DynamoError) -> bytes:
    """``event: error`` with the same JSON body as a plain error response (SPEC §3 fix)."""
    return b"event: error\ndata: " + render_error(exc) + b"\n\n"


class ChunkRenderer:
    """Renders one request's stream of :class:`EngineOutput` as OpenAI SSE chunks.

    ``kind`` is ``"chat"`` (``chat.completion.chunk`` with a ``delta``) or ``"completions"``
    (``text_completion`` with ``text``). Usage from every choice's last output is summed for the
    final usage chunk (``stream_options.include_usage``).
    """

    __slots__ = (
        "_chat",
        "_chunk",
        "_envelope",
        "_fast_head",
        "_head",
        "_roles_sent",
        "_tail",
        "_with_token_ids",
        "include_usage",
        "usage",
    )

    def __init__(
        self,
        kind: str,
        response_id: str,
        model: str,
        created: int,
        *,
        include_usage: bool = False,
        with_token_ids: bool = False,
    ) -> None:
        self._chat = kind == "chat"
        self._chunk = StreamChunk(
            id=response_id,
            object=CHAT_CHUNK if self._chat else COMPLETION_CHUNK,
            created=created,
            model=model,
        )
        # {"id":...,"object":...,"created":...,"model":... without its closing brace.
        self._envelope = _encode(self._chunk)[:-1]
        self._head = b"data: " + self._envelope + b',"choices":[{"index":'
        self._fast_head = self._head + (b'0,"delta":{"content":' if self._chat else b'0,"text":')
        self._roles_sent: set[int] = set()
        self._with_token_ids = with_token_ids
        self.include_usage = include_usage
        self.usage: Usage | None = None
        self._tail: dict[str, Any] = {}  # the other keys of the workers' usage chunks

    def render(self, out: EngineOutput) -> bytes:
        if out.usage is not None:
            self.add_usage(out.usage)
        if out.chunks is not None:
            return self._render_chunks(out.chunks, out.index)
        index = out.index
        if (
            out.finish_reason is None
            and not self._with_token_ids
            and index == 0
            and (not self._chat or 0 in self._roles_sent)
        ):
            # The common case: one choice, a text delta, nothing else.
            if self._chat:
                return self._fast_head + _encode(out.text) + b"}" + _TAIL_OPEN
            return self._fast_head + _encode(out.text) + _TAIL_OPEN
        parts = [self._head, str(index).encode()]
        if self._chat:
            if index in self._roles_sent:
                parts.append(b',"delta":{"content":')
            else:
                self._roles_sent.add(index)
                parts.append(b',"delta":{"role":"assistant","content":')
            parts.append(_encode(out.text))
            parts.append(b"}")
        else:
            parts.append(b',"text":')
            parts.append(_encode(out.text))
        # vLLM's fields with ``return_token_ids`` (what a migration replays exactly): the prompt's
        # ids on a completion's first choice, but on a chat's first chunk itself, after its
        # choices; the generated ids on every choice.
        prompt_ids = out.prompt_token_ids if self._with_token_ids else None
        if prompt_ids is not None and not self._chat:
            parts.append(b',"prompt_token_ids":')
            parts.append(_encode(prompt_ids))
        if self._with_token_ids and out.token_ids is not None:
            parts.append(b',"token_ids":')
            parts.append(_encode(out.token_ids))
        parts.append(b',"logprobs":null,"finish_reason":')
        parts.append(b"null" if out.finish_reason is None else _encode(out.finish_reason))
        if prompt_ids is not None and self._chat:
            parts.append(b'}],"prompt_token_ids":')
            parts.append(_encode(prompt_ids))
            parts.append(b"}\n\n")
        else:
            parts.append(b"}]}\n\n")
        return b"".join(parts)

    def _render_chunks(self, chunks: list[dict[str, Any]], index: int) -> bytes:
        """A worker's chunks as it sent them, with our envelope and the choice index.

        The chunks are the output's own (decoded for it), so they are changed in place: a
        copy would cost more than the encode.
        """
        frames: list[bytes] = []
        envelope = self._chunk
        keep_ids = self._with_token_ids
        for chunk in chunks:
            choices = chunk.get("choices")
            if not choices:
                self.add_tail(chunk)  # a usage chunk: its keys go on ours
                continue
            chunk["id"] = envelope.id
            chunk["object"] = envelope.object
            chunk["created"] = envelope.created
            chunk["model"] = envelope.model
            chunk.pop("usage", None)  # ours comes at the end
            if not keep_ids:
                chunk.pop("prompt_token_ids", None)
            for choice in choices:
                if isinstance(choice, dict):
                    choice["index"] = index
                    if not keep_ids:
                        choice.pop("token_ids", None)
                        choice.pop("prompt_token_ids", None)
            frames.append(b"data: " + _encode(chunk) + b"\n\n")
        return frames[0] if len(frames) == 1 else b"".join(frames)

    def add_tail(self, chunk: dict[str, Any]) -> None:
        """A worker's usage chunk: its other top-level keys go on the usage chunk we render."""
        for key, value in chunk.items():
            if key in _ENVELOPE or key in _TOKEN_IDS or key == "choices":
                continue
            if value is not None or key not in self._tail:
                self._tail[key] = value

    def add_usage(self, usage: Usage) -> None:
        """Count a choice's usage towards the final usage chunk."""
        self.usage = usage if self.usage is None else self.usage + usage

    def finish(self) -> bytes:
        """What goes before ``[DONE]``: the usage chunk when asked for, else nothing.

        No chunk when no count is known (a worker that reports none), unless the worker's usage
        chunk had keys of its own to pass on (then its usage is null).
        """
        if not self.include_usage:
            return b""
        info = usage_info(self.usage)
        if info is None and not self._tail:
            log.debug("no usage known for %s: the usage chunk is left out", self._chunk.id)
            return b""
        chunk: dict[str, Any] = {
            "id": self._chunk.id,
            "object": self._chunk.object,
            "created": self._chunk.created,
            "model": self._chunk.model,
            "choices": [],
            "usage": info,
        }
        for key, value in self._tail.items():
            chunk.setdefault(key, value)
        return b"data: " + _encode(chunk) + b"\n\n"
