"""A scriptable engine for tests that records what it was asked and when it saw stop/kill.

Like httpx's ``MockTransport``: the frontend under test talks to it through the real engine
protocol, and the test asserts on the engine's own record (``FakeCall``), not on the frontend's
code path. Times in the record are ``time.perf_counter()`` seconds, so real-socket tests can
measure how long after a hang-up the engine learned of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from ..engines.base import EngineOutput, EngineRequest, Usage
from ..errors import DynamoError
from ..runtime.clock import Clock, SystemClock
from ..runtime.context import EngineContext


class FakeCall:
    """One ``generate()`` call as the engine saw it."""

    def __init__(self, request: EngineRequest, ctx: EngineContext) -> None:
        self.request = request
        self.ctx = ctx
        self.started_at = time.perf_counter()
        self.stopped_at: float | None = None
        self.killed_at: float | None = None
        self.closed_at: float | None = None
        self.tokens_sent = 0
        self.waiting = asyncio.Event()  # set while the engine waits (a gap or a hang)
        self.stopped = asyncio.Event()
        self.killed = asyncio.Event()
        self.closed = asyncio.Event()  # the stream was finished or abandoned
        ctx.on_stop(self._on_stop)

    def _on_stop(self, ctx: EngineContext) -> None:
        now = time.perf_counter()
        if self.stopped_at is None:
            self.stopped_at = now
            self.stopped.set()
        if ctx.is_killed and self.killed_at is None:
            self.killed_at = now
            self.killed.set()


class FakeEngine:
    """Streams ``tokens`` with optional gaps, hangs, failures and admission errors.

    - ``gap``: seconds (on the injected clock) before each token; ``gaps`` per token overrides.
    - ``hang_after``: after that many tokens, wait forever (until stopped, or truly forever when
      ``honour_cancel`` is False: a zombie).
    - ``fail_after`` / ``error``: raise ``error`` after that many tokens.
    - ``admission_error``: raise it from ``generate()`` (before any output exists).
    """

    def __init__(
        self,
        tokens: Sequence[str] = ("Hello", ",", " world", "!"),
        *,
        clock: Clock | None = None,
        gap: float = 0.0,
        gaps: Sequence[float] | None = None,
        hang_after: int | None = None,
        honour_cancel: bool = True,
        fail_after: int | None = None,
        error: Exception | None = None,
        admission_error: DynamoError | None = None,
        prompt_tokens: int = 3,
    ) -> None:
        self.tokens = list(tokens)
        self.clock = clock or SystemClock()
        self.gap = gap
        self.gaps = list(gaps) if gaps is not None else None
        self.hang_after = hang_after
        self.honour_cancel = honour_cancel
        self.fail_after = fail_after
        self.error = error
        self.admission_error = admission_error
        self.prompt_tokens = prompt_tokens
        self.calls: list[FakeCall] = []
        self.called = asyncio.Event()
        self.closed = False

    @property
    def last(self) -> FakeCall:
        return self.calls[-1]

    async def generate(
        self, request: EngineRequest, ctx: EngineContext
    ) -> AsyncIterator[EngineOutput]:
        call = FakeCall(request, ctx)
        self.calls.append(call)
        self.called.set()
        if self.admission_error is not None:
            raise self.admission_error
        return self._stream(call)

    async def _wait(self, call: FakeCall, seconds: float | None) -> None:
        call.waiting.set()
        try:
            if seconds is None:
                if self.honour_cancel:
                    await call.ctx.stopped()
                else:
                    await asyncio.Event().wait()
            elif seconds > 0:
                await self.clock.sleep(seconds)
        finally:
            call.waiting.clear()

    async def _stream(self, call: FakeCall) -> AsyncIterator[EngineOutput]:
        ctx = call.ctx
        try:
            count = len(self.tokens)
            for i, token in enumerate(self.tokens):
                if self.hang_after is not None and i == self.hang_after:
                    await self._wait(call, None)
                if self.fail_after is not None and i == self.fail_after:
                    raise self.error or RuntimeError("fake engine failure")
                gap = self.gaps[i] if self.gaps is not None and i < len(self.gaps) else self.gap
                if gap:
                    await self._wait(call, gap)
                if ctx.is_stopped and self.honour_cancel:
                    return
                last = i == count - 1
                call.tokens_sent += 1
                yield EngineOutput(
                    token,
                    1,
                    prompt_tokens=self.prompt_tokens if i == 0 else None,
                    finish_reason="stop" if last else None,
                    usage=Usage(self.prompt_tokens, count, 0) if last else None,
                )
            if self.hang_after is not None and self.hang_after >= count:
                await self._wait(call, None)
            if self.fail_after is not None and self.fail_after >= count:
                raise self.error or RuntimeError("fake engine failure")
        finally:
            call.closed_at = time.perf_counter()
            call.closed.set()

    async def aclose(self) -> None:
        self.closed = True
