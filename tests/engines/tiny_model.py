"""A tiny random Llama, built offline, that every engine in the suite can serve.

Nothing can be downloaded here, so the suite makes its own model: a byte-level BPE tokenizer
trained with `tokenizers` on generated text, and a 2-layer LlamaForCausalLM with random
weights, written twice:

- Hugging Face format (`config.json`, `model.safetensors`, `generation_config.json`,
  `tokenizer.json`, `tokenizer_config.json` with a Llama-2-style `chat_template`) for vLLM;
- GGUF (`model.gguf`: llama architecture, the same weights with q/k permuted as llama.cpp's
  converter does, the tokenizer embedded as gpt2-style BPE with the `gpt-2` pre-tokenizer,
  which is the regex `tokenizers`' ByteLevel uses) for llama.cpp.

head_dim is 64 (hidden 128, 2 heads), what vLLM's CPU attention needs.

The model never ends a request by itself: every request runs to `max_tokens`, so a case
knows how many tokens an answer has. Dimension 0 of every token's embedding is a constant
`ANCHOR`, and no layer writes to it (row 0 of every `o_proj` and `down_proj` is zero), so after
the final RMSNorm that coordinate is positive for every position. The `lm_head` rows of the
special tokens, and of every token whose bytes are not printable ASCII, are `-SUPPRESS` there
and zero elsewhere: their logits are below -1000 while every other logit is a few units, so no
sampler picks them, and every answer is printable ASCII (no split UTF-8 sequence whose
rendering differs between engines).

Everything is seeded; the result is cached by a hash of this file under
`${DYN_ENGINES_CACHE:-~/.cache/dynamo-llm-engines}/model-<hash>/`.

    python tests/engines/tiny_model.py            # build (or find) it and print its folder
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 20261201
VOCAB_SIZE = 1024
HIDDEN = 128
HEADS = 2
KV_HEADS = 2
LAYERS = 2
INTERMEDIATE = 256
MAX_POSITIONS = 32768
ROPE_THETA = 10000.0
RMS_EPS = 1e-5
ANCHOR = 4.0
SUPPRESS = 1000.0
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<<SYS>> ' + message['content'] + ' <</SYS>> ' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + (message['content'] or '') + eos_token }}"
    "{% else %}"
    "{{ '[' + message['role'] + '] ' + (message['content'] or '') + ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ' }}{% endif %}"
)

_WORD_TEXT = (
    "the a of to and in is it that for on with as was at by be this from or an are not "
    "have one all but were there can more when your which their said each will about how "
    "up out them then she many some so these would other into has her two like him see "
    "time could no make than first been its who now people my made over did down only way "
    "find use may water long little very after words called just where most know get "
    "through back much before go good new write our used me man too any day same right "
    "look think also around another came come work three word must because does part even "
    "place well such here take why things help put years different away again off went old "
    "number great tell men say small every found still between name should home big give "
    "air line set own under read last never us left end along while might next sound below "
    "saw something thought both few those always looked show large often together asked "
    "house world going want school important until form food keep children feet land side "
    "without boy once animals life enough took sometimes four head above kind began almost "
    "live page got earth need far hand high year mother light parts country father let "
    "night following picture being study second eyes soon times story boys since white "
    "days ever paper hard near sentence better best across during today others however sure "
    "weather city paris rome london tokyo cairo lima oslo madrid temperature celsius "
    "function name arguments location unit tool call result hello there assistant user"
)


@dataclass(frozen=True)
class TinyModel:
    """Where a built model lies, and the facts about it the cases need."""

    path: Path

    @property
    def gguf(self) -> Path:
        return self.path / "model.gguf"

    @property
    def tokenizer_json(self) -> Path:
        return self.path / "tokenizer.json"


def cache_root() -> Path:
    base = os.environ.get("DYN_ENGINES_CACHE") or str(Path.home() / ".cache" / "dynamo-llm-engines")
    return Path(base)


def content_hash() -> str:
    """The cache key: this file is the whole recipe (its inputs are all constants here)."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def ensure_model(root: Path | None = None) -> TinyModel:
    """Build the model once into the cache (atomically) and return where it is."""
    root = root or cache_root()
    final = root / f"model-{content_hash()}"
    if (final / ".done").exists():
        return TinyModel(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=root))
    tmp.chmod(0o755)
    try:
        build(tmp)
        (tmp / ".done").write_text(content_hash() + "\n")
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: keep its copy
            if not (final / ".done").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TinyModel(final)


