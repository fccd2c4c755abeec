"""Shared by the mocker's tests: SPEC §10's timing formulas (written out here, independently of
the engine's own timing module), a completion request of token ids, and a safety net that runs
a block in autojumping simulated time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from dynamo_llm.engines.base import EngineRequest
from dynamo_llm.engines.endpoints import COMPLETIONS
from dynamo_llm.protocols.completions import CompletionRequest
from dynamo_llm.runtime import FakeClock


def prefill_s(tokens: int) -> float:
    if tokens == 0:
        return 0.0
    return (4.209989e-7 * tokens**2 + 1.518344e-2 * tokens + 16.50142) / 1000


def decode_s(used_blocks: int, total_blocks: int) -> float:
    u = used_blocks / total_blocks
    return max(1.0, -25.74 * u**2 + 54.01 * u + 5.74) / 1000


def completion(rid: str, prompt: list[int], max_tokens: int) -> EngineRequest:
    params = CompletionRequest(model="mock", prompt=list[str | int | list[int]](prompt))
    return COMPLETIONS.request(params, prompt, id=rid, model="mock", max_tokens=max_tokens)


@contextlib.asynccontextmanager
async def simulated(clock: FakeClock) -> AsyncIterator[None]:
    async with asyncio.timeout(5) as net, clock.autojump():
        yield
    assert not net.expired()
