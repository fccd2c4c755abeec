"""The echo engine's tokens: sliced tokenizing of long prompts gives exactly today's tokens."""

from __future__ import annotations

import pytest

from dynamo_llm.engines.base import EngineOutput, EngineRequest
from dynamo_llm.engines.echo import (
    EchoEngine,
    count_echo_tokens,
    echo_prompt,
    echo_tokens,
    prompt_tokens_of,
)
from dynamo_llm.engines.endpoints import CHAT, COMPLETIONS
from dynamo_llm.protocols.chat import ChatCompletionRequest, ChatMessage
from dynamo_llm.protocols.completions import CompletionRequest
from dynamo_llm.runtime import EngineContext, FakeClock
from tests.unit.engines.helpers import long_text, loop_turns_during


def completion(prompt: str, max_tokens: int | None) -> EngineRequest:
    params = CompletionRequest(model="echo", prompt=prompt)
    return COMPLETIONS.request(params, prompt, id="r", model="echo", max_tokens=max_tokens)


def chat(texts: list[str], max_tokens: int | None) -> EngineRequest:
    messages = [ChatMessage(role="user", content=t) for t in texts]
    params = ChatCompletionRequest(model="echo", messages=messages)
    return CHAT.request(params, id="r", model="echo", max_tokens=max_tokens)


@pytest.mark.parametrize("text", ["", " ", "a", " a", "a ", "a b\n", "\u00a0a\u2003b \n\n", " \t"])
def test_counting_agrees_with_the_tokens(text: str) -> None:
    assert count_echo_tokens(text) == len(echo_tokens(text))


@pytest.mark.parametrize("max_tokens", [None, 0, 1, 1000, 40_000])
async def test_a_long_prompt_sliced_gives_the_same_tokens_and_count(max_tokens: int | None) -> None:
    text = long_text(300_000, seed=1) + "  \n"
    for request in (completion(text, max_tokens), chat([text[:1000], text], max_tokens)):
        expected, count = prompt_tokens_of(request)
        tokens, counted = await echo_prompt(request)
        assert counted == count
        if max_tokens is None:
            assert tokens == expected
        else:
            assert tokens == expected[: max_tokens + 1]


async def test_the_loop_runs_while_a_long_prompt_is_tokenized() -> None:
    text = long_text(400_000, seed=2)
    engine = EchoEngine(FakeClock(), delay_ms=0)
    stream, turns = await loop_turns_during(engine.generate(completion(text, 3), EngineContext()))
    assert turns >= 5
    outs: list[EngineOutput] = [out async for out in stream]
    assert "".join(o.text for o in outs) == "".join(echo_tokens(text)[:3])
    assert outs[-1].usage is not None and outs[-1].usage.prompt_tokens == len(echo_tokens(text))


async def test_the_loop_runs_while_many_short_messages_are_counted() -> None:
    texts = [long_text(5_000, seed=i) for i in range(100)]
    engine = EchoEngine(FakeClock(), delay_ms=0)
    stream, turns = await loop_turns_during(engine.generate(chat(texts, 1), EngineContext()))
    assert turns >= 5
    outs = [out async for out in stream]
    assert outs[-1].usage is not None
    assert outs[-1].usage.prompt_tokens == sum(len(echo_tokens(t)) for t in texts)
