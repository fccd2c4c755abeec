"""The replay: the request that continues a migrated one on another worker (SPEC §9).

:class:`~.migration.MigrationState` knows what the request has produced so far; this module turns
that into the request the next worker gets, which asks for exactly the rest of the answer:

- **Token-exact**, when the first worker reported the prompt's token ids (vLLM's
  ``prompt_token_ids``) and the id of every generated token (``return_token_ids``): the replay
  is a completions request whose prompt is ``prompt ids + generated ids``, sent to
  ``/v1/completions`` even for a chat request (the chat template was already applied). A
  deterministic engine continues exactly where the first one stopped.
- **Text continuation** otherwise (a worker that reports no token ids): a completions prompt
  gets the generated text appended; a chat request gets the generated text as a final partial
  assistant message with ``continue_final_message: true`` and ``add_generation_prompt: false``.

Either way ``max_tokens`` (and ``min_tokens``) are reduced by what was generated and the sampling
options are unchanged (a chat's ``logprobs``/``top_logprobs`` become the completions
``logprobs``). A chat request with ``tools`` continues as text on the chat endpoint, never as
token ids on ``/v1/completions``, where no tool parser would read the rest of a call.

The replay is passed on like the request itself: its ``raw_body`` is the client's JSON with the
replay's changes made (:func:`_replay_body`), so every field the frontend does not know, and
every key nested in the messages, reaches the new worker too. A chat request continued on
``/v1/completions`` leaves the fields only chat has behind (``messages``, ``tools``, ...) and
keeps the rest, the unknown ones included.

:func:`prompt_count_request` is the other request a migration may send: the original one with
``max_tokens: 1``, whose usage is an engine's own count of the original prompt.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from ..engines.base import EngineRequest
from ..engines.endpoints import CHAT, COMPLETIONS, EndpointFamily, P
from ..protocols.chat import ChatCompletionRequest, ChatMessage
from ..protocols.common import decode_object, struct_fields
from ..protocols.completions import CompletionRequest

__all__ = ["build_replay", "prompt_count_request"]


def build_replay(
    request: EngineRequest,
    *,
    generated: int,
    remaining: int | None,
    prompt_ids: list[int] | None,
    generated_ids: list[int],
    text: str,
) -> EngineRequest | None:
    """The request continuing ``request`` after ``generated`` tokens; None when impossible.

    ``prompt_ids``: the prompt's token ids when every generated token's id is known too
    (``generated_ids``: the replay is token-exact), else None and ``text`` is continued.
    ``remaining``: what is left of ``max_tokens`` (None: no limit).
    """
    if not generated:
        return request  # nothing to continue: the request itself
    params = request.params
    min_tokens = params.min_tokens
    if min_tokens is not None:
        min_tokens = max(0, min_tokens - generated) or None
    if prompt_ids is not None and not (isinstance(params, ChatCompletionRequest) and params.tools):
        prompt: list[int] = prompt_ids + generated_ids
        replay = _as_completions(params, prompt, remaining, min_tokens)
        return _replay(request, COMPLETIONS, replay, prompt, remaining)
    if isinstance(params, ChatCompletionRequest):
        replay_chat = _continue_chat(params, text, remaining, min_tokens)
        return _replay(request, CHAT, replay_chat, None, remaining)
    original = request.prompt if request.prompt is not None else params.prompt
    if not isinstance(original, str):
        return None  # token ids without the generated ids: no way to append the text
    prompt_text = original + text
    replay_completion = msgspec.structs.replace(
        params, prompt=prompt_text, max_tokens=remaining, min_tokens=min_tokens, echo=None
    )
    return _replay(request, COMPLETIONS, replay_completion, prompt_text, remaining)


def prompt_count_request(request: EngineRequest) -> EngineRequest | None:
    """``request`` asking for one token, whose usage counts its prompt; None for a completion
    whose prompt is not text."""
    params = request.params
    if isinstance(params, ChatCompletionRequest):
        key = "max_tokens" if params.max_completion_tokens is None else "max_completion_tokens"
        chat = msgspec.structs.replace(params, min_tokens=None, **{key: 1})
        return _replay(request, CHAT, chat, None, 1)
    prompt = request.prompt if request.prompt is not None else params.prompt
    if not isinstance(prompt, str):
        return None
    one = msgspec.structs.replace(params, max_tokens=1, min_tokens=None, echo=None)
    return _replay(request, COMPLETIONS, one, prompt, 1)


def _replay(
    request: EngineRequest,
    family: EndpointFamily[P],
    params: P,
    prompt: str | list[int] | None,
    max_tokens: int | None,
) -> EngineRequest:
    """The replay as an engine request: built like any other, keeping the id, the served model
    name and the client's routing hint, and passed on as the client's JSON with its changes."""
    return family.request(
        params,
        prompt,
        id=request.id,
        model=request.model,
        max_tokens=max_tokens,
        raw_body=_replay_body(request, params),
        routing=request.routing,
    )


def _replay_body(
    request: EngineRequest, replay: ChatCompletionRequest | CompletionRequest
) -> bytes | None:
    """The client's JSON with the replay's changes: what the replay changed of the fields we
    know (removed when it cleared them or its endpoint has no such field), everything else as
    the client sent it, unknown fields and the messages the replay left alone included.

    None when the request has no body to patch: the transport then encodes the replay's Struct.
    """
    body = decode_object(request.raw_body)
    if body is None:
        return None
    params = request.params
    for name in _field_names(params) - _field_names(replay):
        body.pop(name, None)
    for name in _field_names(replay):
        value = getattr(replay, name)
        before = getattr(params, name, None)
        if value == before and type(value) is type(before):
            continue  # unchanged: as the client sent it (a chat's `logprobs: true` is not 1)
        if name == "messages" and isinstance(before, list):
            body[name] = _messages_as_sent(body.get(name), before, value)
        elif value is None:
            body.pop(name, None)
        else:
            body[name] = msgspec.to_builtins(value)
    return msgspec.json.encode(body)


def _field_names(params: msgspec.Struct) -> frozenset[str]:
    return struct_fields(type(params))


def _messages_as_sent(
    sent: Any, before: Iterable[ChatMessage], after: list[ChatMessage]
) -> list[Any]:
    """The replay's messages as the client wrote them: a message the replay kept goes byte for
    byte; a changed one is the client's with the changed keys (keys we do not model kept)."""
    wire = _decode_messages(sent) if isinstance(sent, msgspec.Raw) else []
    kept = list(before)
    out: list[Any] = []
    for i, message in enumerate(after):
        if i < len(kept) and i < len(wire) and message == kept[i]:
            out.append(wire[i])
            continue
        original = msgspec.json.decode(wire[i]) if i < len(kept) and i < len(wire) else None
        base = original if isinstance(original, dict) else {}
        out.append({**base, **msgspec.to_builtins(message)})
    return out


