"""Helpers for the engines' tests of long prompts: a long varied text, and a count of the event
loop's turns taken by another task while an awaitable runs."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

# Unicode whitespace of several kinds, words, punctuation: slice cuts land on all of them.
ALPHABET = ["lorem", "ipsum", "dolor", ",", ".", "<|im_end|>", "\u00e9t\u00e9", " ", "  ", "\n"]
ALPHABET += ["\t", "\u00a0", "\u2003", "\r\n"]


def long_text(size: int, seed: int = 0) -> str:
    """About ``size`` characters of words, punctuation and whitespace, the same for a seed."""
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < size:
        parts.append(rng.choice(ALPHABET))
        total += len(parts[-1])
    return "".join(parts)


async def loop_turns_during(work: Awaitable[T]) -> tuple[T, int]:
    """``work``'s result, and how many times another task ran while it was awaited.

    An ordering check, not a timing one: work that never yields to the loop gives 0.
    """
    turns = 0
    done = False

    async def other_stream() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other_stream())
    await asyncio.sleep(0)  # the other task is running
    before = turns
    try:
        result = await work
    finally:
        done = True
        await task
    return result, turns - before
