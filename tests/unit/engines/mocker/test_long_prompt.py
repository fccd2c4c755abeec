"""A long prompt to the mocker: the same ids and usage as tokenizing it whole, and the event
loop keeps serving other tasks while it is encoded."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from dynamo_llm.engines.base import EngineRequest
from dynamo_llm.engines.mocker import MockerConfig, MockerEngine
from dynamo_llm.engines.mocker.tokens import render_chat
from dynamo_llm.errors import ContextLengthExceeded
from dynamo_llm.runtime import EngineContext, FakeClock
from tests.unit.engines.mocker.test_tokens import (
    SENTENCES,
    chat,
    completion,
    message,
    run,
    train_word_level,
)
from tests.unit.engines.test_slices import long_text

BIG = MockerConfig(context_length=1 << 20, num_gpu_blocks=1 << 15, block_size=64)


def tokenizer_config(tmp_path: Path) -> MockerConfig:
    path = tmp_path / "tokenizer.json"
    train_word_level(path)
    return MockerConfig(tokenizer=str(path), context_length=1 << 20, num_gpu_blocks=1 << 15)


async def loop_turns_while_tokenizing(engine: MockerEngine, request: EngineRequest) -> int:
    events: list[str] = []
    done = asyncio.Event()

    async def other_stream() -> None:
        while not done.is_set():
            events.append("other")
            await asyncio.sleep(0)

    task = asyncio.create_task(other_stream())
    await asyncio.sleep(0)
    events.append("generate")
    # The default window rejects the prompt, but only once it is tokenized and counted.
    with contextlib.suppress(ContextLengthExceeded):
        await engine.generate(request, EngineContext(request.id))
    events.append("tokenized")
    done.set()
    await task
    return events[events.index("generate") : events.index("tokenized")].count("other")


@pytest.mark.parametrize("tokenizer", ["words", "file"])
async def test_a_long_prompt_gives_the_ids_and_usage_of_tokenizing_it_whole(
    tokenizer: str, tmp_path: Path
) -> None:
    config = BIG if tokenizer == "words" else tokenizer_config(tmp_path)
    text = " ".join(SENTENCES) + " " + long_text(200_000, seed=3)
    engine = MockerEngine(config, clock=FakeClock())
    for request in (completion(text, 4), chat([message("user", text)], 4)):
        assert await engine.atokenize(request) == engine.tokenize(request)
    await engine.aclose()
    whole = engine.tokenizer.encode(render_chat([message("user", text)]))
    outs = await run(chat([message("user", text)], 4), config)
    assert outs[0].prompt_tokens == len(whole)
    assert outs[-1].usage is not None and outs[-1].usage.prompt_tokens == len(whole)


@pytest.mark.parametrize("tokenizer", ["words", "file"])
async def test_other_tasks_run_while_a_long_prompt_is_tokenized(
    tokenizer: str, tmp_path: Path
) -> None:
    config = MockerConfig() if tokenizer == "words" else tokenizer_config(tmp_path)
    engine = MockerEngine(config, clock=FakeClock())
    try:
        turns = await loop_turns_while_tokenizing(
            engine, chat([message("user", long_text(400_000, seed=4))], 1)
        )
    finally:
        await engine.aclose()
    assert turns >= (5 if tokenizer == "words" else 1)