def corpus(seed: int = SEED, lines: int = 6000) -> list[str]:
    """Generated English-like lines, numbers and JSON snippets for the BPE trainer."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocabulary = _WORD_TEXT.split()
    out = []
    for i in range(lines):
        n = int(rng.integers(4, 18))
        words = [str(w) for w in rng.choice(vocabulary, size=n)]
        if i % 7 == 0:
            words.insert(int(rng.integers(0, n)), str(int(rng.integers(0, 10000))))
        line = " ".join(words)
        line = line[0].upper() + line[1:] + str(rng.choice([".", "?", "!", ",", ";"]))
        if i % 11 == 0:
            city = str(rng.choice(["Paris", "Rome", "London", "Tokyo"]))
            line += ' {"name": "get_weather", "arguments": {"city": "' + city + '"}}'
        out.append(line)
    return out


def train_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    # Llama-style: a prompt starts with <s> (vLLM's completions and llama.cpp's add_bos agree).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    return tok


def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: a byte-level token's characters -> bytes."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def suppressed_ids(vocab: dict[str, int]) -> list[int]:
    """Specials and every token that is not printable ASCII (space and `!`..`~`)."""
    decode = _byte_decoder()
    out = []
    for token, i in vocab.items():
        if token in SPECIAL_TOKENS or not all(32 <= decode[c] <= 126 for c in token):
            out.append(i)
    return sorted(out)


def weights(vocab_size: int, suppressed: list[int]) -> dict[str, Any]:
    """HF-named float32 weights of the random Llama (see the module docstring)."""
    import numpy as np

    rng = np.random.default_rng(SEED)

    def normal(*shape: int, std: float) -> Any:
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    head_dim = HIDDEN // HEADS
    w: dict[str, Any] = {}
    embed = normal(vocab_size, HIDDEN, std=1.0)
    embed[:, 0] = ANCHOR
    w["model.embed_tokens.weight"] = embed
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.ones(HIDDEN, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(HIDDEN, np.float32)
        w[p + "self_attn.q_proj.weight"] = normal(HEADS * head_dim, HIDDEN, std=0.3)
        w[p + "self_attn.k_proj.weight"] = normal(KV_HEADS * head_dim, HIDDEN, std=0.3)
        w[p + "self_attn.v_proj.weight"] = normal(KV_HEADS * head_dim, HIDDEN, std=0.1)
        o = normal(HIDDEN, HEADS * head_dim, std=0.1)
        o[0, :] = 0.0
        w[p + "self_attn.o_proj.weight"] = o
        w[p + "mlp.gate_proj.weight"] = normal(INTERMEDIATE, HIDDEN, std=0.1)
        w[p + "mlp.up_proj.weight"] = normal(INTERMEDIATE, HIDDEN, std=0.1)
        down = normal(HIDDEN, INTERMEDIATE, std=0.1)
        down[0, :] = 0.0
        w[p + "mlp.down_proj.weight"] = down
    w["model.norm.weight"] = np.ones(HIDDEN, np.float32)
    head = normal(vocab_size, HIDDEN, std=0.3)
    head[:, 0] = 0.0
    head[suppressed, :] = 0.0
    head[suppressed, 0] = -SUPPRESS
    w["lm_head.weight"] = head
    return w


def _permute(weights: Any, n_head: int) -> Any:
    """llama.cpp's converter: HF's rotate-half q/k rows -> GGML's interleaved rope layout."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_hf(out: Path, tok: Any, w: dict[str, Any]) -> None:
    from safetensors.numpy import save_file

    vocab_size = tok.get_vocab_size()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HIDDEN // HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": RMS_EPS,
        "rope_theta": ROPE_THETA,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def write_gguf(path: Path, tok: Any, w: dict[str, Any]) -> None:
    import gguf

    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = [
        gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens
    ]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("dynamo-llm tiny random llama")
    writer.add_context_length(MAX_POSITIONS)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    writer.add_tensor("token_embd.weight", w["model.embed_tokens.weight"])
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        writer.add_tensor(b + "attn_norm.weight", w[p + "input_layernorm.weight"])
        writer.add_tensor(b + "attn_q.weight", _permute(w[p + "self_attn.q_proj.weight"], HEADS))
        k = _permute(w[p + "self_attn.k_proj.weight"], KV_HEADS)
        writer.add_tensor(b + "attn_k.weight", k)
        writer.add_tensor(b + "attn_v.weight", w[p + "self_attn.v_proj.weight"])
        writer.add_tensor(b + "attn_output.weight", w[p + "self_attn.o_proj.weight"])
        writer.add_tensor(b + "ffn_norm.weight", w[p + "post_attention_layernorm.weight"])
        writer.add_tensor(b + "ffn_gate.weight", w[p + "mlp.gate_proj.weight"])
        writer.add_tensor(b + "ffn_up.weight", w[p + "mlp.up_proj.weight"])
        writer.add_tensor(b + "ffn_down.weight", w[p + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", w["model.norm.weight"])
    writer.add_tensor("output.weight", w["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def build(out: Path) -> None:
    tok = train_tokenizer()
    suppressed = suppressed_ids(tok.get_vocab())
    w = weights(tok.get_vocab_size(), suppressed)
    write_hf(out, tok, w)
    write_gguf(out / "model.gguf", tok, w)
    (out / "suppressed_ids.json").write_text(json.dumps(suppressed) + "\n")


if __name__ == "__main__":
    print(ensure_model(Path(sys.argv[1]) if len(sys.argv) > 1 else None).path)
