"""Cooperative tokenizing: slices cut only at boundaries, the loop runs between them."""

from __future__ import annotations

import asyncio
import random
import re

from dynamo_llm.engines.slices import SLICE_CHARS, text_slices

# Unicode whitespace of several kinds, words, punctuation: cuts land on all of them.
ALPHABET = ["lorem", "ipsum", "dolor", ",", ".", "<|im_end|>", "\u00e9t\u00e9", " ", "  ", "\n"]
ALPHABET += ["\t", "\u00a0", "\u2003", "\r\n"]


def long_text(size: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < size:
        parts.append(rng.choice(ALPHABET))
        total += len(parts[-1])
    return "".join(parts)


async def collect_with_loop_turns(text: str, boundary: re.Pattern[str]) -> tuple[list[str], int]:
    turns = 0
    done = False

    async def other_task() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other_task())
    await asyncio.sleep(0)
    before = turns
    pieces = [piece async for piece in text_slices(text, boundary)]
    done = True
    await task
    return pieces, turns - before


async def test_slices_join_back_to_the_text_and_end_where_the_boundary_matches() -> None:
    text = long_text(5 * SLICE_CHARS + 123)
    boundary = re.compile(r"(?<=\S)\s")
    pieces, turns = await collect_with_loop_turns(text, boundary)
    assert "".join(pieces) == text
    assert len(pieces) >= 5
    for piece in pieces[:-1]:
        assert len(piece) >= SLICE_CHARS and not piece[-1].isspace()
    for piece in pieces[1:]:
        assert piece[0].isspace()
    # Another task ran between every two slices.
    assert turns >= len(pieces) - 1


async def test_a_short_text_is_one_slice_without_yielding() -> None:
    pieces, turns = await collect_with_loop_turns("a short prompt", re.compile(r"\s"))
    assert pieces == ["a short prompt"]
    assert turns == 0


async def test_a_text_without_a_boundary_past_the_slice_size_is_one_slice() -> None:
    text = "x" * (3 * SLICE_CHARS)
    pieces, _ = await collect_with_loop_turns(text, re.compile(r"\s"))
    assert pieces == [text]
