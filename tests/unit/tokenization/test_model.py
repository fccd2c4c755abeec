"""A model folder's tokenizer: a request's ids as vLLM computes them, and the prefix cache."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import msgspec
import pytest
import tokenizers

from dynamo_llm.tokenization import THREAD_CHARS, ModelTokenizer, PrefixCache
from dynamo_llm.tokenization.prefix import is_cut_safe, specials_of
from tests.unit.tokenization.helpers import CHATML, LLAMA2, WORDS, chat, completion, model_folder

pytestmark = pytest.mark.usefixtures("safety_net")


@pytest.fixture(scope="module", params=["llama2", "chatml"])
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    template = LLAMA2 if request.param == "llama2" else CHATML
    return model_folder(tmp_path_factory.mktemp(request.param), template)


def whole(tokenizer: ModelTokenizer, body: dict[str, Any]) -> list[int]:
    """The ids without the cache: the rendered text encoded in one piece."""
    return tokenizer.encode(tokenizer.render_chat(chat(body)), add_special_tokens=False)


async def test_a_chat_is_encoded_without_a_second_bos_and_a_completion_with_one(
    folder: Path,
) -> None:
    tokenizer = ModelTokenizer.load(str(folder))
    ids = await tokenizer.prompt_ids(chat({"messages": [{"role": "user", "content": "hello"}]}))
    assert ids is not None
    assert ids[:2] != [1, 1]
    assert ids == whole(tokenizer, {"messages": [{"role": "user", "content": "hello"}]})
    assert await tokenizer.prompt_ids(completion("hello there")) == tokenizer.encode("hello there")
    assert tokenizer.encode("hello there")[0] == 1
    assert await tokenizer.prompt_ids(completion([5, 6, 7])) == [5, 6, 7]


async def test_a_prompt_the_frontend_cannot_render_has_no_ids(tmp_path: Path) -> None:
    tokenizer = ModelTokenizer.load(str(model_folder(tmp_path, None)))
    assert (
        await tokenizer.prompt_ids(chat({"messages": [{"role": "user", "content": "x"}]})) is None
    )
    assert await tokenizer.prompt_ids(completion("x")) == tokenizer.encode("x")


def test_a_folder_without_a_tokenizer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        ModelTokenizer.load(str(tmp_path))
    with pytest.raises(ValueError, match="not a model folder"):
        ModelTokenizer.load(str(tmp_path / "nowhere"))


def test_a_folder_with_an_unusable_config_or_template_file_is_refused(tmp_path: Path) -> None:
    # Before: an AttributeError or OSError, a traceback at start-up instead of the CLI's error.
    folder = model_folder(tmp_path / "list")
    (folder / "tokenizer_config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json"):
        ModelTokenizer.load(str(folder))
    folder = model_folder(tmp_path / "dir")
    (folder / "chat_template.jinja").mkdir()
    with pytest.raises(ValueError, match=r"chat_template\.jinja"):
        ModelTokenizer.load(str(folder))


def random_text(rng: random.Random, specials: bool) -> str:
    pieces = [rng.choice(WORDS) for _ in range(rng.randint(0, 30))]
    if specials and rng.random() < 0.3:
        pieces.insert(rng.randint(0, len(pieces)), rng.choice(["</s>", "<|im_end|>", "<s>"]))
    sep = rng.choice([" ", " ", "  ", "\n", ""])
    return sep.join(pieces) + rng.choice(["", " ", "\n", "  "])


@pytest.mark.parametrize("seed", range(6))
async def test_multi_turn_ids_with_the_prefix_cache_equal_the_whole_encoding(
    folder: Path, seed: int
) -> None:
    rng = random.Random(seed)
    tokenizer = ModelTokenizer.load(str(folder))
    cache = tokenizer.prefix_cache
    assert cache is not None
    for _conversation in range(3):
        messages: list[dict[str, Any]] = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": random_text(rng, True)})
        for _turn in range(6):
            messages.append({"role": "user", "content": random_text(rng, True)})
            body = {"messages": list(messages)}
            assert await tokenizer.prompt_ids(chat(body)) == whole(tokenizer, body), body
            messages.append({"role": "assistant", "content": random_text(rng, True)})
    assert len(cache) > 0


async def test_a_later_turn_encodes_only_what_follows_the_cached_prefix(folder: Path) -> None:
    tokenizer = ModelTokenizer.load(str(folder))
    cache = tokenizer.prefix_cache
    assert cache is not None
    messages: list[dict[str, Any]] = []
    for content in ("first question", "second question", "third question"):
        messages.append({"role": "user", "content": content})
        await tokenizer.prompt_ids(chat({"messages": list(messages)}))
        messages.append({"role": "assistant", "content": "an answer"})
    messages.append({"role": "user", "content": "fourth question"})
    text = tokenizer.render_chat(chat({"messages": messages}))
    specials = specials_of(tokenizer._tokenizer)
    assert specials is not None
    hit = cache.longest(text, specials.cut_points(text))
    # The previous request's text up to its last special token is reused: at least every
    # message before the third question (with ChatML, the third question too).
    assert hit is not None and hit[0] > text.index("second question")


async def test_a_long_chat_is_encoded_in_a_thread_to_the_same_ids(folder: Path) -> None:
    rng = random.Random(7)
    tokenizer = ModelTokenizer.load(str(folder))
    long = " ".join(rng.choice(WORDS) for _ in range(THREAD_CHARS // 2))
    assert len(long) >= THREAD_CHARS
    body = {"messages": [{"role": "user", "content": long}]}
    assert await tokenizer.prompt_ids(chat(body)) == whole(tokenizer, body)
    assert await tokenizer.prompt_ids(completion(long)) == tokenizer.encode(long)


def test_a_tokenizer_that_prepends_to_the_first_piece_only_gets_no_cache() -> None:
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel(
            {"<s>": 0, "▁a": 1, "a": 2, "▁b": 3, "b": 4, "<unk>": 5}, unk_token="<unk>"
        )
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.add_special_tokens(["<s>"])
    specials = specials_of(tok)
    assert specials is not None
    assert not is_cut_safe(tok, specials)


def test_the_cache_drops_the_least_recent_prefix_past_its_bound() -> None:
    cache = PrefixCache(max_tokens=10)
    cache.put("aaaa", [1] * 6)
    cache.put("bbbb", [2] * 3)
    assert cache.longest("aaaa+", [4]) == (4, [1] * 6)  # aaaa is now the most recent
    cache.put("cccc", [3] * 4)
    assert cache.longest("bbbb+", [4]) is None
    assert cache.longest("aaaa+", [4]) is not None
    assert cache.tokens == 10


async def test_a_request_with_its_own_template_or_special_token_switch_is_left_to_the_engine(
    folder: Path,
) -> None:
    tokenizer = ModelTokenizer.load(str(folder))
    body = {"messages": [{"role": "user", "content": "hi"}]}
    raw = json.dumps({**body, "chat_template": "{{ 1 }}"}).encode()  # forwarded, not known
    request = msgspec.structs.replace(chat(body), raw_body=raw)
    assert await tokenizer.prompt_ids(request) is None


async def test_a_chat_with_long_tools_and_short_messages_is_encoded_in_a_thread(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tools are rendered into the prompt too: before, only the messages' text was measured,
    # and a 20 KB tool list with a one-word question was rendered and encoded on the event loop.
    tokenizer = ModelTokenizer.load(str(folder))
    tool = {"type": "function", "function": {"name": "f", "description": "d " * THREAD_CHARS}}
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
    request = msgspec.structs.replace(chat(body), raw_body=json.dumps(body).encode())
    threaded: list[object] = []
    real = asyncio.to_thread

    async def to_thread(func: Any, /, *args: Any) -> Any:
        threaded.append(func)
        return await real(func, *args)

    monkeypatch.setattr("dynamo_llm.tokenization.model.asyncio.to_thread", to_thread)
    assert await tokenizer.prompt_ids(request) == whole(tokenizer, body)
    assert threaded
