"""``MockerEngine``: the simulated engine behind the :class:`~dynamo_llm.engines.base.Engine` seam.

``generate()`` tokenizes the prompt (a chat request is first rendered with the fixed template of
:func:`.tokens.render_chat`; a completions prompt given as token ids is used as is), checks the
context window and returns the stream. Errors are raised there, before any stream exists. A long
prompt is encoded without holding the event loop (:meth:`.tokens.MockTokenizer.aencode`), so a
prompt near the body limit does not stall the other streams.

The request joins the scheduler's waiting queue when the stream is first iterated, and leaves it
in exactly one place, the stream's ``finally``, whichever way the stream ends: finished, the
context stopped or killed (a context callback aborts it at once), or the consumer gone
(``aclose()`` or a cancelled task). Aborting frees its KV blocks immediately.

On a graceful ``stop()`` the outputs already produced are still delivered, then the stream ends;
on ``kill()`` it ends at once. Either way it ends without a further item: the frontend knows the
context was stopped.

Timing, as a client sees it: with an idle engine, a request whose prompt fits one pass's budget
gets its first token (TTFT) exactly one pass after it is queued, that pass lasting
``prefill(P) + decode(u₁)`` with P the uncached prompt tokens and u₁ the KV utilisation with the
prompt's blocks allocated; every later token comes one decode pass later. A request that arrives
while a pass is in flight waits for it to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ...errors import ContextLengthExceeded, EngineError, InvalidRequest
from ...runtime.clock import Clock, SystemClock
from ...runtime.context import EngineContext
from ..base import EngineOutput, EngineRequest, check_context_length
from .config import MockerConfig
from .kv import BlockPool
from .prompt import prompt_of
from .scheduler import MockerSnapshot, Scheduler
from .sequence import Sequence
from .tokens import MockTokenizer, load_tokenizer


class MockerEngine:
    """A vLLM-like engine simulated in the injected clock's time.

    ``MockerEngine(config=None, *, clock=None)``: defaults are :class:`MockerConfig` defaults and
    the event loop's clock. The scheduler task starts with the first request; ``aclose()`` stops
    it and ends any stream still open with an :class:`~dynamo_llm.errors.EngineError`.
    """

    def __init__(self, config: MockerConfig | None = None, *, clock: Clock | None = None) -> None:
        self.config = config if config is not None else MockerConfig()
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.tokenizer: MockTokenizer = load_tokenizer(self.config.tokenizer)
        self._scheduler = Scheduler(self.config, self.clock)
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def context_length(self) -> int:
        """The context window enforced on requests (prompt + completion tokens)."""
        return self.config.effective_context_length

    @property
    def kv_pool(self) -> BlockPool:
        """The simulated KV cache (:mod:`.events` listens to it)."""
        return self._scheduler.kv

    def snapshot(self) -> MockerSnapshot:
        """Running/waiting counts, KV occupancy, prefix-cache hit rate, preemptions, cancels."""
        return self._scheduler.snapshot()

    def tokenize(self, request: EngineRequest) -> list[int]:
        """The prompt token ids the engine would compute for ``request``."""
        prompt = self._prompt(request)
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt

    async def atokenize(self, request: EngineRequest) -> list[int]:
        """:meth:`tokenize`, yielding to the event loop while a long prompt is encoded."""
        prompt = self._prompt(request)
        return await self.tokenizer.aencode(prompt) if isinstance(prompt, str) else prompt

    def _prompt(self, request: EngineRequest) -> str | list[int]:
        return prompt_of(self.tokenizer, request)

    async def generate(
        self, request: EngineRequest, ctx: EngineContext
    ) -> AsyncIterator[EngineOutput]:
        if self._closed or self._scheduler.failed:
            raise EngineError("The simulated engine is not running")
        prompt_ids = await self.atokenize(request)
        param = "messages" if request.endpoint == "chat_completions" else "prompt"
        if not prompt_ids:
            raise InvalidRequest("The prompt is empty after tokenization", param=param)
        max_tokens = request.max_tokens
        if max_tokens is not None and max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        window = self.context_length
        check_context_length(request.endpoint, len(prompt_ids), max_tokens, window)
        if max_tokens is None:
            max_tokens = window - len(prompt_ids)
            if max_tokens < 1:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {window} tokens, and the prompt "
                    f"uses {len(prompt_ids)} of them, leaving none for the completion.",
                    param=param,
                )
        seed = request.sampling.seed
        seq = Sequence(
            request.id,
            prompt_ids,
            max_tokens=max_tokens,
            seed=self.config.seed if seed is None else int(seed),
            stop=tuple(request.stop),
            tokenizer=self.tokenizer,
            block_size=self.config.block_size,
        )
        if self._task is None:
            self._task = asyncio.create_task(self._scheduler.run(), name="mocker-scheduler")
        return self._stream(seq, ctx)

    async def _stream(self, seq: Sequence, ctx: EngineContext) -> AsyncIterator[EngineOutput]:
        scheduler = self._scheduler
        unregister = None
        try:
            if self._closed:
                raise EngineError("The simulated engine is not running")
            if ctx.is_stopped:
                return
            scheduler.add(seq)
            unregister = ctx.on_stop(lambda _ctx: scheduler.abort(seq))
            channel = seq.channel
            while True:
                item = await channel.get()
                if item is None or ctx.is_killed:
                    return
                yield item
        finally:
            if unregister is not None:
                unregister()
            scheduler.abort(seq)

    async def aclose(self) -> None:
        """Stop the scheduler; streams still open end with an ``EngineError``."""
        self._closed = True
        self._scheduler.fail_all(EngineError("The simulated engine shut down"))
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait() does not raise the task's cancellation, but does propagate our own.
            await asyncio.wait([task])
