"""The endpoint families: what a chat or a completions request asks of an engine.

A descriptor per family (:data:`CHAT`, :data:`COMPLETIONS`) is the one place that knows the
family's shape. It decodes and validates a body into the OpenAI request, splits that request into
the sub-requests an engine serves (one per prompt of a completions batch, times ``n``), builds
each :class:`~dynamo_llm.engines.base.EngineRequest` from it, and names what the client gets back
(the response ``kind`` the renderers use, the id prefix, the path).

The descriptors live with the engines, not in the HTTP layer, because more than the HTTP layer
builds requests: a migration (``router/continuation.py``) builds its replay from a changed OpenAI
request through :meth:`ChatEndpoint.request` or :meth:`CompletionsEndpoint.request`, and the
router's transport names the upstream path and the response id the same way.

Sub-requests have ids ``<id>-<k>`` (just ``<id>`` when there is one) and choice index
``k = prompt_index * n + i``; see :mod:`~dynamo_llm.engines.fanout`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Generic, Literal, NamedTuple, TypeVar

from ..protocols.chat import (
    ChatCompletionRequest,
    ChatMessage,
    decode_chat_request,
    max_output_tokens,
)
from ..protocols.common import AcceptsUnknown, stop_list
from ..protocols.completions import CompletionRequest, decode_completion_request, prompts
from .base import NO_ROUTING_HINT, Endpoint, EngineRequest, RoutingHint, Sampling

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "ChatEndpoint",
    "CompletionsEndpoint",
    "EndpointFamily",
    "P",
    "family_of",
]

P = TypeVar("P", ChatCompletionRequest, CompletionRequest)
"""A family's OpenAI request type (for code generic over the two families)."""

DEFAULT_COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _sampling(params: ChatCompletionRequest | CompletionRequest) -> Sampling:
    return Sampling(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        seed=params.seed,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        repetition_penalty=params.repetition_penalty,
        min_tokens=params.min_tokens,
        ignore_eos=params.ignore_eos,
    )


class _Content(NamedTuple):
    messages: Sequence[ChatMessage] = ()
    prompt: str | list[int] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class EndpointFamily(ABC, Generic[P]):
    """What the two families share: naming, and the split into sub-requests."""

    def __init__(
        self,
        endpoint: Endpoint,
        path: str,
        kind: Literal["chat", "completions"],
        id_prefix: str,
        decode: Callable[[bytes, AcceptsUnknown | None], P],
    ) -> None:
        self.endpoint: Endpoint = endpoint
        """The family's name in metrics labels and on an engine request."""
        self.path = path
        """Where the family is served (and where a relay sends it upstream)."""
        self.kind: Literal["chat", "completions"] = kind
        """The response shape, for the SSE renderer and the unary aggregator."""
        self.id_prefix = id_prefix
        self._decode: Callable[[bytes, AcceptsUnknown | None], P] = decode

    def decode(self, body: bytes, accepts_unknown: AcceptsUnknown | None = None) -> P:
        """Decode and validate a body; raises :class:`~dynamo_llm.errors.DynamoError`.

        An unknown top-level field is a 400 unless ``accepts_unknown(model)`` (the model's engine
        forwards what it does not know; the field then stays in the raw body only).
        """
        return self._decode(body, accepts_unknown)

    @abstractmethod
    def budget(self, params: P) -> int | None:
        """The completion budget the client asked for (with the family's default)."""

    @abstractmethod
    def batch(self, params: P) -> Sequence[str | list[int] | None]:
        """The prompts of the request (None: the chat messages)."""

    @abstractmethod
    def _content(self, params: P, prompt: str | list[int] | None) -> _Content:
        """What the request asks about: the messages, or which prompt of the batch."""

    def request(
        self,
        params: P,
        prompt: str | list[int] | None = None,
        *,
        id: str,
        model: str,
        max_tokens: int | None,
        raw_body: bytes | None = None,
        routing: RoutingHint = NO_ROUTING_HINT,
    ) -> EngineRequest:
        """One engine request for ``params``: for completions ``prompt`` says which prompt (None:
        the request's only one), for chat it must be None. ``max_tokens`` is the budget
        (:meth:`budget` for the client's own; a migration's replay gives what is left)."""
        content = self._content(params, prompt)
        return EngineRequest(
            id=id,
            model=model,
            endpoint=self.endpoint,
            params=params,
            messages=content.messages,
            prompt=content.prompt,
            sampling=_sampling(params),
            max_tokens=max_tokens,
            stop=stop_list(params),
            add_generation_prompt=content.add_generation_prompt,
            continue_final_message=content.continue_final_message,
            raw_body=raw_body,
            routing=routing,
        )

    def response_id(self, request_id: str) -> str:
        """The id of the response the client gets: ``chatcmpl-<id>`` or ``cmpl-<id>``."""
        return self.id_prefix + request_id

    def split(
        self,
        params: P,
        *,
        request_id: str,
        model: str,
        raw_body: bytes | None = None,
        routing: RoutingHint = NO_ROUTING_HINT,
    ) -> list[EngineRequest]:
        """The sub-requests of ``params``: one per prompt of the batch, times ``n``."""
        n = params.n or 1
        batch = self.batch(params)
        max_tokens = self.budget(params)
        total = len(batch) * n
        return [
            self.request(
                params,
                prompt,
                id=request_id if total == 1 else f"{request_id}-{p_index * n + i}",
                model=model,
                max_tokens=max_tokens,
                raw_body=raw_body,
                routing=routing,
            )
            for p_index, prompt in enumerate(batch)
            for i in range(n)
        ]


class ChatEndpoint(EndpointFamily[ChatCompletionRequest]):
    """``/v1/chat/completions``: one sub-request per choice, all on the same messages."""

    def budget(self, params: ChatCompletionRequest) -> int | None:
        return max_output_tokens(params)

    def batch(self, params: ChatCompletionRequest) -> Sequence[None]:
        return (None,)

    def _content(self, params: ChatCompletionRequest, prompt: str | list[int] | None) -> _Content:
        if prompt is not None:
            raise ValueError("a chat request has messages, not a prompt")
        return _Content(
            messages=params.messages,
            add_generation_prompt=params.add_generation_prompt,
            continue_final_message=params.continue_final_message,
        )


class CompletionsEndpoint(EndpointFamily[CompletionRequest]):
    """``/v1/completions``: one sub-request per prompt of the batch and choice."""

    def budget(self, params: CompletionRequest) -> int | None:
        if params.max_tokens is not None:
            return params.max_tokens
        return DEFAULT_COMPLETIONS_MAX_TOKENS

    def batch(self, params: CompletionRequest) -> Sequence[str | list[int]]:
        return prompts(params)

    def _content(self, params: CompletionRequest, prompt: str | list[int] | None) -> _Content:
        if prompt is None:
            batch = prompts(params)
            if len(batch) != 1:
                raise ValueError("a batch of prompts: say which one the request is for")
            prompt = batch[0]
        return _Content(prompt=prompt)


CHAT = ChatEndpoint(
    "chat_completions", "/v1/chat/completions", "chat", "chatcmpl-", decode_chat_request
)
COMPLETIONS = CompletionsEndpoint(
    "completions", "/v1/completions", "completions", "cmpl-", decode_completion_request
)


def family_of(request: EngineRequest) -> ChatEndpoint | CompletionsEndpoint:
    """The family a request belongs to."""
    return CHAT if request.endpoint == "chat_completions" else COMPLETIONS
