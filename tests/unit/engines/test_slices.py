"""Cooperative tokenizing: slices cut only at boundaries, the loop runs between them."""

from __future__ import annotations

import re

from dynamo_llm.engines.slices import SLICE_CHARS, text_slices
from tests.unit.engines.helpers import long_text, loop_turns_during


async def collect(text: str, boundary: re.Pattern[str]) -> list[str]:
    return [piece async for piece in text_slices(text, boundary)]


async def test_slices_join_back_to_the_text_and_end_where_the_boundary_matches() -> None:
    text = long_text(5 * SLICE_CHARS + 123)
    boundary = re.compile(r"(?<=\S)\s")
    pieces, turns = await loop_turns_during(collect(text, boundary))
    assert "".join(pieces) == text
    assert len(pieces) >= 5
    for piece in pieces[:-1]:
        assert len(piece) >= SLICE_CHARS and not piece[-1].isspace()
    for piece in pieces[1:]:
        assert piece[0].isspace()
    # Another task ran between every two slices.
    assert turns >= len(pieces) - 1


async def test_a_short_text_is_one_slice_without_yielding() -> None:
    pieces, turns = await loop_turns_during(collect("a short prompt", re.compile(r"\s")))
    assert pieces == ["a short prompt"]
    assert turns == 0


async def test_a_text_without_a_boundary_past_the_slice_size_is_one_slice() -> None:
    text = "x" * (3 * SLICE_CHARS)
    pieces, _ = await loop_turns_during(collect(text, re.compile(r"\s")))
    assert pieces == [text]