_decode_messages = msgspec.json.Decoder(list[msgspec.Raw]).decode


def _as_completions(
    params: ChatCompletionRequest | CompletionRequest,
    prompt: list[int],
    remaining: int | None,
    min_tokens: int | None,
) -> CompletionRequest:
    if isinstance(params, CompletionRequest):
        return msgspec.structs.replace(
            params, prompt=prompt, max_tokens=remaining, min_tokens=min_tokens, echo=None
        )
    # A chat request continued as token ids: the template is already in the ids. Only the
    # options a completions request has are carried over (sampling, stop, seed, extensions).
    ids: list[str | int | list[int]] = list(prompt)
    return CompletionRequest(
        model=params.model,
        prompt=ids,
        max_tokens=remaining,
        min_tokens=min_tokens,
        frequency_penalty=params.frequency_penalty,
        logit_bias=params.logit_bias,
        logprobs=(params.top_logprobs or 0) if params.logprobs else None,
        presence_penalty=params.presence_penalty,
        seed=params.seed,
        stop=params.stop,
        stream=params.stream,
        stream_options=params.stream_options,
        temperature=params.temperature,
        top_p=params.top_p,
        user=params.user,
        top_k=params.top_k,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        ignore_eos=params.ignore_eos,
        nvext=params.nvext,
    )


def _continue_chat(
    params: ChatCompletionRequest, text: str, remaining: int | None, min_tokens: int | None
) -> ChatCompletionRequest:
    messages = list(params.messages)
    last = messages[-1]
    if params.continue_final_message and last.role == "assistant":
        # The client was already continuing this message: continue it further.
        messages[-1] = msgspec.structs.replace(last, content=last.text_content() + text)
    else:
        messages.append(ChatMessage(role="assistant", content=text))
    budget: dict[str, int | None] = (
        {"max_completion_tokens": remaining}
        if params.max_completion_tokens is not None
        else {"max_tokens": remaining}
    )
    return msgspec.structs.replace(
        params,
        messages=messages,
        continue_final_message=True,
        add_generation_prompt=False,
        min_tokens=min_tokens,
        **budget,
    )
