"""SSE event parsing, the slow path: a buffer's events decoded one by one into one output.

Every buffer of a parsed stream comes here, and in the relay modes every buffer the fast path
(:mod:`.relay`) passes over: the first (to learn the upstream's id and model), the last ones
(``finish_reason``, usage, ``[DONE]``), comments, and all of them when token ids are tracked.

A chunk decodes into the shared wire shape (:class:`~dynamo_llm.protocols.stream.StreamChunk`).
The upstream's ``data: [DONE]`` is stripped (the frontend sends its own) and ends the stream.
The usage-only chunk is never relayed: its usage rides on the last output
(``EngineOutput.usage``), and the frontend renders the usage chunk itself when the client asked
for one, so that a migrated request reports one correct usage. An ``event: error`` frame or a
``data: {"error": ...}`` event becomes the matching :class:`DynamoError`, raised by the stream
after what came before it in the buffer is delivered.
"""

from __future__ import annotations

import msgspec

from ..engines.base import EngineOutput, Usage
from ..errors import DynamoError, UpstreamError
from ..protocols.common import UsageInfo
from ..protocols.stream import StreamChunk
from .errors import error_from_worker
from .relay import RawRelay

__all__ = ["EventParser", "decode_chunk", "split_event"]


class EventParser:
    """One stream's slow path, and what the stream learns along it.

    ``seen_first``: a chunk came (the first-token deadline is over). ``done``: ``[DONE]`` came.
    ``failure``: the error the stream raises once the output before it is delivered.
    ``keep_raw``: the relay modes, where the kept events are passed on as ``raw`` bytes too.
    """

    __slots__ = ("_finish_reason", "_keep_raw", "_relay", "_usage", "done", "failure", "seen_first")

    def __init__(self, relay: RawRelay, *, keep_raw: bool) -> None:
        self._relay = relay
        self._keep_raw = keep_raw
        self._usage: Usage | None = None
        self._finish_reason: str | None = None
        self.seen_first = False
        self.done = False
        self.failure: DynamoError | None = None

    def parse(self, part: bytes) -> EngineOutput | None:
        """The output for ``part`` (complete events); None when it carries nothing to pass on."""
        keep_raw = self._keep_raw
        kept: list[bytes] = []
        texts: list[str] = []
        token_ids: list[int] | None = None
        prompt_ids: list[int] | None = None
        finish_reason: str | None = None
        num_tokens = 0
        for event in part.split(b"\n\n"):
            if not event:
                continue
            try:
                name, data = split_event(event)
                chunk = decode_chunk(name, data)
            except DynamoError as exc:
                # What came before the failure is still delivered; the stream raises after it.
                self.failure = exc
                break
            if chunk is None:
                if data == b"[DONE]":
                    self.done = True
                    break
                continue
            if not self.seen_first:
                self.seen_first = True
                self._relay.learn(event, chunk)
            if chunk.usage is not None:
                self._usage = _engine_usage(chunk.usage)
            if chunk.prompt_token_ids is not None:
                prompt_ids = chunk.prompt_token_ids  # vLLM's chat puts them on the chunk
            choices = chunk.choices
            if not choices:
                continue  # the usage-only chunk: its usage rides on the last output
            if keep_raw:
                kept.append(event)
            for choice in choices:
                text = choice.delta.content if choice.delta is not None else choice.text
                if text:
                    texts.append(text)
                if choice.prompt_token_ids is not None:
                    prompt_ids = choice.prompt_token_ids
                ids = choice.token_ids
                if ids:
                    token_ids = ids if token_ids is None else token_ids + ids
                    num_tokens += len(ids)
                elif text:
                    num_tokens += 1
                if choice.finish_reason is not None:
                    finish_reason = self._finish_reason = choice.finish_reason
        usage = None
        if self.done:
            # The last output carries the usage and (again, if it came earlier) the finish reason.
            usage = self._usage
            finish_reason = self._finish_reason
        raw: bytes | None = None
        if keep_raw:
            raw = self._relay.rewrite(b"\n\n".join(kept) + b"\n\n") if kept else b""
            if not kept and usage is None:
                return None
        elif (
            not texts
            and token_ids is None
            and finish_reason is None
            and usage is None
            and prompt_ids is None
        ):
            return None
        return EngineOutput(
            "".join(texts),
            num_tokens,
            token_ids=token_ids,
            finish_reason=finish_reason,
            usage=usage,
            raw=raw,
            prompt_token_ids=prompt_ids,
        )


def decode_chunk(name: bytes | None, data: bytes | None) -> StreamChunk | None:
    """The chunk an event carries; None for [DONE], comments and events we ignore."""
    if data is None or data == b"[DONE]":
        return None
    if name is not None and name != b"message":
        if name == b"error":
            raise error_from_worker(None, data)
        return None
    try:
        chunk = _chunk_decoder.decode(data)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        raise _malformed(data) from None
    if chunk.error is not None or chunk.object == "error":
        raise error_from_worker(None, data)
    return chunk


_chunk_decoder = msgspec.json.Decoder(StreamChunk)


def split_event(event: bytes) -> tuple[bytes | None, bytes | None]:
    """(event name, data) of one SSE event; data None when it has no data line."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return None, event[6:]  # the usual one-line event
    name: bytes | None = None
    data: list[bytes] = []
    for line in event.split(b"\n"):
        if not line or line[0] == 58:  # ":" starts a comment
            continue
        field, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value
        elif field not in (b"id", b"retry"):
            raise _malformed(line)
    return name, b"\n".join(data) if data else None


def _malformed(what: bytes) -> UpstreamError:
    """The error for bytes that are not an SSE event or not a chunk."""
    return UpstreamError(f"The worker sent a malformed event: {what[:80]!r}")


def _engine_usage(usage: UsageInfo) -> Usage:
    details = usage.prompt_tokens_details
    return Usage(
        usage.prompt_tokens or 0,
        usage.completion_tokens or 0,
        (details.cached_tokens or 0) if details is not None else 0,
    )
