"""Folding an engine's stream into one unary OpenAI response.

An in-process engine's outputs carry text, token ids, a finish reason and usage (the prompt's
token ids go where vLLM puts them: a chat response's top level, a completion's choice); a
worker's carry its chunks as it sent them (``EngineOutput.chunks``), which are folded field by
field by the rules of :mod:`dynamo_llm.protocols.fold`: the message's tool calls, reasoning and
refusal, the logprobs, and every key the engine added to a chunk, a choice or a delta reach the
response (top level, choice and message; a chunk's ``prompt_token_ids`` at the top level, a
choice's on its choice). The shape is the protocols' response models
(:class:`~dynamo_llm.protocols.chat.ChatCompletionResponse`,
:class:`~dynamo_llm.protocols.completions.CompletionResponse`), written as plain objects so that
those keys have a place. ``usage`` is the engines' own count, summed over the choices, and left
out when it is not known.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..engines.base import EngineOutput, Usage
from ..protocols.common import usage_info
from ..protocols.fold import merge_delta, merge_last, merge_logprobs

_encode = msgspec.json.encode

# What a worker's chunk, choice and delta carry that the fold writes itself.
_ENVELOPE = frozenset({"id", "object", "created", "model", "choices", "usage", "prompt_token_ids"})
_CHOICE = frozenset({"index", "delta", "text", "logprobs", "finish_reason", "token_ids"})


class _Choice:
    """One choice being folded: its text parts, the rest of its message, logprobs and the
    worker's other keys."""

    __slots__ = ("extra", "finish", "logprobs", "message", "parts", "token_ids")

    def __init__(self) -> None:
        # Top-level strings of the deltas (content, reasoning_content, refusal, ...) or the
        # completion's text, joined once at the end.
        self.parts: dict[str, list[str]] = {}
        self.message: dict[str, Any] = {}
        self.logprobs: dict[str, Any] | None = None
        self.finish: str | None = None
        self.token_ids: list[int] = []
        self.extra: dict[str, Any] = {}

    def add_text(self, key: str, text: str) -> None:
        parts = self.parts.get(key)
        if parts is None:
            self.parts[key] = [text]
        else:
            parts.append(text)

    def add(self, choice: dict[str, Any]) -> None:
        """One worker's choice (a plain dict) of one chunk."""
        delta = choice.get("delta")
        if isinstance(delta, dict):
            rest: dict[str, Any] = {}
            for key, value in delta.items():
                if isinstance(value, str) and key != "role":
                    self.add_text(key, value)
                else:
                    rest[key] = value
            if rest:
                merge_delta(self.message, rest)
        text = choice.get("text")
        if isinstance(text, str):
            self.add_text("text", text)
        self.logprobs = merge_logprobs(self.logprobs, choice.get("logprobs"))
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            self.token_ids.extend(ids)
        finish = choice.get("finish_reason")
        if finish is not None:
            self.finish = finish
        merge_last(self.extra, choice, _CHOICE)

    def joined(self, key: str) -> str | None:
        parts = self.parts.get(key)
        return None if parts is None else "".join(parts)

    def render(self, index: int, chat: bool, token_ids: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"index": index}
        if chat:
            message: dict[str, Any] = {"role": self.message.get("role") or "assistant"}
            content = self.joined("content")
            tool_calls = self.message.get("tool_calls")
            message["content"] = content if content is not None or tool_calls else ""
            if isinstance(tool_calls, list):
                # The deltas' ``index`` orders the calls; a unary message's calls have none.
                message["tool_calls"] = [_without_index(call) for call in tool_calls]
            for key in self.parts:
                if key != "content":
                    message[key] = self.joined(key)
            for key, value in self.message.items():
                if key != "role" and (value is not None or key not in message):
                    message.setdefault(key, value)
            out["message"] = message
        else:
            out["text"] = self.joined("text") or ""
        out["logprobs"] = self.logprobs
        out["finish_reason"] = self.finish or "stop"
        if token_ids:
            out["token_ids"] = self.token_ids
        for key, value in self.extra.items():
            if token_ids or key != "prompt_token_ids":
                out.setdefault(key, value)
        return out


def _without_index(call: Any) -> Any:
    if isinstance(call, dict) and "index" in call:
        return {k: v for k, v in call.items() if k != "index"}
    return call


class Aggregator:
    """Collects every choice (text, tool calls, logprobs, token ids, finish reason, the
    worker's other keys), the response's other keys, and the summed usage."""

    __slots__ = ("_chat", "_choices", "_created", "_extra", "_id", "_model", "_token_ids", "usage")

    def __init__(
        self,
        kind: str,
        response_id: str,
        model: str,
        created: int,
        *,
        choices: int,
        with_token_ids: bool = False,
    ) -> None:
        self._chat = kind == "chat"
        self._id = response_id
        self._model = model
        self._created = created
        self._choices = [_Choice() for _ in range(choices)]
        self._token_ids = with_token_ids
        self._extra: dict[str, Any] = {}
        self.usage: Usage | None = None

    def add(self, out: EngineOutput) -> None:
        choice = self._choices[out.index]
        chunks = out.chunks
        if chunks is not None:
            for chunk in chunks:
                merge_last(self._extra, chunk, _ENVELOPE)
                if self._token_ids and chunk.get("prompt_token_ids") is not None:
                    self._extra["prompt_token_ids"] = chunk["prompt_token_ids"]
                for part in chunk.get("choices") or ():
                    if isinstance(part, dict):
                        choice.add(part)
        else:
            if out.text:
                choice.add_text("content" if self._chat else "text", out.text)
            if self._token_ids and out.token_ids:
                choice.token_ids.extend(out.token_ids)
            if self._token_ids and out.prompt_token_ids is not None:
                # Where vLLM puts them: a chat response's top level, a completion's choice.
                extra = self._extra if self._chat else choice.extra
                extra["prompt_token_ids"] = out.prompt_token_ids
            if out.finish_reason is not None:
                choice.finish = out.finish_reason
        if out.usage is not None:
            self.usage = out.usage if self.usage is None else self.usage + out.usage

    def render(self) -> bytes:
        chat = self._chat
        response: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion" if chat else "text_completion",
            "created": self._created,
            "model": self._model,
            "choices": [
                choice.render(index, chat, self._token_ids)
                for index, choice in enumerate(self._choices)
            ],
        }
        usage = usage_info(self.usage)
        if usage is not None:
            response["usage"] = usage
        for key, value in self._extra.items():
            response.setdefault(key, value)
        return _encode(response)
