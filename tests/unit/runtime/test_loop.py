import asyncio

import pytest
import uvloop

from dynamo_llm.runtime import loop as event_loop


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def test_the_default_loop_is_uvloop() -> None:
    assert event_loop.LOOPS[0] == "uvloop"
    assert isinstance(event_loop.run(_running_loop()), uvloop.Loop)


def test_asyncio_runs_python_s_own_loop() -> None:
    got = event_loop.run(_running_loop(), "asyncio")
    assert type(got).__module__.startswith("asyncio.")


def test_an_unknown_loop_is_refused_before_anything_runs() -> None:
    coro = _running_loop()
    with pytest.raises(ValueError, match="uvloop"):
        event_loop.run(coro, "trio")
    coro.close()


def test_the_result_comes_back() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert event_loop.run(answer()) == 42
