"""Tokens for the mocker: tokenizers, the chat template and the deterministic "language model".

Two tokenizers share one small interface (:class:`MockTokenizer`):

- :class:`FileTokenizer` wraps a Hugging Face ``tokenizer.json`` (``tokenizers`` library). Output
  text is produced by incremental detokenization (vLLM's prefix/read-offset scheme, seeded with
  the last prompt tokens), so spacing is right and a multi-byte character split across tokens is
  held back until it is complete.
- :class:`WordTokenizer` is the fallback when no tokenizer is given: the text is split into words
  and punctuation marks and each piece maps to a stable id (a hash modulo the vocabulary). It
  does not round-trip: decoding renders an id as a pronounceable made-up word with a leading
  space (id 0 is ``" ka"``), which is enough for a simulated model's output.

``aencode`` is ``encode`` for the event loop: a long text never holds it for long. The word
tokenizer encodes a slice at a time (cut at whitespace, which no piece spans), yielding between
slices; a ``tokenizer.json`` encodes in a thread through ``encode_batch``, which releases the
GIL (``encode`` does not: measured, it holds it for the whole call).

The next token is a pure function of the seed and the last :data:`CONTEXT_WINDOW` token ids of
the context (prompt + generated), hashed with BLAKE2b and mapped onto the tokenizer's ordinary
(non-special) ids. Nothing else enters it (not the position, the time, or the batch), so
replaying prompt + generated-so-far as a token-id prompt continues exactly as the original
would have. The mocker never samples an end-of-sequence token: a stream ends by ``max_tokens``
(or the context window), a stop string, or cancellation.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
import struct
from collections.abc import Iterable, Sequence
from typing import Protocol

import tokenizers

from ...protocols.chat import ChatMessage, content_text
from ..slices import SLICE_CHARS, text_slices

CONTEXT_WINDOW = 4
"""How many trailing context tokens the next-token hash looks at."""

WORD_VOCAB_SIZE = 32000
"""Vocabulary size of the fallback tokenizer (ids it encodes to and generates)."""

_MASK64 = (1 << 64) - 1


class Detokenizer(Protocol):
    """Turns one sequence's newest token into the text it adds."""

    def step(self, token_ids: list[int]) -> str:
        """Text added by ``token_ids[-1]`` (the whole context so far is passed)."""
        ...


class MockTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    async def aencode(self, text: str) -> list[int]:
        """``encode(text)``, without holding the event loop for long on a long text."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def detokenizer(self, prompt_len: int) -> Detokenizer: ...

    def check_ids(self, token_ids: Sequence[int]) -> str | None:
        """Why a client-given token-id prompt is unacceptable, or None."""
        ...

    def pick(self, digest: int) -> int:
        """Map a 64-bit hash onto an id the model may generate."""
        ...


# ---- fallback ---------------------------------------------------------------------------------

_PIECE = re.compile(r"\w+|[^\w\s]")
_SPACE = re.compile(r"\s")
_SYLLABLES = (
    "ka", "lo", "mi", "nu", "pe", "ra", "si", "to",
    "ve", "zu", "ba", "de", "fi", "go", "hu", "ja",
)  # fmt: skip


@functools.lru_cache(maxsize=65536)
def _piece_id(piece: str) -> int:
    digest = hashlib.blake2b(piece.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % WORD_VOCAB_SIZE


@functools.lru_cache(maxsize=WORD_VOCAB_SIZE)
def render_word(token_id: int) -> str:
    """The fallback rendering of one id: a space, then base-16 digits spelled as syllables."""
    parts = [_SYLLABLES[token_id & 15]]
    token_id >>= 4
    while token_id:
        parts.append(_SYLLABLES[token_id & 15])
        token_id >>= 4
    return " " + "".join(parts)


class _WordDetokenizer:
    __slots__ = ()

    def step(self, token_ids: list[int]) -> str:
        return render_word(token_ids[-1])


class WordTokenizer:
    """Deterministic fallback: words and punctuation in, made-up words out."""

    __slots__ = ()

    vocab_size = WORD_VOCAB_SIZE
    _detok = _WordDetokenizer()

    def encode(self, text: str) -> list[int]:
        return [_piece_id(piece) for piece in _PIECE.findall(text)]

    async def aencode(self, text: str) -> list[int]:
        ids: list[int] = []
        async for piece in text_slices(text, _SPACE):
            ids += self.encode(piece)
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(render_word(t) for t in token_ids)

    def detokenizer(self, prompt_len: int) -> Detokenizer:
        return self._detok

    def check_ids(self, token_ids: Sequence[int]) -> str | None:
        # Any non-negative id renders, so prompts from other models' vocabularies are accepted.
        for t in token_ids:
            if t < 0:
                return f"Token id {t} is out of vocabulary"
        return None

    def pick(self, digest: int) -> int:
        return digest % WORD_VOCAB_SIZE


# ---- tokenizer.json ---------------------------------------------------------------------------

_PREFIX_TOKENS = 5  # prompt tokens decoded with the first output token, for correct spacing


class _IncrementalDetokenizer:
    __slots__ = ("_prefix_offset", "_read_offset", "_tokenizer")

    def __init__(self, tokenizer: tokenizers.Tokenizer, prompt_len: int) -> None:
        self._tokenizer = tokenizer
        self._prefix_offset = max(0, prompt_len - _PREFIX_TOKENS)
        self._read_offset = prompt_len

    def step(self, token_ids: list[int]) -> str:
        decode = self._tokenizer.decode
        prefix_text = decode(token_ids[self._prefix_offset : self._read_offset])
        new_text = decode(token_ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            # Nothing printable yet (a special token, or half of a multi-byte character).
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(token_ids)
        return new_text[len(prefix_text) :]


class FileTokenizer:
    """A Hugging Face ``tokenizer.json``; the model generates only its non-special ids."""

    __slots__ = ("_candidates", "_tokenizer", "vocab_size")

    def __init__(self, path: str) -> None:
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as exc:  # the binding raises a bare Exception for missing or bad files
            raise ValueError(f"cannot load tokenizer {path!r}: {exc}") from exc
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        special = {
            i for i, tok in self._tokenizer.get_added_tokens_decoder().items() if tok.special
        }
        candidates = [i for i in range(self.vocab_size) if i not in special]
        if not candidates:
            raise ValueError(f"tokenizer {path!r} has no ordinary tokens to generate")
        self._candidates = candidates

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text).ids)

    async def aencode(self, text: str) -> list[int]:
        if len(text) < SLICE_CHARS:
            return self.encode(text)
        (encoding,) = await asyncio.to_thread(self._tokenizer.encode_batch, [text])
        return list(encoding.ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(token_ids))

    def detokenizer(self, prompt_len: int) -> Detokenizer:
        return _IncrementalDetokenizer(self._tokenizer, prompt_len)

    def check_ids(self, token_ids: Sequence[int]) -> str | None:
        for t in token_ids:
            if not 0 <= t < self.vocab_size:
                return f"Token id {t} is out of vocabulary"
        return None

    def pick(self, digest: int) -> int:
        return self._candidates[digest % len(self._candidates)]


def load_tokenizer(path: str | None) -> MockTokenizer:
    """The tokenizer at ``path``, or the deterministic fallback when there is none."""
    return WordTokenizer() if path is None else FileTokenizer(path)


# ---- prompts ----------------------------------------------------------------------------------


def render_chat(
    messages: Iterable[ChatMessage],
    *,
    add_generation_prompt: bool = True,
    continue_final: bool = False,
) -> str:
    """Render chat messages with a fixed ChatML-style template.

    Each message becomes ``<|im_start|>{role}\\n{text}<|im_end|>\\n``; the generation prompt
    ``<|im_start|>assistant\\n`` follows. With ``continue_final`` the last message is left open
    (no end marker, no generation prompt), so the model continues it, which is how a chat
    request is replayed after migration.
    """
    parts: list[str] = []
    items = list(messages)
    for i, message in enumerate(items):
        role = message.role or "user"
        text = content_text(message.content)
        if continue_final and i == len(items) - 1:
            parts.append(f"<|im_start|>{role}\n{text}")
            return "".join(parts)
        parts.append(f"<|im_start|>{role}\n{text}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


# ---- the "language model" ---------------------------------------------------------------------


def seed_key(seed: int) -> bytes:
    """The BLAKE2b key for a seed (any int; reduced to 64 bits)."""
    return (seed & _MASK64).to_bytes(8, "little")


_PACKERS = [struct.Struct(f"<{n}Q") for n in range(CONTEXT_WINDOW + 1)]


def next_token_id(token_ids: Sequence[int], key: bytes, tokenizer: MockTokenizer) -> int:
    """The next token after ``token_ids``: a keyed hash of its last :data:`CONTEXT_WINDOW` ids."""
    tail = token_ids[-CONTEXT_WINDOW:]
    packer = _PACKERS[len(tail)]
    try:
        data = packer.pack(*tail)
    except struct.error:  # an id from a client's prompt beyond 64 bits
        data = packer.pack(*(t & _MASK64 for t in tail))
    digest = hashlib.blake2b(data, digest_size=8, key=key).digest()
    return tokenizer.pick(int.from_bytes(digest, "little"))
