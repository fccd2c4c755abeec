"""The raw relay: a worker's events passed on as bytes, its id and model name rewritten to ours.

The relay never parses and re-encodes a chunk to pass it on. The stream cuts whatever buffers
the socket gives at the last ``\\n\\n`` (keeping the tail for the next read), and the relay
yields the complete events as one ``raw`` output whose ``num_tokens`` is the number of events in
it (an event is about a token; the exact count comes with the usage at the end). Only the first
event is parsed (by the slow path, :mod:`.events`), to learn the upstream's response id and
model name; later buffers get a ``bytes.replace`` so that the client sees ``chatcmpl-<our id>``
and our model name (skipped when they already match). Our own worker and vLLM take the id from
our ``X-Request-Id``, which is the attempt's upstream id (a UUID, not the client's id), so for
them the id is always replaced.

Everything that needs a decision (the chunk with a ``finish_reason``, the usage-only chunk,
``[DONE]``, an error) comes at the end of a stream, so the relay looks only at the last bytes of
a buffer's events, from the last one back: a chunk still in progress has
``"finish_reason":null`` there. The in-progress events before the first one that needs a
decision are relayed as bytes, and only the rest (two or three events, once a stream) takes the
slow path, where its events are parsed one by one: a worker that writes fast hands over its last
events in one buffer with many tokens, and those tokens are not parsed. Measured on a loaded
2-core VM over 245-byte vLLM-shaped chunks, the relay costs 1.0-1.4 µs for a one-event buffer
(0.35 of it building the ``EngineOutput``), plus 0.3 µs per id or model replace, and 0.3-0.7 µs
per event in multi-event buffers; parsing the same events costs 2.2-3.5 µs each.

**Events are objects.** A worker's event that is not a JSON object must not reach the client
(it ends the stream with an ``upstream_error``). Parsing every relayed event would cost about
as much as the rest of the relay, so the bytes relayed as they are pass a cheaper check instead:
every event is a single line that opens with ``data: {`` (or ``data:{``, as the first event
spelt it) and closes with ``}``; in bytes, the buffer starts with the opening, every ``\\n\\n``
is a ``}\\n\\ndata: {``, and it has no other ``\\n``. Anything else (HTML, text, a
comment, an ``event:`` line, a multi-line event) goes to the slow path, which parses it and
fails the stream if it is not a chunk. This is not a JSON validation: it lets through bytes a
worker wrapped in braces. That is sound enough because what it guards against is a confused
worker or a proxy in between (an HTML error page, plain text, a stack trace), none of which is
one brace-wrapped line per event, while a worker that means harm can put anything inside
valid JSON strings anyway; the events that decide (the first, the finish, the usage) are always
parsed. Its cost: three ``bytes`` scans of the buffer, measured in ``bench/README.md``.
"""

from __future__ import annotations

import msgspec

from ..engines.base import EngineOutput
from ..protocols.stream import StreamChunk

__all__ = ["RawRelay"]

_encode = msgspec.json.encode


