"""One request inside the mocker: its tokens, its KV bookkeeping, its text and its outputs.

The scheduler owns the :class:`Sequence` (status, blocks, computed tokens); the stream that the
engine hands to the frontend reads the sequence's :class:`OutputChannel`. Text is produced as
tokens are generated: the detokenizer gives each token's text, and :class:`StopMatcher` cuts the
text before the first stop string and holds back any tail that could still become one (as vLLM
does), so a client never sees part of a stop string.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable, Iterator

from ..base import EngineOutput, Usage
from .tokens import MockTokenizer, next_token_id, seed_key

_ROOT_HASH = 0x9E3779B97F4A7C15  # parent "hash" of a sequence's first block


class SeqStatus(enum.IntEnum):
    NEW = 0
    WAITING = 1
    RUNNING = 2
    FINISHED = 3


HELD_OUTPUTS = 64
"""Outputs a stream may hold undelivered before its sequence pauses (its consumer, the frontend,
stopped pulling because the client does not read): the engine side of backpressure."""


class OutputChannel:
    """A single-consumer queue of outputs, closed with an optional error.

    ``is_full`` once it holds :data:`HELD_OUTPUTS`; ``on_drain`` is called when the consumer
    takes one from a full channel (the scheduler resumes the sequence).
    """

    __slots__ = ("_error", "_items", "_waiter", "closed", "on_drain")

    def __init__(self) -> None:
        self._items: deque[EngineOutput] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.closed = False
        self.on_drain: Callable[[], None] | None = None

    @property
    def is_full(self) -> bool:
        return len(self._items) >= HELD_OUTPUTS

    def put(self, item: EngineOutput) -> None:
        self._items.append(item)
        self._wake()

    def close(self, error: BaseException | None = None) -> None:
        if not self.closed:
            self.closed = True
            self._error = error
            self._wake()

    async def get(self) -> EngineOutput | None:
        """The next output; None once closed and drained; raises the close error if any."""
        while not self._items:
            if self.closed:
                if self._error is not None:
                    raise self._error
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = self._items
        item = items.popleft()
        if len(items) == HELD_OUTPUTS - 1 and self.on_drain is not None:
            self.on_drain()
        return item

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class StopMatcher:
    """Cuts generated text at the first stop string, holding back a possible partial match."""

    __slots__ = ("_pending", "_stops")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._pending = ""  # generated text not released yet

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add ``delta``; return the text that may be released and whether a stop matched."""
        pending = self._pending + delta
        cut = -1
        for stop in self._stops:
            pos = pending.find(stop)
            if pos != -1 and (cut == -1 or pos < cut):
                cut = pos
        if cut != -1:
            self._pending = ""
            return pending[:cut], True
        # Any stop occurrence must start inside the held-back tail, so searching only the
        # pending text is enough: hold back the longest suffix that begins some stop string.
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(pending)), hold, -1):
                if pending.endswith(stop[:k]):
                    hold = k
                    break
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold], False

    def flush(self) -> str:
        """Release the held-back text (the stream ends for another reason)."""
        text, self._pending = self._pending, ""
        return text


class Sequence:
    """The scheduler's view of one request (prompt + generated ids, KV state, outputs)."""

    __slots__ = (
        "_block_hashes",
        "_block_size",
        "_detok",
        "_key",
        "_stops",
        "_tokenizer",
        "blocks",
        "cached_tokens",
        "channel",
        "is_prefilled",
        "max_tokens",
        "num_computed",
        "num_registered",
        "prompt_len",
        "request_id",
        "status",
        "token_ids",
    )

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        *,
        max_tokens: int,
        seed: int,
        stop: tuple[str, ...],
        tokenizer: MockTokenizer,
        block_size: int,
    ) -> None:
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.max_tokens = max_tokens
        self.status = SeqStatus.NEW
        self.channel = OutputChannel()
        # KV state, owned by the scheduler.
        self.blocks: list[int] = []
        self.num_computed = 0  # tokens whose KV is in `blocks`
        self.num_registered = 0  # leading blocks published in the prefix cache
        self.is_prefilled = False  # (re)prefill done: each pass now computes one token
        self.cached_tokens: int | None = None  # prompt tokens hit in the cache at first admission
        self._block_size = block_size
        self._block_hashes: list[int] = []
        self._tokenizer = tokenizer
        self._key = seed_key(seed)
        self._detok = tokenizer.detokenizer(self.prompt_len)
        stops = tuple(s for s in stop if s)
        self._stops = StopMatcher(stops) if stops else None

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.name}, tokens={len(self.token_ids)}, "
            f"computed={self.num_computed}, blocks={len(self.blocks)})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    def block_hashes(self, n: int) -> list[int]:
        """Chained hashes of the first ``n`` full blocks (computed once, then remembered)."""
        hashes = self._block_hashes
        bs = self._block_size
        ids = self.token_ids
        while len(hashes) < n:
            j = len(hashes)
            parent = hashes[-1] if hashes else _ROOT_HASH
            hashes.append(hash((parent, *ids[j * bs : (j + 1) * bs])))
        return hashes[:n] if len(hashes) > n else hashes

    def iter_block_hashes(self, n: int) -> Iterator[int]:
        """:meth:`block_hashes` one at a time, each computed when reached: a prefix-cache lookup
        stops at its first miss, so a long new prompt is not hashed whole at admission."""
        hashes = self._block_hashes
        for j in range(n):
            if j == len(hashes):
                self.block_hashes(j + 1)
            yield hashes[j]

    def generate_token(self) -> bool:
        """Append the next token and queue its output; True when the sequence has finished."""
        token_id = next_token_id(self.token_ids, self._key, self._tokenizer)
        self.token_ids.append(token_id)
        generated = self.num_generated
        text = self._detok.step(self.token_ids)
        finish: str | None = None
        if self._stops is not None:
            text, matched = self._stops.feed(text)
            if matched:
                finish = "stop"
        if finish is None and generated >= self.max_tokens:
            finish = "length"
            if self._stops is not None:
                text += self._stops.flush()
        usage = None
        if finish is not None:
            usage = Usage(self.prompt_len, generated, self.cached_tokens or 0)
        self.channel.put(
            EngineOutput(
                text,
                1,
                token_ids=[token_id],
                finish_reason=finish,
                usage=usage,
                prompt_tokens=self.prompt_len if generated == 1 else None,
                prompt_token_ids=self.token_ids[: self.prompt_len] if generated == 1 else None,
            )
        )
        return finish is not None
