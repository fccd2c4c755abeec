"""Tokenized prefixes of rendered chats, so that a conversation's next turn encodes only its news.

Turn N+1 of a chat renders to turn N's text plus the newest messages, but a BPE tokenizer may
merge across any point of a text: the ids of a prefix are reusable only where no token can span
the cut. A special token is such a point: ``tokenizers`` splits the input on its added tokens
before it normalizes, pre-tokenizes or merges, so the text on each side is encoded on its own.
A cut is therefore made right after an occurrence of a special token (``<s>``, ``</s>``,
``<|im_end|>``, ...), and not where whitespace follows it if some added token strips whitespace
(``lstrip``/``rstrip``), since the split would then move it.

That is the theory; a tokenizer whose pre-tokenizer looks at the position in the whole input
(SentencePiece's ``Metaspace`` with ``prepend_scheme: first``) breaks it. :func:`is_cut_safe`
checks the tokenizer on a few probes when it is loaded, and the cache is not used for one that
fails them (tests compare cached with full encodings on random conversations).

:class:`PrefixCache` keeps, per prefix, the text and its ids (an ``array`` of 4-byte ids), found
by the prefix's length and its last characters and confirmed by comparing the text. It is
bounded by the ids it holds (:data:`DEFAULT_MAX_TOKENS`; about 4 MB, plus the texts), least
recently used first out.
"""

from __future__ import annotations

import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import tokenizers

__all__ = ["DEFAULT_MAX_TOKENS", "PrefixCache", "Specials", "is_cut_safe", "specials_of"]

DEFAULT_MAX_TOKENS = 1_000_000
_TAIL = 64


class Specials(NamedTuple):
    """A tokenizer's special tokens, as far as cutting a text after them goes."""

    tokens: tuple[str, ...]
    pattern: re.Pattern[str]
    strips: bool
    """Whether some added token strips whitespace next to it (no cut before whitespace)."""

    def cut_points(self, text: str) -> list[int]:
        """The positions right after a special token where ``text`` may be cut (ascending)."""
        cuts = []
        n = len(text)
        strips = self.strips
        for m in self.pattern.finditer(text):
            end = m.end()
            if end >= n or (strips and text[end].isspace()):
                continue
            cuts.append(end)
        return cuts


def specials_of(tokenizer: tokenizers.Tokenizer) -> Specials | None:
    """The tokenizer's special tokens; None when it has none."""
    added = tokenizer.get_added_tokens_decoder().values()
    tokens = sorted({t.content for t in added if t.special and t.content}, key=len, reverse=True)
    if not tokens:
        return None
    strips = any(t.lstrip or t.rstrip for t in added)
    return Specials(tuple(tokens), re.compile("|".join(map(re.escape, tokens))), strips)


def is_cut_safe(tokenizer: tokenizers.Tokenizer, specials: Specials) -> bool:
    """Whether encoding a text in pieces cut after its special tokens gives the whole's ids."""
    encode = tokenizer.encode
    for token in specials.tokens[:4]:
        for text in (
            f"a{token}b c",
            f"Hello world{token}[INST] x y{token}z",
            f"{token}user\nHi there{token}\n{token}assistant\n",
            f"x {token}  y\n\nz",
            f"{token}{token}é ü {token}1",
        ):
            whole = encode(text, add_special_tokens=False).ids
            pieces: list[int] = []
            start = 0
            for cut in [*specials.cut_points(text), len(text)]:
                pieces += encode(text[start:cut], add_special_tokens=False).ids
                start = cut
            if pieces != whole:
                return False
    return True


class PrefixCache:
    """Prefix text -> its ids, bounded by the number of ids held; thread-safe."""

    __slots__ = ("_entries", "_lock", "_tokens", "max_tokens")

    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[int, str], tuple[str, array[int]]] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens(self) -> int:
        return self._tokens

    def longest(self, text: str, cuts: Sequence[int]) -> tuple[int, list[int]] | None:
        """The longest cached prefix of ``text`` ending at one of ``cuts``: (its end, its ids)."""
        with self._lock:
            entries = self._entries
            for cut in reversed(cuts):
                key = (cut, text[max(0, cut - _TAIL) : cut])
                entry = entries.get(key)
                if entry is not None and text.startswith(entry[0]):
                    entries.move_to_end(key)
                    return cut, entry[1].tolist()
        return None

    def put(self, prefix: str, ids: Sequence[int]) -> None:
        """Remember ``ids`` as the encoding of ``prefix``."""
        if len(ids) > self.max_tokens:
            return
        key = (len(prefix), prefix[-_TAIL:])
        stored = array("I", ids)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._tokens -= len(old[1])
            self._entries[key] = (prefix, stored)
            self._tokens += len(stored)
            while self._tokens > self.max_tokens:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._tokens -= len(dropped)
