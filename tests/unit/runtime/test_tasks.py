import asyncio
import gc
from typing import Any

from dynamo_llm.runtime.tasks import cancel_and_wait


async def test_a_task_that_failed_before_it_was_cancelled_is_not_logged_as_never_retrieved() -> (
    None
):
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:

        async def fail() -> None:
            raise RuntimeError("the worker timed out")

        task = asyncio.ensure_future(fail())
        await asyncio.wait([task])  # it has failed; nobody has looked at its error yet
        await cancel_and_wait(task)
        del task
        gc.collect()
    finally:
        loop.set_exception_handler(old)
    assert reported == []


async def test_a_running_task_is_cancelled_and_its_cleanup_has_run() -> None:
    cleaned = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    task = asyncio.ensure_future(work())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled()
    assert cleaned.is_set()
