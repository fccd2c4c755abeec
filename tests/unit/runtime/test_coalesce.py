"""next_or_flush: a burst is written once; nothing is held back while the source waits."""

import asyncio
from collections.abc import AsyncGenerator

import pytest

from dynamo_llm.runtime.coalesce import next_or_flush


class Source:
    """Yields items; before item i it waits on gate[i] when one is set."""

    def __init__(self, items: list[int], gates: dict[int, asyncio.Event] | None = None) -> None:
        self.items = items
        self.gates = gates or {}
        self.closed = False

    async def gen(self) -> AsyncGenerator[int, None]:
        try:
            for i, item in enumerate(self.items):
                gate = self.gates.get(i)
                if gate is not None:
                    await gate.wait()
                yield item
        finally:
            self.closed = True


async def drain(source: Source, log: list[tuple[str, list[int]]]) -> list[int]:
    gen = source.gen()
    out: list[int] = []

    async def flush() -> None:
        log.append(("flush", list(out)))

    while True:
        try:
            out.append(await next_or_flush(gen.__anext__, flush))
        except StopAsyncIteration:
            return out


async def test_items_ready_at_once_are_returned_without_flushing() -> None:
    log: list[tuple[str, list[int]]] = []
    items = await drain(Source([1, 2, 3]), log)
    assert items == [1, 2, 3]
    assert log == []


async def test_flush_happens_before_the_source_waits() -> None:
    gate = asyncio.Event()
    log: list[tuple[str, list[int]]] = []
    task = asyncio.create_task(drain(Source([1, 2, 3], {2: gate}), log))
    for _ in range(5):
        await asyncio.sleep(0)
    assert log == [("flush", [1, 2])], "items received before the wait were written first"
    gate.set()
    async with asyncio.timeout(1):
        assert await task == [1, 2, 3]


async def test_cancellation_while_waiting_reaches_the_source() -> None:
    gate = asyncio.Event()
    source = Source([1, 2], {1: gate})
    task = asyncio.create_task(drain(source, []))
    for _ in range(5):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.closed


async def test_source_errors_propagate_after_a_wait() -> None:
    gate = asyncio.Event()

    async def failing() -> AsyncGenerator[int, None]:
        yield 1
        await gate.wait()
        raise ValueError("boom")

    gen = failing()
    flushed: list[bool] = []

    async def flush() -> None:
        flushed.append(True)

    assert await next_or_flush(gen.__anext__, flush) == 1
    task = asyncio.ensure_future(next_or_flush(gen.__anext__, flush))
    await asyncio.sleep(0)
    gate.set()
    with pytest.raises(ValueError, match="boom"):
        await task
    assert flushed == [True]


async def test_a_failing_flush_closes_the_started_wait_and_propagates() -> None:
    gate = asyncio.Event()
    source = Source([1, 2], {0: gate})
    gen = source.gen()

    async def flush() -> None:
        raise ConnectionResetError("client gone")

    with pytest.raises(ConnectionResetError):
        await next_or_flush(gen.__anext__, flush)
    await gen.aclose()
    assert source.closed


async def test_a_failing_flush_unwinds_a_source_whose_cleanup_awaits() -> None:
    gate = asyncio.Event()
    cleaned = asyncio.Event()
    steps: list[str] = []

    async def source() -> AsyncGenerator[int, None]:
        try:
            await gate.wait()
            yield 1
        finally:
            steps.append("cleanup started")
            await asyncio.sleep(0)  # cleanup that has to wait, like closing a connection
            steps.append("cleanup done")
            cleaned.set()

    gen = source()

    async def flush() -> None:
        raise ConnectionResetError("client gone")

    with pytest.raises(ConnectionResetError):
        await next_or_flush(gen.__anext__, flush)
    assert steps == ["cleanup started", "cleanup done"]
    await gen.aclose()  # not "already running"
