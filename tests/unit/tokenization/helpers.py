"""A small Hugging Face model folder for the tokenization tests, built offline.

A byte-level BPE like the engine suite's tiny model (``tests/engines/tiny_model.py``), trained in
a fraction of a second on generated text, with its special tokens, a ``tokenizer_config.json``
and a chat template of the test's choosing.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from dynamo_llm.engines.base import EngineRequest
from dynamo_llm.protocols.chat import ChatCompletionRequest, decode_chat_request
from tests.engines.tiny_model import CHAT_TEMPLATE

_TEXT = (
    "the a of to and in is it that for on with as was at by be this from or an are not have "
    "one all but were there can more when your which said each will about how up out them then "
    "weather city paris rome london tokyo temperature celsius function name arguments hello "
    "there assistant user system tool call result 0 1 2 3 4 5 6 7 8 9 { } : , . ? ! é ü"
)
WORDS = _TEXT.split(" ")

LLAMA2 = CHAT_TEMPLATE
"""The engine suite's tiny model's template (Llama-2 style; the template writes the BOS)."""

CHATML = """{% if tools %}
<|im_start|>system
# Tools
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
<|im_end|>
{% endif %}
{% for message in messages %}
{{ '<|im_start|>' + message['role'] + '\n' }}
{%- if message['content'] is string %}{{ message['content'] }}
{%- else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}
{%- if message['tool_calls'] is defined %}
{% for call in message['tool_calls'] %}
<tool_call>{{ call['function'] | tojson }}</tool_call>
{% endfor %}
{% endif %}
{{- '<|im_end|>\n' }}
{% endfor %}
{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"""
"""A Qwen-like ChatML template that loops over content parts (vLLM's "openai" format) and
renders tools and tool calls with ``tojson``; ``trim_blocks``/``lstrip_blocks`` shape it."""

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def corpus(seed: int = 1, lines: int = 400) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(lines)]


def train() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def model_folder(path: Path, template: str | None = LLAMA2, *, jinja_file: bool = False) -> Path:
    """Write a model folder at ``path``: ``tokenizer.json``, ``tokenizer_config.json`` and the
    template (in the config, or as ``chat_template.jinja``)."""
    path.mkdir(parents=True, exist_ok=True)
    train().save(str(path / "tokenizer.json"))
    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    if template is not None and not jinja_file:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if template is not None and jinja_file:
        (path / "chat_template.jinja").write_text(template)
    return path


def chat(body: Mapping[str, Any], rid: str = "r") -> EngineRequest:
    """The engine request of a chat body (``model`` filled in)."""
    params = decode_chat_request(json.dumps({"model": "m", **body}).encode())
    assert isinstance(params, ChatCompletionRequest)
    return EngineRequest(
        id=rid,
        model="m",
        endpoint="chat_completions",
        params=params,
        messages=params.messages,
        add_generation_prompt=params.add_generation_prompt,
        continue_final_message=params.continue_final_message,
    )


def completion(prompt: str | list[int], rid: str = "r") -> EngineRequest:
    from dynamo_llm.protocols.completions import decode_completion_request

    params = decode_completion_request(json.dumps({"model": "m", "prompt": prompt}).encode())
    return EngineRequest(id=rid, model="m", endpoint="completions", params=params, prompt=prompt)
