"""An attempt's time limits (SPEC §4, §8.3): the wait for its first item is the first-token
limit's, the pauses after it the inactivity limit's, and a migration's replay is an attempt like
any other. And how an attempt asks its worker: a unary answer taken whole only from our own
workers, while nothing needs the events.

A replay asks the new worker to prefill the prompt *and every token generated so far*: its first
token may take much longer than any pause between two tokens of a live stream (issue 9: a vLLM
replaying 4 400 tokens on two busy cores sent nothing for over 15 s). The Router runs here over
a scripted worker client on a fake clock that jumps whenever the loop is idle.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
import pytest

from dynamo_llm.engines.base import EngineOutput, EngineRequest
from dynamo_llm.engines.endpoints import COMPLETIONS
from dynamo_llm.errors import WorkerSilent
from dynamo_llm.metrics import Metrics
from dynamo_llm.protocols.completions import decode_completion_request
from dynamo_llm.router.attempt import AttemptLimits
from dynamo_llm.runtime import EngineContext, FakeClock
from tests.unit.router.helpers import MODEL, router_over

SILENT, GOOD = "http://silent", "http://good"
TOKENS = 6
STOPS_AFTER = 2  # tokens the silent worker sends before it falls silent
PREFILL = 5.0  # the replay's wait for its first token: over the inactivity limit of 2 s


class Prefilling:
    """Stands in for WorkerClient: ``SILENT`` sends two tokens and then nothing (SIGSTOPped);
    ``GOOD`` takes ``PREFILL`` seconds of fake time before its first token, then streams."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.first_token_at: list[float] = []

    async def open_stream(
        self, url: str, request: EngineRequest, ctx: EngineContext, **kwargs: Any
    ) -> AsyncGenerator[EngineOutput, None]:
        return self._stream(url, request, ctx)

    async def _stream(
        self, url: str, request: EngineRequest, ctx: EngineContext
    ) -> AsyncGenerator[EngineOutput, None]:
        assert request.max_tokens is not None
        start = TOKENS - request.max_tokens
        if url == GOOD:
            await self.clock.sleep(PREFILL)
            self.first_token_at.append(self.clock.now())
        for k in range(start, TOKENS):
            if url == SILENT and k == STOPS_AFTER:
                await ctx.stopped()  # silent until the attempt is killed
                return
            yield EngineOutput(
                f"t{k} ",
                token_ids=[100 + k],
                prompt_token_ids=[1, 2] if k == 0 else None,
                finish_reason="length" if k == TOKENS - 1 else None,
            )


def completion() -> EngineRequest:
    body = {"model": MODEL, "prompt": "hi", "stream": True, "max_tokens": TOKENS}
    params = decode_completion_request(msgspec.json.encode(body))
    return COMPLETIONS.request(params, "hi", id="r1", model=MODEL, max_tokens=TOKENS)


async def run(limits: AttemptLimits) -> tuple[list[EngineOutput], Prefilling, Metrics, FakeClock]:
    clock = FakeClock()
    client = Prefilling(clock)
    metrics, _, router = router_over(
        client, [SILENT, GOOD], clock, limits=limits, migration_limit=1
    )
    outs: list[EngineOutput] = []
    async with asyncio.timeout(5), clock.autojump():
        stream = await router.generate(completion(), EngineContext("r1"))
        try:
            async for out in stream:
                outs.append(out)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
    return outs, client, metrics, clock


async def test_a_replays_long_prefill_is_waited_for_under_the_first_token_limit() -> None:
    outs, client, metrics, _ = await run(AttemptLimits(inactivity=2, first_token=10))
    assert "".join(o.text for o in outs) == "".join(f"t{k} " for k in range(TOKENS))
    # The silent worker was given up after 2 s of silence, and the replay's first token came
    # 5 s after its dispatch: more than the inactivity limit, within the first-token limit.
    assert client.first_token_at == [pytest.approx(2.0 + PREFILL)]
    assert metrics.model_migration_total.labels(MODEL, "ongoing_request").value == 1


async def test_without_a_first_token_limit_the_inactivity_limit_bounds_the_replays_wait() -> None:
    with pytest.raises(WorkerSilent, match="sent nothing for 2 s"):
        await run(AttemptLimits(inactivity=2))


# --- a unary answer taken whole, from our own workers only ------------------------------------


class Opening:
    """Stands in for WorkerClient: records which way each request was asked of the worker."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def open_stream(
        self, url: str, request: EngineRequest, ctx: EngineContext, **kwargs: Any
    ) -> AsyncGenerator[EngineOutput, None]:
        self.calls.append("stream")
        return self._one(EngineOutput("t0", finish_reason="stop"))

    async def open_answer(
        self, url: str, request: EngineRequest, ctx: EngineContext, **kwargs: Any
    ) -> AsyncGenerator[EngineOutput, None]:
        self.calls.append("answer")
        return self._one(EngineOutput(finish_reason="stop", response=b'{"choices": []}'))

    async def _one(self, out: EngineOutput) -> AsyncGenerator[EngineOutput, None]:
        yield out


def unary_completion(*, stream: bool = False) -> EngineRequest:
    body = {"model": MODEL, "prompt": "hi", "stream": stream, "max_tokens": 1}
    params = decode_completion_request(msgspec.json.encode(body))
    return COMPLETIONS.request(params, "hi", id="u1", model=MODEL, max_tokens=1)


@pytest.mark.parametrize(
    ("ours", "stream", "limits", "migration_limit", "asked"),
    [
        (True, False, AttemptLimits(), 0, "answer"),
        # A real engine keeps generating a unary answer after a hang-up: always a stream.
        (False, False, AttemptLimits(), 0, "stream"),
        (True, True, AttemptLimits(), 0, "stream"),
        (True, False, AttemptLimits(), 1, "stream"),
        (True, False, AttemptLimits(inactivity=30), 0, "stream"),
        (True, False, AttemptLimits(first_token=30), 0, "stream"),
    ],
    ids=["ours", "foreign", "streaming", "migration", "inactivity-limit", "first-token-limit"],
)
async def test_only_our_own_workers_are_asked_for_a_whole_answer_while_nothing_needs_events(
    ours: bool, stream: bool, limits: AttemptLimits, migration_limit: int, asked: str
) -> None:
    clock = FakeClock()
    client = Opening()
    _, _, router = router_over(
        client, [GOOD], clock, limits=limits, migration_limit=migration_limit, ours=ours
    )
    async with asyncio.timeout(5):
        outs = [
            out
            async for out in await router.generate(
                unary_completion(stream=stream), EngineContext("u1")
            )
        ]
    assert client.calls == [asked]
    assert (outs[-1].response is not None) == (asked == "answer")