class RawRelay:
    """One stream's relay: what it learnt from the first event, and the fast path it enables.

    ``fast`` is False when every buffer takes the slow path (the tracked and parsed modes); the
    relay then only rewrites the raw events the slow path keeps, and records the upstream id.
    ``rewrites`` are the ``(old, new)`` replacements learnt from the first event.
    """

    __slots__ = (
        "_boundary",
        "_data_open",
        "_fast",
        "_model",
        "_null_finish",
        "_null_finish_window",
        "_response_id",
        "rewrites",
        "upstream_id",
    )

    def __init__(self, *, response_id: str, model: str, fast: bool) -> None:
        self._response_id = response_id
        self._model = model
        self._fast = fast
        self.rewrites: list[tuple[bytes, bytes]] = []
        self._null_finish = b""
        self._null_finish_window = 0
        self._data_open = b""
        self._boundary = b""
        self.upstream_id: str | None = None

    def learn(self, event: bytes, chunk: StreamChunk) -> None:
        """From the first event: the upstream's id, model name and JSON spacing."""
        sep = b": " if b'": ' in event and b'":"' not in event else b":"
        null_finish = b'"finish_reason"' + sep + b"null"
        at = event.rfind(null_finish)
        data_open = b"data: {" if event.startswith(b"data: {") else b"data:{"
        if self._fast and at >= 0 and event.startswith(data_open) and event.endswith(b"}"):
            self._null_finish = null_finish
            self._data_open = data_open
            self._boundary = b"}\n\n" + data_open
            # How far from the end of a chunk its finish_reason may sit (room for a longer
            # stop_reason or token_ids after it than in this chunk).
            self._null_finish_window = len(event) - at + 2 + 96
        if chunk.id is not None:
            self.upstream_id = chunk.id
            if chunk.id != self._response_id:
                self.rewrites.append((_encode(chunk.id), _encode(self._response_id)))
        if chunk.model is not None and chunk.model != self._model:
            self.rewrites.append(
                (b'"model"' + sep + _encode(chunk.model), b'"model"' + sep + _encode(self._model))
            )

    def pass_on(self, part: bytes) -> tuple[EngineOutput | None, bytes]:
        """The buffer's leading in-progress chunks passed on as bytes, and what is left for the
        slow path (empty when nothing is).

        Everything that needs a decision comes at the end of a stream, after the last content
        chunk: the chunk with a ``finish_reason``, the usage-only chunk, ``[DONE]``, and an
        error (a worker ends the stream after it). So the events are checked from the last one
        back, each only in its last few bytes (an in-progress chunk has ``"finish_reason":null``
        there, none of the others has), and the first in-progress one found ends the prefix
        relayed as is: usually the whole buffer at the first check, and at the end of a stream
        two or three steps back. A leading comment sends the whole buffer the slow way, to be
        dropped.
        """
        window = self._null_finish_window
        if not window or part[0] == 58:  # 58 is ":", a comment line
            return None, part
        null_finish = self._null_finish
        size = end = len(part)
        while True:
            # The event part[start:end]: from after the boundary before its own final one.
            start = part.rfind(b"\n\n", 0, end - 2) + 2  # 1 when there is none: see below
            if start == 1:
                start = 0
            lo = end - window
            if part.find(null_finish, lo if lo > start else start, end) >= 0:
                break
            if start == 0:
                return None, part
            end = start
        prefix, rest = (part, b"") if end == size else (part[:end], part[end:])
        # Each event one `data:` line holding an object: see "Events are objects" above.
        if start == 0:
            # One event (a worker's paced stream: a read per event). No boundary can be in it
            # (the walk found no other blank line), so its one line ending at the blank line
            # is what the counts below check: one scan instead of three.
            num_tokens = 1
            if (
                not prefix.startswith(self._data_open)
                or prefix.find(b"\n") != end - 2
                or prefix[-3] != 125  # "}"
            ):
                return None, part
        else:
            # One event is about one token (the exact count comes with the usage at the end).
            num_tokens = prefix.count(b"\n\n")
            if (
                not prefix.startswith(self._data_open)
                or prefix.count(self._boundary) != num_tokens - 1
                or prefix.count(b"\n") != 2 * num_tokens
                or prefix[-3] != 125  # "}"
            ):
                return None, part
        for old, new in self.rewrites:
            prefix = prefix.replace(old, new)
        return EngineOutput(raw=prefix, num_tokens=num_tokens), rest

    def pause(self) -> None:
        """Send every later buffer the slow way (the slow path holds an output back)."""
        self._null_finish_window = 0

    def rewrite(self, raw: bytes) -> bytes:
        """Events the slow path kept, with the upstream's id and model name replaced by ours."""
        for old, new in self.rewrites:
            raw = raw.replace(old, new)
        return raw
