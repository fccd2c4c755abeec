"""Fan-out: one client request served by several engine sub-requests.

A completions batch (a list of prompts) and ``n > 1`` both become sub-requests, one per choice,
with ids ``<id>-<k>`` and choice index ``k = prompt_index * n + i``. Each sub-request has its own
context linked under the request's, so stopping or killing the request reaches every one of them
(Dynamo only watches the first). Their outputs are merged in arrival order; if one fails, the
others are killed and the error is raised. Prompt tokens are counted once per prompt, not once per
choice, so the summed usage matches OpenAI's. A worker's outputs keep its chunks
(``EngineOutput.chunks``): the renderer and the aggregator put them under the output's ``index``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

from ..runtime.context import EngineContext
from ..runtime.tasks import cancel_and_wait
from .base import Engine, EngineOutput, EngineRequest, OwnedStream, aclose_stream

_END = object()


async def open_fanout(
    engine: Engine,
    requests: Sequence[EngineRequest],
    ctx: EngineContext,
    *,
    n: int = 1,
) -> AsyncIterator[EngineOutput]:
    """Admit every sub-request (errors raise here) and return their merged stream."""
    if len(requests) == 1:
        return await engine.generate(requests[0], ctx)
    children: list[EngineContext] = []
    streams: list[AsyncIterator[EngineOutput]] = []
    try:
        for request in requests:
            child = EngineContext(request.id)
            ctx.link_child(child)
            children.append(child)
            streams.append(await engine.generate(request, child))
    except BaseException:
        for child in children:
            child.kill()
        for stream in streams:
            await aclose_stream(stream)
        raise

    async def release() -> None:
        for stream in streams:
            await aclose_stream(stream)
        for child in children:
            ctx.unlink_child(child)

    return OwnedStream(_merge(streams, children, n), release)


async def _merge(
    streams: list[AsyncIterator[EngineOutput]],
    children: list[EngineContext],
    n: int,
) -> AsyncGenerator[EngineOutput, None]:
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def drain(k: int, stream: AsyncIterator[EngineOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((k, out))
        except Exception as exc:
            await queue.put((k, exc))
        else:
            await queue.put((k, _END))

    tasks = [asyncio.create_task(drain(k, s)) for k, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            k, item = await queue.get()
            if item is _END:
                remaining -= 1
                continue
            if isinstance(item, Exception):
                for child in children:
                    child.kill()
                raise item
            assert isinstance(item, EngineOutput)
            item.index = k
            if item.usage is not None and k % n != 0:
                # The prompt is shared by the n choices of one prompt: count it once.
                item.usage = item.usage.without_prompt()
            yield item
    finally:
        for task in tasks:
            await cancel_and_wait(task)
