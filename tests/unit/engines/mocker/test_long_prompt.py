"""A long prompt to the mocker: the same ids and usage as tokenizing it whole, and the event
loop keeps serving other tasks while it is encoded."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from dynamo_llm.engines.mocker import MockerConfig, MockerEngine
from dynamo_llm.engines.mocker.sequence import Sequence
from dynamo_llm.engines.mocker.tokens import WordTokenizer, render_chat
from dynamo_llm.runtime import EngineContext, FakeClock
from tests.unit.engines.helpers import long_text, loop_turns_during
from tests.unit.engines.mocker.test_tokens import (
    SENTENCES,
    chat,
    completion,
    message,
    run,
    train_word_level,
)

BIG = MockerConfig(context_length=1 << 20, num_gpu_blocks=1 << 15, block_size=64)


def tokenizer_config(tmp_path: Path) -> MockerConfig:
    path = tmp_path / "tokenizer.json"
    train_word_level(path)
    return MockerConfig(tokenizer=str(path), context_length=1 << 20, num_gpu_blocks=1 << 15)


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
    config = BIG if tokenizer == "words" else tokenizer_config(tmp_path)
    engine = MockerEngine(config, clock=FakeClock())
    request = chat([message("user", long_text(400_000, seed=4))], 1)
    try:
        _, turns = await loop_turns_during(engine.generate(request, EngineContext()))
    finally:
        await engine.aclose()
    # The word tokenizer yields between slices; a tokenizer.json encodes in a thread.
    assert turns >= (5 if tokenizer == "words" else 1)


def test_block_hashes_one_at_a_time_are_the_chained_block_hashes() -> None:
    def sequence() -> Sequence:
        return Sequence(
            "r", list(range(1000)), max_tokens=1, seed=0, stop=(), tokenizer=WordTokenizer(),
            block_size=16,
        )  # fmt: skip

    lazy, whole = sequence(), sequence()
    first = list(itertools.islice(lazy.iter_block_hashes(62), 3))
    assert first == whole.block_hashes(3)
    assert list(lazy.iter_block_hashes(62)) == whole.block_hashes(62)
