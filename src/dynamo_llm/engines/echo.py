"""The echo engine: streams the prompt back, one whitespace-delimited token at a time.

It is the smallest real engine: it honours ``max_tokens``, the context window, the injected
clock (``DYN_TOKEN_ECHO_DELAY_MS`` between tokens, default 10) and its context, stopping within
one token when the request is stopped or killed. Tests and benchmarks use it to exercise the
frontend without a simulated scheduler in the way.

A long prompt is tokenized on the event loop a slice at a time (:mod:`.slices`): its tokens are
counted with ``str.split`` per slice, and only the tokens to be echoed (at most ``max_tokens``)
are built, so a prompt near the body limit does not stall the other streams.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import aclosing

from ..protocols.chat import content_text
from ..runtime.clock import Clock
from ..runtime.context import EngineContext
from .base import EngineOutput, EngineRequest, Usage, check_context_length
from .slices import LoopPacer, text_slices

_TOKEN = re.compile(r"\s*\S+|\s+$")
# Where a token starts: whitespace after a non-space. Slices cut there tokenize as the whole.
_TOKEN_START = re.compile(r"(?<=\S)\s")


def echo_tokens(text: str) -> list[str]:
    """Split text into tokens that join back to it: each word with the spaces before it."""
    return _TOKEN.findall(text)


def count_echo_tokens(text: str) -> int:
    """``len(echo_tokens(text))``, without building the tokens: one per word, plus trailing space.

    (``str.split`` and the regex ``\\s`` agree on what whitespace is: both use ``str.isspace``.)
    """
    return len(text.split()) + (1 if text[-1:].isspace() else 0)


async def _count_tokens(text: str) -> int:
    count = 0
    async for piece in text_slices(text, _TOKEN_START):
        count += count_echo_tokens(piece)
    return count


async def _first_tokens(text: str, limit: int | None) -> list[str]:
    # One token past the limit, when there is one, so the caller sees the echo was cut short.
    tokens: list[str] = []
    async with aclosing(text_slices(text, _TOKEN_START)) as pieces:
        async for piece in pieces:
            tokens += echo_tokens(piece)
            if limit is not None and len(tokens) > limit:
                return tokens[: limit + 1]
    return tokens


async def echo_prompt(request: EngineRequest) -> tuple[list[str], int]:
    """What :func:`prompt_tokens_of` returns, the tokens cut to one past ``max_tokens``.

    Long texts are tokenized a slice at a time, yielding to the event loop in between.
    """
    limit = request.max_tokens
    if request.endpoint == "completions":
        prompt = request.prompt
        if isinstance(prompt, list):
            return prompt_tokens_of(request)
        text = prompt or ""
        return await _first_tokens(text, limit), await _count_tokens(text)
    messages = request.messages
    if not messages:
        return [], 0
    counted = 0
    pacer = LoopPacer()  # many short messages add up to a long prompt too
    for message in messages:
        text = content_text(message.content, "")
        counted += await _count_tokens(text)
        await pacer.advance(len(text))
    return await _first_tokens(content_text(messages[-1].content, ""), limit), counted


def prompt_tokens_of(request: EngineRequest) -> tuple[list[str], int]:
    """The tokens to echo back, and the prompt's token count (each text tokenized once)."""
    if request.endpoint == "completions":
        prompt = request.prompt
        if isinstance(prompt, list):
            return [f" {t}" if i else str(t) for i, t in enumerate(prompt)], len(prompt)
        tokens = echo_tokens(prompt or "")
        return tokens, len(tokens)
    messages = request.messages
    if not messages:
        return [], 0
    last = echo_tokens(content_text(messages[-1].content, ""))
    counted = len(last) + sum(len(echo_tokens(content_text(m.content, ""))) for m in messages[:-1])
    return last, counted


class EchoEngine:
    """Echoes the prompt (completions) or the last message (chat) back token by token."""

    def __init__(
        self, clock: Clock, *, delay_ms: float = 10.0, context_length: int | None = None
    ) -> None:
        self._clock = clock
        self._delay = max(0.0, delay_ms) / 1000.0
        self.context_length = context_length

    async def generate(
        self, request: EngineRequest, ctx: EngineContext
    ) -> AsyncIterator[EngineOutput]:
        tokens, prompt_tokens = await echo_prompt(request)
        check_context_length(
            request.endpoint, prompt_tokens, request.max_tokens, self.context_length
        )
        finish = "stop"
        if request.max_tokens is not None and len(tokens) > request.max_tokens:
            tokens = tokens[: request.max_tokens]
            finish = "length"
        return self._stream(tokens, prompt_tokens, finish, ctx)

    async def _stream(
        self, tokens: list[str], prompt_tokens: int, finish: str, ctx: EngineContext
    ) -> AsyncIterator[EngineOutput]:
        delay = self._delay
        sleep = self._clock.sleep
        last = len(tokens) - 1
        if last < 0:
            yield EngineOutput(
                "",
                0,
                finish_reason=finish,
                usage=Usage(prompt_tokens, 0, 0),
                prompt_tokens=prompt_tokens,
            )
            return
        for i, token in enumerate(tokens):
            if delay:
                await sleep(delay)
            if ctx.state:  # stopped or killed (LIVE is 0)
                return
            if i == last:
                yield EngineOutput(
                    token,
                    1,
                    finish_reason=finish,
                    usage=Usage(prompt_tokens, i + 1, 0),
                    prompt_tokens=prompt_tokens if i == 0 else None,
                )
            elif i == 0:
                yield EngineOutput(token, 1, prompt_tokens=prompt_tokens)
            else:
                yield EngineOutput(token)

    async def aclose(self) -> None:
        return None
