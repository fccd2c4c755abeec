"""What the raw relay passed on while its request may still migrate (SPEC §9).

With migration on, a streaming request is still relayed as the worker's own bytes (the hot path
parses nothing), but the worker is asked for token ids, so that a replay can be token-exact. The
bytes of the first attempt go to the client without those ids (:func:`strip_token_ids`, unless
the client asked for them itself) and into a :class:`ReplayBuffer`, unparsed: only a request that
migrates pays for parsing them (:meth:`ReplayBuffer.drain`), to learn the text and the token ids
its replay continues.

The ids make the relay's token count exact too, for nearly nothing: the relay counts one token per
event, and an engine that packs several tokens into one event (vLLM, on a busy machine) lists them
all. Stripping the lists (:func:`strip_token_ids`) also counts their ids, so a relayed output
says how many tokens it carried, and the inter-token latency is observed per token (SPEC §6),
not per event. Only the compact spelling (``"token_ids":[...]``, as vLLM and our worker write it)
is counted; any other leaves the count at one per event, corrected by the final usage.
"""

from __future__ import annotations

import re

from ..errors import DynamoError
from ..transport.events import decode_chunk, split_event

__all__ = ["ReplayBuffer", "mentions_tool_call", "strip_token_ids"]


class ReplayBuffer:
    """A first attempt's relayed bytes, in the stream's order, parsed only if it migrates."""

    __slots__ = ("_raws", "tokens")

    def __init__(self) -> None:
        self._raws: list[bytes] = []
        self.tokens = 0
        """The tokens counted for the kept bytes before they were parsed."""

    def __bool__(self) -> bool:
        return bool(self._raws)

    def keep(self, raw: bytes, tokens: int) -> None:
        self._raws.append(raw)
        self.tokens += tokens

    def drain(self) -> list[tuple[str | None, list[int] | None]]:
        """Each kept event's text and token ids, in order (events with neither left out); the
        buffer is empty afterwards."""
        raws, self._raws = self._raws, []
        self.tokens = 0
        pieces: list[tuple[str | None, list[int] | None]] = []
        for raw in raws:
            for event in raw.split(b"\n\n"):
                if not event:
                    continue
                try:
                    chunk = decode_chunk(*split_event(event))
                except DynamoError:
                    chunk = None
                if chunk is None or not chunk.choices:
                    continue
                choice = chunk.choices[0]
                text = choice.delta.content if choice.delta is not None else choice.text
                ids = choice.token_ids
                if ids or text:
                    pieces.append((text, ids))
        return pieces


_TOOL_CALL_MARKS = (b'"tool_calls":[{', b'"tool_calls": [{')


def mentions_tool_call(raw: bytes) -> bool:
    """A worker's events hold a tool call (its first delta, in either spacing)."""
    return any(mark in raw for mark in _TOOL_CALL_MARKS)


# A key "token_ids" or "prompt_token_ids" with its list (or null), and the comma joining it to its
# neighbour. Inside a JSON string a quote is escaped, so these bytes are always a key. The usual
# compact spelling first: a literal prefix lets the regex engine skip ahead (1.8 us for six
# 230-byte events, where the general pattern, tried at every comma, takes 20).
_IDS = re.compile(rb'(,"token_ids":(?:\[[^\]]*\]|null))')  # captured: split() keeps the lists
_PROMPT_IDS = re.compile(rb',"prompt_token_ids":(?:\[[^\]]*\]|null)')
_ANY_IDS = re.compile(
    rb'(?:,\s*"(?:prompt_)?token_ids"\s*:\s*(?:\[[^\]]*\]|null))'
    rb'|(?:"(?:prompt_)?token_ids"\s*:\s*(?:\[[^\]]*\]|null)\s*,)'
)


def strip_token_ids(raw: bytes) -> tuple[bytes, int]:
    """A worker's events without the token ids the frontend asked for only for a replay, and how
    many more tokens than one per event their lists held (a packed event's extra tokens)."""
    if b"token_ids" not in raw:
        return raw, 0
    extra = 0
    parts = _IDS.split(raw)
    if len(parts) > 1:
        # Each list is `,"token_ids":[a,b,c]`: as many commas as ids, so its commas less one are
        # the tokens it holds beyond the one the relay counted (0 for one id, `[]` or null).
        lists = b"".join(parts[1::2])
        extra = lists.count(b",") - (len(parts) >> 1)
        raw = b"".join(parts[::2])
    if b"prompt_token_ids" in raw:
        raw = _PROMPT_IDS.sub(b"", raw)
    if b"token_ids" in raw:  # another spelling (or the words in a text: then nothing matches)
        raw = _ANY_IDS.sub(b"", raw)
    return raw, extra
