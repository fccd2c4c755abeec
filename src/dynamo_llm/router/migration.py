"""Migration: what a request has produced so far, across its attempts (SPEC §9).

When an attempt fails with a *migratable* error (the worker could not be reached, dropped the
stream, ended it without its terminal item, said it is shutting down, or fell silent past the
router's limit) the router may send the request to another worker. The client must see one
continuous stream. A :class:`MigrationState` follows the request's outputs across attempts: the
tokens, text and token ids generated (from the raw relay's bytes only when a replay needs them,
:mod:`.replay_buffer`), the first attempt's prompt; and builds the replay that asks the next
worker for exactly the rest of the answer (:mod:`.continuation`: token-exact or as text).

The replay's outputs are fixed up before the client sees them: they no longer carry the
replay's own prompt (``prompt_tokens``, ``prompt_token_ids``) or a second ``role``; a chat
continued on ``/v1/completions`` gets its chunks back in the chat shape (``text`` as
``delta.content``, completions logprobs as chat logprobs); a completion's ``text_offset`` counts
from the start of the whole answer. The final ``usage`` is the request's own: the *original*
prompt's size, every token generated across attempts, and the cached prompt tokens only as the
first attempt's engine reported them; the replay's other usage keys describe the replay, not the
request, and are dropped. The original prompt's size comes from the first attempt's prompt ids
or count; an engine that reports neither before its last chunk (llama.cpp) and died first leaves
it unknown, and the replay's prompt (the original plus the text, tokenized anew) does not tell
it. The router then asks a worker for it, before the replay's usage goes out: the request itself
with ``max_tokens: 1`` (:meth:`MigrationState.prompt_count_request`), whose usage is the
engine's own count of the original prompt (left out if that fails; never a guess).

Not replayable, so the budget is 0 whatever the limit: structured output (``response_format``
``json_schema``/``json_object``; guided decoding in ``nvext`` or as an engine's own top-level
field, vLLM's ``guided_*``/``structured_outputs``, llama.cpp's ``grammar``/``json_schema``,
SGLang's ``regex``/``ebnf``: the grammar's state cannot move) and ``n > 1``. Once a tool call
has begun streaming the request cannot move at all (the parser's state is the worker's).
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..engines.base import EngineOutput, EngineRequest, Usage
from ..protocols.chat import ChatCompletionRequest
from ..protocols.stream import chat_choice
from .continuation import build_replay, prompt_count_request
from .replay_buffer import ReplayBuffer, mentions_tool_call, strip_token_ids

__all__ = ["MigrationState", "migration_budget"]


_STRUCTURED_FORMATS = frozenset({"json_schema", "json_object"})
_GUIDED_FIELDS = (
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
)


class _Constraints(msgspec.Struct):
    """The top-level fields by which an engine constrains its output to a grammar (fields the
    frontend does not know, passed on as they are)."""

    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    grammar: Any = None
    json_schema: Any = None
    regex: Any = None
    ebnf: Any = None


_decode_constraints = msgspec.json.Decoder(_Constraints).decode


def migration_budget(request: EngineRequest, limit: int) -> int:
    """How many times ``request`` may migrate: ``limit``, or 0 when it cannot be replayed."""
    if limit <= 0:
        return 0
    params = request.params
    if (params.n or 1) > 1:
        return 0
    if isinstance(params, ChatCompletionRequest):
        response_format = params.response_format
        if response_format is not None and response_format.get("type") in _STRUCTURED_FORMATS:
            return 0
    nvext = params.nvext
    if nvext and any(nvext.get(name) is not None for name in _GUIDED_FIELDS):
        return 0
    if request.raw_body is not None and _is_constrained(request.raw_body):
        return 0
    return limit


def _is_constrained(body: bytes) -> bool:
    try:
        found = _decode_constraints(body)
    except msgspec.MsgspecError:
        return False  # a number no float holds, somewhere: nothing that tells of a grammar
    return any(value is not None for value in msgspec.structs.astuple(found))


class MigrationState:
    """One request's progress across attempts, and the replay that continues it."""

    __slots__ = (
        "_as_chat",
        "_before",
        "_cached",
        "_counting",
        "_exact",
        "_finished",
        "_prompt_ids",
        "_prompt_tokens",
        "_raw",
        "_replaying",
        "_text_before",
        "_texts",
        "_tool_call",
        "budget",
        "generated",
        "generated_ids",
        "request",
    )

    def __init__(self, request: EngineRequest, budget: int) -> None:
        self.request = request
        self.budget = budget
        self.generated = 0  # tokens generated so far, across attempts
        self.generated_ids: list[int] = []
        self._texts: list[str] = []
        self._exact = True  # every generated token's id is known
        self._prompt_ids: list[int] | None = None
        self._prompt_tokens: int | None = None
        self._cached: int | None = None  # as the first attempt's engine reported it
        self._replaying = False
        self._before = 0  # tokens generated before the current replay
        self._text_before = 0  # characters of text generated before the current replay
        self._as_chat = False  # the replay runs on /v1/completions for a chat request
        self._tool_call = False  # a tool call has begun streaming
        self._finished = False
        self._raw = ReplayBuffer()  # relayed bytes not parsed yet
        self._counting = False  # the prompt's count was asked for

    @property
    def is_token_exact(self) -> bool:
        return self._exact and self._prompt_ids is not None

    @property
    def remaining_tokens(self) -> int | None:
        """What is left of the request's ``max_tokens`` (None: no limit was set)."""
        max_tokens = self.request.max_tokens
        return None if max_tokens is None else max_tokens - self.generated

    def observe(self, out: EngineOutput) -> EngineOutput:
        """Record an output of the current attempt; return it as the client should see it.

        The worker's relayed bytes (the raw relay, kept with migration on: the worker was asked
        for token ids, and nothing was parsed) are only kept, in the replay buffer, to be parsed
        if the request migrates (:meth:`next_replay`); the client gets them without the token
        ids it did not ask for.
        """
        raw = out.raw
        if raw and (self._raw or (out.token_ids is None and out.chunks is None and not out.text)):
            return self._keep_raw(out, raw)
        if self._raw and out.num_tokens:
            self._parse_raw()  # what came before this output first, to keep the order
        if out.num_tokens:
            ids = out.token_ids
            if ids is not None and len(ids) == out.num_tokens and self._exact:
                self.generated_ids.extend(ids)
            else:
                self._exact = False
            self.generated += out.num_tokens
        if out.text:
            self._texts.append(out.text)
        if out.finish_reason is not None:
            self._finished = True
        if not self._tool_call:
            if out.chunks is not None:
                self._tool_call = any(_has_tool_call(chunk) for chunk in out.chunks)
            elif out.raw:  # the worker's own bytes (the tracked mode): a call is in them
                self._tool_call = mentions_tool_call(out.raw)
        if raw and not self._keeps_ids:
            out = msgspec.structs.replace(out, raw=strip_token_ids(raw)[0])
        if not self._replaying:
            self._note_prompt(out)
            return out
        # A replay's output: its prompt is not the client's.
        if out.prompt_token_ids is not None or out.prompt_tokens is not None:
            out = msgspec.structs.replace(out, prompt_token_ids=None, prompt_tokens=None)
        if out.chunks is not None:
            out.chunks = [self._client_chunk(chunk) for chunk in out.chunks]
        if out.usage is not None:
            out.usage = self._client_usage(out.usage)
        return out

    @property
    def _keeps_ids(self) -> bool:
        return bool(self.request.params.return_token_ids)

    def _note_prompt(self, out: EngineOutput) -> None:
        """The first attempt's prompt and cached tokens, from the outputs that carry them."""
        if out.prompt_token_ids is not None and self._prompt_ids is None:
            self._prompt_ids = list(out.prompt_token_ids)
            self._prompt_tokens = len(self._prompt_ids)
        elif out.prompt_tokens is not None and self._prompt_tokens is None:
            self._prompt_tokens = out.prompt_tokens
        if out.usage is not None and self._cached is None:
            self._cached = out.usage.cached_tokens

    def _keep_raw(self, out: EngineOutput, raw: bytes) -> EngineOutput:
        """A relayed output of the first attempt: its bytes into the replay buffer, parsed only
        if the request migrates; from the first one on, every output with bytes goes there, so
        that the buffer keeps the stream's order. The client gets the bytes without the token
        ids, and the output the number of tokens they listed (the relay counted events)."""
        num_tokens = out.num_tokens
        if not self._keeps_ids:
            stripped, extra = strip_token_ids(raw)
            if out.token_ids is None:  # parsed outputs counted their ids already
                num_tokens += extra
            out = msgspec.structs.replace(out, raw=stripped, num_tokens=num_tokens)
        self._raw.keep(raw, num_tokens)
        self.generated += num_tokens
        if not self._tool_call:
            self._tool_call = mentions_tool_call(raw)
        if out.finish_reason is not None:
            self._finished = True
        self._note_prompt(out)
        return out

    def _parse_raw(self) -> None:
        """The replay buffer parsed: its text and token ids join what was generated, in order."""
        self.generated -= self._raw.tokens
        for text, ids in self._raw.drain():
            if ids and self._exact:
                self.generated_ids.extend(ids)
            else:
                self._exact = False
            self.generated += len(ids) if ids else 1
            if text:
                self._texts.append(text)

    @property
    def lacks_prompt_count(self) -> bool:
        """A replay runs and the original prompt's size is unknown (and was not asked for)."""
        return self._replaying and self._prompt_tokens is None and not self._counting

    def prompt_count_request(self) -> EngineRequest | None:
        """The request asking for one token, whose usage counts the original prompt: once, for
        a replay whose first attempt never said the prompt's size (see the module doc); None
        when the count is known, was asked for already, or cannot be asked."""
        if not self.lacks_prompt_count:
            return None
        self._counting = True
        return prompt_count_request(self.request)

    def count_prompt(self, tokens: int) -> None:
        """The original prompt's size, as an engine counted it for :meth:`prompt_count_request`."""
        self._prompt_tokens = tokens

    def _client_chunk(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """A replay's chunk as the client's stream continues it."""
        fixed = {k: v for k, v in chunk.items() if k != "prompt_token_ids"}
        choices = chunk.get("choices")
        if choices:
            fixed["choices"] = [self._client_choice(c) for c in choices if isinstance(c, dict)]
        return fixed

    def _client_choice(self, choice: dict[str, Any]) -> dict[str, Any]:
        if self._as_chat:
            choice = chat_choice(choice)
        choice = {k: v for k, v in choice.items() if k != "prompt_token_ids"}
        delta = choice.get("delta")
        if isinstance(delta, dict) and "role" in delta:
            choice["delta"] = {k: v for k, v in delta.items() if k != "role"}
        logprobs = choice.get("logprobs")
        if self._text_before and isinstance(logprobs, dict):
            offsets = logprobs.get("text_offset")
            if isinstance(offsets, list):
                shift = self._text_before
                choice["logprobs"] = {
                    **logprobs,
                    "text_offset": [o + shift if isinstance(o, int) else o for o in offsets],
                }
        return choice

    def _client_usage(self, replay: Usage) -> Usage:
        completion = replay.completion_tokens
        return Usage(
            self._prompt_tokens,
            None if completion is None else self._before + completion,
            self._cached,
        )

    def next_replay(self) -> EngineRequest | None:
        """Take one migration from the budget and build its replay; None when impossible."""
        if self._raw:
            self._parse_raw()
        if self.budget <= 0 or self._finished:
            return None
        remaining = self.remaining_tokens
        if remaining is not None and remaining <= 0:
            return None
        if self._tool_call:
            return None  # a tool call in progress cannot be continued elsewhere
        replay = build_replay(
            self.request,
            generated=self.generated,
            remaining=remaining,
            prompt_ids=self._prompt_ids if self.is_token_exact else None,
            generated_ids=self.generated_ids,
            text="".join(self._texts),
        )
        if replay is None:
            return None
        self.budget -= 1
        # Nothing generated yet: the replay is the request itself, and its outputs are the
        # request's own (its prompt, its usage).
        self._replaying = self.generated > 0
        self._before = self.generated
        self._text_before = sum(map(len, self._texts))
        self._as_chat = replay.endpoint != self.request.endpoint
        return replay

    def take_retry(self) -> bool:
        """Take one migration from the budget for a dispatch that failed before any output."""
        if self.budget <= 0:
            return False
        self.budget -= 1
        return True


def _has_tool_call(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and delta.get("tool_calls"):
            return True
    return False
