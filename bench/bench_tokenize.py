"""The frontend's tokenization cost per request (``--tokenizer MODEL_DIR``, issue 13).

For prompts of about 1k, 10k and 100k tokens (a chat of ``--messages`` messages, alternating
user and assistant, as a multi-turn conversation grows), in process, one core:

- **baseline**: ``tokenizers`` encoding the rendered text alone (``Tokenizer.encode``), what any
  frontend that knows the prompt's ids pays at least;
- **render**: the chat template rendered (:class:`~dynamo_llm.tokenization.ChatTemplate`);
- **cold**: :meth:`~dynamo_llm.tokenization.ModelTokenizer.prompt_ids` with an empty prefix
  cache (render + encode; from 16k characters on, in a thread with ``encode_batch``);
- **warm**: the same request when the conversation's previous turn (two messages fewer) was
  tokenized just before: only what follows the cached prefix is encoded;
- **completion**: a text prompt of the same size (``add_special_tokens=True``).

Medians of ``--reps`` runs each (the warm runs each start from a fresh cache holding the
previous turn). The model is the engine suite's tiny model (``--model``, a Hugging Face folder;
default: its cached copy, else a byte-level BPE of 1 024 ids trained here with the same
Llama-2-style template). Tokens per second depend on the vocabulary: a 1 024-id BPE makes more,
shorter tokens per character than a production model's.

Run: ``PYTHONPATH=src .venv/bin/python bench/bench_tokenize.py``. The machine it runs on is
shared; figures are indicative.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from dynamo_llm.engines.base import EngineRequest
from dynamo_llm.protocols.chat import ChatCompletionRequest, decode_chat_request
from dynamo_llm.protocols.completions import decode_completion_request
from dynamo_llm.tokenization import ModelTokenizer

TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<<SYS>> ' + message['content'] + ' <</SYS>> ' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + (message['content'] or '') + eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ ' ' }}{% endif %}"
)
_TEXT = (
    "the a of to and in is it that for on with as was at by be this from or an are not have "
    "one all but were there can more when your which said each will about how up out them "
    "weather city paris rome london tokyo temperature celsius function name arguments 12 345"
)
WORDS = _TEXT.split(" ")


def default_model() -> Path:
    cache = Path.home() / ".cache" / "dynamo-llm-engines"
    found = sorted(cache.glob("model-*/tokenizer_config.json"))
    if found:
        return found[0].parent
    folder = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(4000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def text_of(tokenizer: ModelTokenizer, tokens: int, rng: random.Random) -> str:
    """Words until the text encodes to about ``tokens`` ids."""
    words: list[str] = []
    while True:
        words += [rng.choice(WORDS) for _ in range(max(8, tokens // 4))]
        text = " ".join(words)
        if len(tokenizer.encode(text, add_special_tokens=False)) >= tokens:
            return text


def chat(messages: list[dict[str, str]]) -> EngineRequest:
    params = decode_chat_request(json.dumps({"model": "m", "messages": messages}).encode())
    assert isinstance(params, ChatCompletionRequest)
    return EngineRequest(
        id="b", model="m", endpoint="chat_completions", params=params, messages=params.messages
    )


def completion(prompt: str) -> EngineRequest:
    params = decode_completion_request(json.dumps({"model": "m", "prompt": prompt}).encode())
    return EngineRequest(id="b", model="m", endpoint="completions", params=params, prompt=prompt)


async def timed(reps: int, work: Callable[[], Awaitable[Any]], before: Any = None) -> float:
    """The median seconds of ``work()`` over ``reps`` runs (``before()`` untimed first)."""
    samples = []
    for _ in range(reps):
        if before is not None:
            await before()
        t0 = time.perf_counter()
        await work()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


async def measure(folder: Path, tokens: int, messages: int, reps: int) -> dict[str, float]:
    rng = random.Random(tokens)
    probe = ModelTokenizer.load(str(folder))
    per_message = max(1, tokens // messages)
    conversation = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": text_of(probe, per_message, rng)}
        for i in range(messages)
    ]
    if conversation[-1]["role"] != "user":
        conversation.pop()
    request = chat(conversation)
    previous = chat(conversation[:-2])
    text = probe.render_chat(request)
    n = len(probe.encode(text, add_special_tokens=False))
    raw = probe._tokenizer
    holder: dict[str, ModelTokenizer] = {}

    async def fresh() -> None:
        holder["t"] = ModelTokenizer.load(str(folder))

    async def fresh_with_previous_turn() -> None:
        await fresh()
        await holder["t"].prompt_ids(previous)

    async def baseline() -> None:
        raw.encode(text, add_special_tokens=False)

    async def render() -> None:
        probe.render_chat(request)

    async def ids() -> None:
        got = await holder["t"].prompt_ids(request)
        assert got is not None and len(got) == n

    prompt = text_of(probe, tokens, rng)

    async def complete() -> None:
        await probe.prompt_ids(completion(prompt))

    return {
        "tokens": n,
        "baseline": await timed(reps, baseline),
        "render": await timed(reps, render),
        "cold": await timed(reps, ids, fresh),
        "warm": await timed(reps, ids, fresh_with_previous_turn),
        "completion": await timed(reps, complete),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a Hugging Face model folder")
    parser.add_argument("--sizes", default="1000,10000,100000", help="prompt sizes in tokens")
    parser.add_argument("--messages", type=int, default=21, help="messages per conversation")
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    folder = args.model or default_model()
    print(f"model: {folder}")
    print(
        "| prompt tokens | baseline: tokenizers encode | render | **cold** (render + encode) "
        "| **warm** (previous turn cached) | completion |"
    )
    print("|---|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        r = await measure(folder, size, args.messages, args.reps)
        ms = {k: f"{v * 1000:.2f} ms" for k, v in r.items() if k != "tokens"}
        print(
            f"| {r['tokens']:,} | {ms['baseline']} | {ms['render']} | **{ms['cold']}** "
            f"| **{ms['warm']}** | {ms['completion']} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
