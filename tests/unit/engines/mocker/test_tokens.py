"""The mocker as a deterministic language model: tokens, text, stop strings, finish reasons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from dynamo_llm.engines.base import EngineOutput, EngineRequest
from dynamo_llm.engines.endpoints import CHAT, COMPLETIONS
from dynamo_llm.engines.mocker import MockerConfig, MockerEngine
from dynamo_llm.engines.mocker.sequence import StopMatcher
from dynamo_llm.engines.mocker.tokens import render_chat
from dynamo_llm.errors import ContextLengthExceeded, InvalidRequest
from dynamo_llm.protocols.chat import ChatCompletionRequest, ChatMessage
from dynamo_llm.protocols.completions import CompletionRequest
from dynamo_llm.runtime import EngineContext, FakeClock
from tests.unit.engines.mocker.helpers import simulated

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a simulated engine answers like a real deployment on a laptop",
    "prefix caching makes the second request faster than the first",
    "every request is tied to an engine context whose cancellation reaches the engine",
]


def completion(
    prompt: str | list[int],
    max_tokens: int | None = 8,
    *,
    stop: tuple[str, ...] = (),
    seed: int | None = None,
) -> EngineRequest:
    params = CompletionRequest(
        model="mock",
        prompt=prompt if isinstance(prompt, str) else list[str | int | list[int]](prompt),
        seed=seed,
        stop=list(stop) or None,
    )
    return COMPLETIONS.request(params, prompt, id="r", model="mock", max_tokens=max_tokens)


def chat(messages: list[Any], max_tokens: int = 8, seed: int | None = None) -> EngineRequest:
    params = ChatCompletionRequest(model="mock", messages=messages, seed=seed)
    return CHAT.request(params, id="r", model="mock", max_tokens=max_tokens)


def message(role: str, content: Any) -> ChatMessage:
    return ChatMessage(role=role, content=content)


async def run(req: EngineRequest, config: MockerConfig | None = None) -> list[EngineOutput]:
    clock = FakeClock()
    engine = MockerEngine(config or MockerConfig(), clock=clock)
    try:
        async with simulated(clock):
            stream = await engine.generate(req, EngineContext(req.id))
            return [out async for out in stream]
    finally:
        await engine.aclose()


def ids(outs: list[EngineOutput]) -> list[int]:
    return [t for o in outs for t in (o.token_ids or [])]


def text(outs: list[EngineOutput]) -> str:
    return "".join(o.text for o in outs)


# ---- determinism ------------------------------------------------------------------------------


async def test_same_prompt_and_seed_give_the_same_tokens() -> None:
    first = await run(completion("hello there, mocker", 12, seed=7))
    second = await run(completion("hello there, mocker", 12, seed=7))
    other_seed = await run(completion("hello there, mocker", 12, seed=8))
    assert ids(first) == ids(second)
    assert text(first) == text(second)
    assert ids(first) != ids(other_seed)


async def test_config_seed_is_used_when_the_request_has_none() -> None:
    default = await run(completion("hello", 6))
    explicit = await run(completion("hello", 6, seed=0))
    reseeded = await run(completion("hello", 6), MockerConfig(seed=1))
    assert ids(default) == ids(explicit)
    assert ids(default) != ids(reseeded)


async def test_replaying_prompt_plus_generated_ids_continues_identically() -> None:
    original = await run(completion([5, 6, 7, 8, 9], 20, seed=3))
    for k in (1, 4, 13):
        replay = await run(completion([5, 6, 7, 8, 9, *ids(original)[:k]], 20 - k, seed=3))
        assert ids(replay) == ids(original)[k:]
        assert text(replay) == text(original[k:])
        assert replay[-1].usage is not None
        assert replay[-1].usage.prompt_tokens == 5 + k


async def test_fallback_accepts_token_ids_from_larger_vocabularies() -> None:
    prompt = [2**70, 128000, 3]
    first = await run(completion(prompt, 4))
    again = await run(completion([*prompt, *ids(first)[:1]], 3))
    assert ids(again) == ids(first)[1:]


# ---- outputs and finish reasons ---------------------------------------------------------------


async def test_max_tokens_ends_with_length_and_exact_usage() -> None:
    outs = await run(completion("one two three four", 5))
    assert len(outs) == 5
    assert all(o.num_tokens == 1 and o.index == 0 and len(o.token_ids or []) == 1 for o in outs)
    assert [o.finish_reason for o in outs] == [None] * 4 + ["length"]
    assert [o.prompt_tokens for o in outs] == [4] + [None] * 4
    assert [o.usage is None for o in outs] == [True] * 4 + [False]
    usage = outs[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (4, 5, 0)
    assert all(o.text.startswith(" ") and len(o.text) > 1 for o in outs)


async def test_missing_max_tokens_uses_the_rest_of_the_context_window() -> None:
    outs = await run(completion(list(range(60)), None), MockerConfig(context_length=64))
    assert len(outs) == 4
    assert outs[-1].finish_reason == "length"


async def test_context_window_is_checked_before_the_stream_exists() -> None:
    engine = MockerEngine(MockerConfig(context_length=64), clock=FakeClock())
    with pytest.raises(ContextLengthExceeded):
        await engine.generate(completion(list(range(60)), 5), EngineContext())
    with pytest.raises(ContextLengthExceeded):
        await engine.generate(completion(list(range(64)), None), EngineContext())
    assert engine.context_length == 64
    await engine.aclose()


async def test_context_window_never_exceeds_the_kv_cache() -> None:
    engine = MockerEngine(MockerConfig(num_gpu_blocks=4, block_size=16), clock=FakeClock())
    assert engine.context_length == 64
    with pytest.raises(ContextLengthExceeded):
        await engine.generate(completion(list(range(60)), 5), EngineContext())
    await engine.aclose()


async def test_bad_prompts_are_rejected_before_the_stream_exists() -> None:
    engine = MockerEngine(MockerConfig(), clock=FakeClock())
    for prompt in ("  ", [-1]):
        with pytest.raises(InvalidRequest):
            await engine.generate(completion(prompt), EngineContext())
    with pytest.raises(InvalidRequest):
        await engine.generate(completion("x", 0), EngineContext())
    await engine.aclose()


async def test_stop_string_ends_with_stop_and_cuts_the_text_before_it() -> None:
    plain = await run(completion("tell me a story", 30))
    full = text(plain)
    # A stop string spanning the boundary between the 5th and 6th tokens' text.
    boundary = len(text(plain[:5]))
    stop = full[boundary - 2 : boundary + 3]
    cut = full.find(stop)
    stopped_at = next(j for j in range(1, 31) if stop in text(plain[:j]))

    outs = await run(completion("tell me a story", 30, stop=(stop, "never-matches")))
    assert text(outs) == full[:cut]
    assert outs[-1].finish_reason == "stop"
    assert len(outs) == stopped_at
    assert ids(outs) == ids(plain)[:stopped_at]
    assert outs[-1].usage is not None and outs[-1].usage.completion_tokens == stopped_at
    # No output ever showed a part of the stop string that was later withdrawn.
    shown = ""
    for out in outs:
        shown += out.text
        assert full.startswith(shown)


async def test_held_back_text_is_released_when_the_stream_ends_by_length() -> None:
    plain = await run(completion("tell me a story", 6))
    full = text(plain)
    # The tail of the output followed by a character that never comes: held back, then flushed.
    outs = await run(completion("tell me a story", 6, stop=(full[-3:] + "#",)))
    assert text(outs) == full
    assert outs[-1].finish_reason == "length"
    assert outs[-1].text.endswith(full[-3:])


def test_stop_matcher_holds_back_a_possible_prefix() -> None:
    matcher = StopMatcher(("STOP", "xy"))
    assert matcher.feed("abc S") == ("abc ", False)
    assert matcher.feed("T") == ("", False)
    assert matcher.feed("x") == ("ST", False)
    assert matcher.feed("z") == ("xz", False)
    assert matcher.feed("ST") == ("", False)
    assert matcher.feed("OP and more") == ("", True)
    matcher = StopMatcher(("xy",))
    assert matcher.feed("ax") == ("a", False)
    assert matcher.flush() == "x"


# ---- chat -------------------------------------------------------------------------------------


def test_chat_template_renders_messages_and_the_generation_prompt() -> None:
    rendered = render_chat(
        [
            message("system", "Be brief."),
            message("user", [{"type": "text", "text": "Hi"}, {"type": "image_url"}]),
        ]
    )
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    continued = render_chat(
        [message("user", "Hi"), message("assistant", "Hel")], continue_final=True
    )
    assert continued.endswith("<|im_start|>assistant\nHel")


async def test_chat_prompt_tokens_count_the_rendered_template() -> None:
    engine = MockerEngine(MockerConfig(), clock=FakeClock())
    req = chat([message("user", "What is a KV cache?")], 3)
    expected = len(engine.tokenizer.encode(render_chat([message("user", "What is a KV cache?")])))
    assert engine.tokenize(req) == engine.tokenizer.encode(
        render_chat([message("user", "What is a KV cache?")])
    )
    await engine.aclose()
    outs = await run(req)
    assert outs[0].prompt_tokens == expected
    assert outs[-1].usage is not None and outs[-1].usage.prompt_tokens == expected


async def test_chat_accepts_the_protocol_request_model() -> None:
    from dynamo_llm.protocols.chat import ChatCompletionRequest, ChatMessage

    params = ChatCompletionRequest(
        model="mock",
        messages=[ChatMessage(role="user", content=[{"type": "text", "text": "hi"}])],
        seed=11,
    )
    req = CHAT.request(params, id="r", model="mock", max_tokens=4)
    outs = await run(req)
    again = await run(chat([message("user", "hi")], 4, seed=11))
    assert ids(outs) == ids(again)


# ---- a real tokenizer -------------------------------------------------------------------------


def train_word_level(path: Path) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    tok.save(str(path))
    return tok


async def test_real_tokenizer_counts_prompt_tokens_and_decodes_output(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    tok = train_word_level(path)
    config = MockerConfig(tokenizer=str(path))
    prompt = "the quick engine answers the second request"
    outs = await run(completion(prompt, 10), config)

    assert outs[0].prompt_tokens == len(tok.encode(prompt).ids) == 7
    usage = outs[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (7, 10)
    generated = ids(outs)
    assert all(0 <= t < tok.get_vocab_size() for t in generated)
    assert not {tok.token_to_id("[UNK]"), tok.token_to_id("[EOS]")} & set(generated)
    # Each token's text is its word, spaced as the tokenizer decodes the whole sequence.
    assert [o.text for o in outs] == [" " + tok.id_to_token(t) for t in generated]  # type: ignore[operator]
    assert text(outs) == " " + tok.decode(generated)


async def test_real_tokenizer_replays_token_id_prompts(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    tok = train_word_level(path)
    config = MockerConfig(tokenizer=str(path))
    prompt_ids = tok.encode("a lazy dog jumps").ids
    original = await run(completion(prompt_ids, 8, seed=5), config)
    replay = await run(completion([*prompt_ids, *ids(original)[:3]], 5, seed=5), config)
    assert ids(replay) == ids(original)[3:]
    assert text(replay) == text(original[3:])
    with pytest.raises(InvalidRequest):
        engine = MockerEngine(config, clock=FakeClock())
        try:
            await engine.generate(completion([tok.get_vocab_size()]), EngineContext())
        finally:
            await engine.aclose()


def test_missing_tokenizer_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        MockerEngine(MockerConfig(tokenizer=str(tmp_path / "nope.json")))
