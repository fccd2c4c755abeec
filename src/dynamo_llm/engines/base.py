"""The engine boundary.

An :class:`Engine` turns one :class:`EngineRequest` into a stream of :class:`EngineOutput`.

Lifecycle and guarantees:

1. ``stream = await engine.generate(request, ctx)`` admits the request. Anything wrong with it
   (prompt longer than the context window, no worker, overload) is raised here as a
   :class:`~dynamo_llm.errors.DynamoError`, before any output exists, so the frontend can still
   answer with a plain HTTP error even for a streaming request.
2. ``async for out in stream`` yields outputs. Each carries ``num_tokens`` new tokens for choice
   ``index``; the first output of a stream carries ``prompt_tokens`` (and ``prompt_token_ids``)
   when the engine knows it;
   the last carries ``finish_reason`` and ``usage`` (a count the engine does not know exactly
   is None, and is left out of the response). The stream ends normally after the last
   output. A failure mid-stream is raised as a ``DynamoError`` (its class says what kind).
3. ``ctx`` is the request's :class:`~dynamo_llm.runtime.context.EngineContext`. When it is stopped
   the engine stops producing within one token and ends the stream; when it is killed the engine
   stops at once and releases what it holds (KV blocks, an upstream connection). The frontend
   may also abandon the stream: it then calls ``aclose()`` on it (or cancels the task iterating
   it), and the engine must release everything in ``finally``.
4. ``await engine.aclose()`` releases the engine's own resources at shutdown.

An engine that passes requests on to another server rather than serving them (the router) says
so with a true ``forwards_unknown_fields`` attribute (:func:`forwards_unknown_fields`): the
frontend then accepts request fields it does not know for the engine's models, and leaves them to
the engine in ``raw_body``. Every other engine never sees such a request: the frontend answers
400 ``unsupported_parameter``, naming the field, since the engine could not honour it.

Outputs are msgspec Structs: an engine may build one per token, so they must be
cheap. ``raw`` is for relaying engines: already-rendered SSE bytes the frontend passes on as they
are (it still counts ``num_tokens``), so the hot path never parses and re-encodes a chunk it does
not need to change. ``chunks`` is for relaying engines too: where the frontend must fold or
re-render a worker's stream, the worker's chunks as it sent them, so that no field is lost.
``response`` is a relaying engine's whole unary answer, already in the client's shape, which
the frontend sends as it is instead of folding a stream.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import msgspec

from ..errors import ContextLengthExceeded
from ..runtime.context import EngineContext

if TYPE_CHECKING:
    from ..protocols.chat import ChatCompletionRequest, ChatMessage
    from ..protocols.completions import CompletionRequest

Endpoint = Literal["chat_completions", "completions"]


class Usage(msgspec.Struct, gc=False):
    """Token counts of one finished choice (or of a whole request once summed).

    A count is None when nobody knows it exactly (a worker that sent no usage, the prompt of a
    request continued as text on another worker): it is then left out of the response, never
    reported as 0. ``extra`` holds the other keys of a worker's usage object, passed on as they
    came (``completion_tokens_details``, the rest of ``prompt_tokens_details``, keys of its own).
    """

    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None = None
    extra: dict[str, Any] | None = None

    def __add__(self, other: Usage) -> Usage:
        """The counts of both: the one place usage is summed (over the choices of a request).

        An unknown count makes the sum unknown; numbers in ``extra`` are summed, anything else
        is the first one's.
        """
        return Usage(
            _add(self.prompt_tokens, other.prompt_tokens),
            _add(self.completion_tokens, other.completion_tokens),
            _add(self.cached_tokens, other.cached_tokens),
            _merge_extra(self.extra, other.extra),
        )

    @property
    def is_known(self) -> bool:
        """Whether any count is known (else there is no usage to report)."""
        return self.prompt_tokens is not None or self.completion_tokens is not None

    def without_prompt(self) -> Usage:
        """Only the completion side: for a choice whose prompt another choice already counted."""
        extra = self.extra
        if extra is not None and "prompt_tokens_details" in extra:
            extra = {k: v for k, v in extra.items() if k != "prompt_tokens_details"}
        return Usage(0, self.completion_tokens, 0, extra or None)


def _add(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def _merge_extra(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    if a is None or b is None:
        return a if b is None else b
    merged = dict(a)
    for key, value in b.items():
        mine = merged.get(key)
        if key not in merged or mine is None:
            merged[key] = value
        elif isinstance(mine, dict) and isinstance(value, dict):
            merged[key] = _merge_extra(mine, value)
        elif _is_number(mine) and _is_number(value):
            merged[key] = mine + value
    return merged


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class EngineOutput(msgspec.Struct, gc=False):
    """One item of an engine's stream.

    A msgspec Struct rather than a plain class: an engine may build one per token, and a Struct
    is built about four times faster (its ``__init__`` is native). ``gc=False``: an output holds
    no reference cycles, so the collector need not track it.
    """

    text: str = ""
    num_tokens: int = 1
    index: int = 0
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    prompt_tokens: int | None = None
    raw: bytes | None = None
    # The prompt's token ids, on a stream's first output when the engine knows them (vLLM's
    # ``prompt_token_ids`` with ``return_token_ids``, which the frontend writes where vLLM does:
    # on a chat's chunk or response, on a completion's choice): what a migration replays exactly.
    prompt_token_ids: list[int] | None = None
    # A relaying engine's parsed outputs: the worker's chunks this output stands for, decoded
    # as they came, so that folding, fan-out and migration keep every field (tool calls,
    # logprobs, keys of the engine's own). In the relay modes only the usage chunk, which is
    # not relayed: its other keys (llama.cpp's ``timings``) go on the frontend's usage chunk.
    chunks: list[dict[str, Any]] | None = None
    # A relaying engine's whole unary answer (a one-choice request asked of its worker, one of
    # ours, as unary, since nothing needed its events): the response body in the client's
    # shape, our id and model name in it, passed on as it is. It is the stream's only output,
    # and its ``usage`` is the answer's (``num_tokens`` its completion count, or 1 when unknown).
    response: bytes | None = None


class OwnedStream:
    """An engine stream that gives back what it holds when closed, even if never iterated.

    An async generator's ``finally`` only runs once the generator has started; a stream that
    ``generate()`` handed out but nobody iterated (the client left in between) would keep its
    resources (a worker's in-flight slot, an upstream connection) forever. ``aclose()`` here
    closes the generator and then runs ``release`` in every case; ``release`` must be
    idempotent (the generator's own ``finally`` should call it too).
    """

    __slots__ = ("_gen", "_release")

    def __init__(
        self,
        gen: AsyncGenerator[EngineOutput, None],
        release: Callable[[], Awaitable[None]],
    ) -> None:
        self._gen = gen
        self._release = release

    def __aiter__(self) -> AsyncIterator[EngineOutput]:
        # The generator itself: iterating it directly saves a Python call per item, and
        # closing still goes through :meth:`aclose`, whoever iterates.
        return self._gen

    def __anext__(self) -> Awaitable[EngineOutput]:
        return self._gen.__anext__()

    async def aclose(self) -> None:
        try:
            await self._gen.aclose()
        finally:
            await self._release()


async def aclose_stream(stream: AsyncIterator[EngineOutput]) -> None:
    """Close an engine stream if it can be closed (async generators and OwnedStream can)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


class Sampling(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The client's sampling options, for an engine that honours them (None: not sent)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None


class RoutingHint(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What the client said about where its request should run.

    ``worker_id`` is the worker it asked for (``X-Worker-Instance-Id``, at most 256
    characters), which the router's direct mode obeys. What kv routing reads, the prompt's text,
    is the request's own content (``messages`` or ``prompt``), not a hint.
    """

    worker_id: str | None = None


NO_ROUTING_HINT = RoutingHint()


class EngineRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What an engine is asked to do: one prompt, one choice.

    Built by the endpoint family's descriptor (:mod:`~dynamo_llm.engines.endpoints`), which
    reads the client's request once: an engine reads these typed fields, never the OpenAI
    request itself.

    - ``messages`` (chat) or ``prompt`` (completions: text or token ids; one prompt of a batch).
    - ``sampling``, ``max_tokens`` (the completion budget; None: up to the context window),
      ``stop`` (the stop sequences), and for chat the template switches
      ``add_generation_prompt`` and ``continue_final_message``.
    - ``params`` is the client's validated request (the fields we know) and ``raw_body`` the JSON
      it sent, every key included, for an engine that passes the request on: it sends
      ``raw_body`` with only what it must change replaced (``transport/body.py``). A migration's
      replay carries the client's JSON with the replay's changes made.
    - ``routing``: the client's routing hint.
    """

    id: str
    model: str
    endpoint: Endpoint
    params: ChatCompletionRequest | CompletionRequest
    messages: Sequence[ChatMessage] = ()
    prompt: str | list[int] | None = None
    sampling: Sampling = Sampling()
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    raw_body: bytes | None = None
    routing: RoutingHint = NO_ROUTING_HINT

    def __repr__(self) -> str:
        return f"EngineRequest(id={self.id!r}, model={self.model!r}, endpoint={self.endpoint!r})"


class Engine(Protocol):
    """An inference engine: see the module docstring for the lifecycle."""

    async def generate(
        self, request: EngineRequest, ctx: EngineContext
    ) -> AsyncIterator[EngineOutput]: ...

    async def aclose(self) -> None: ...


def forwards_unknown_fields(engine: Engine) -> bool:
    """Whether ``engine`` passes requests on with the fields the frontend does not know.

    An optional capability, not part of the protocol, so that an engine (a test's fake
    included) that does not declare it is taken to serve requests itself.
    """
    return getattr(engine, "forwards_unknown_fields", False) is True


def check_context_length(
    endpoint: Endpoint, prompt_tokens: int, max_tokens: int | None, context_length: int | None
) -> None:
    """Raise the OpenAI-worded 400 when the prompt (plus the completion) does not fit."""
    if context_length is None:
        return
    if endpoint == "chat_completions":
        if prompt_tokens > context_length or (
            max_tokens is not None and prompt_tokens + max_tokens > context_length
        ):
            wanted = prompt_tokens + (max_tokens or 0)
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context_length} tokens. However, you "
                f"requested {wanted} tokens ({prompt_tokens} in the messages, {max_tokens or 0} "
                "in the completion). Please reduce the length of the messages or completion.",
                param="messages",
            )
    else:
        completion = max_tokens or 0
        if prompt_tokens + completion > context_length:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context_length} tokens, however you "
                f"requested {prompt_tokens + completion} tokens ({prompt_tokens} in your prompt; "
                f"{completion} for the completion). Please reduce your prompt; or completion "
                "length.",
                param="prompt",
            )
