"""Cooperative tokenizing: a long text is handled a slice at a time, yielding to the loop between.

The in-process engines tokenize on the event loop. A prompt near the body limit (megabytes of
text, a million words) takes a pure-Python tokenizer hundreds of milliseconds, and while it
runs every other stream of the process stops. :func:`text_slices` cuts such a text into slices
of about :data:`SLICE_CHARS` characters and awaits once between them, so a concurrent stream
waits at most one slice's work (a few milliseconds) at a time.

A cut is made only where the caller's ``boundary`` pattern matches: a position where no token
can span it, so tokenizing slice by slice gives exactly the tokens of the whole text. Texts
shorter than one slice are handed back whole, without awaiting; a :class:`LoopPacer` paces
a run of many short texts (the messages of a long chat) the same way.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator

SLICE_CHARS = 16 * 1024
"""About how many characters are tokenized between two yields to the event loop."""


async def text_slices(
    text: str, boundary: re.Pattern[str], size: int | None = None
) -> AsyncGenerator[str, None]:
    """``text`` in consecutive slices that each end where ``boundary`` matches (or at the end).

    A slice is at least ``size`` characters (default :data:`SLICE_CHARS`; the last may be
    shorter); when ``boundary`` never matches past that, the rest is one slice. Between two
    slices the loop runs once.
    """
    if size is None:
        size = SLICE_CHARS
    n = len(text)
    start = 0
    while start < n:
        end = start + size
        if end >= n:
            end = n
        else:
            cut = boundary.search(text, end)
            end = n if cut is None else cut.start()
        yield text if start == 0 and end == n else text[start:end]
        start = end
        if start < n:
            await asyncio.sleep(0)


class LoopPacer:
    """Yields to the event loop once per :data:`SLICE_CHARS` characters of work reported."""

    __slots__ = ("_chars",)

    def __init__(self) -> None:
        self._chars = 0

    async def advance(self, chars: int) -> None:
        """Count ``chars`` more characters handled; yield if a slice's worth has accumulated."""
        self._chars += chars
        if self._chars >= SLICE_CHARS:
            self._chars = 0
            await asyncio.sleep(0)
