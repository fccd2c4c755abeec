"""The fake clock: sleeps wake at exact simulated times, and autojump runs them at once."""

import asyncio

from dynamo_llm.runtime import FakeClock


async def test_fake_clock_sleep_and_autojump_are_exact() -> None:
    clock = FakeClock()
    woke: list[tuple[float, float]] = []

    async def sleeper(d: float) -> None:
        await clock.sleep(d)
        woke.append((d, clock.now()))

    async with asyncio.timeout(5), clock.autojump():
        await asyncio.gather(sleeper(3), sleeper(1), sleeper(2))
    assert woke == [(1, 1), (2, 2), (3, 3)]
