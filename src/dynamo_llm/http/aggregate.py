"""Folding an engine's stream into one unary OpenAI response."""

from __future__ import annotations

from typing import Any

import msgspec

from ..engines.base import EngineOutput, Usage

_encode = msgspec.json.encode


class Aggregator:
    """Collects every choice's text, token ids and finish reason, and the summed usage."""

    __slots__ = ("_chat", "_created", "_finish", "_id", "_model", "_texts", "_token_ids", "usage")

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
        self._texts: list[list[str]] = [[] for _ in range(choices)]
        self._finish: list[str | None] = [None] * choices
        self._token_ids: list[list[int]] | None = (
            [[] for _ in range(choices)] if with_token_ids else None
        )
        self.usage = Usage(0, 0, 0)

    def add(self, out: EngineOutput) -> None:
        index = out.index
        if out.text:
            self._texts[index].append(out.text)
        if self._token_ids is not None and out.token_ids:
            self._token_ids[index].extend(out.token_ids)
        if out.finish_reason is not None:
            self._finish[index] = out.finish_reason
        if out.usage is not None:
            self.usage.prompt_tokens += out.usage.prompt_tokens
            self.usage.completion_tokens += out.usage.completion_tokens
            self.usage.cached_tokens += out.usage.cached_tokens

    def render(self) -> bytes:
        choices: list[dict[str, Any]] = []
        for index, parts in enumerate(self._texts):
            text = "".join(parts)
            choice: dict[str, Any]
            if self._chat:
                choice = {"index": index, "message": {"role": "assistant", "content": text}}
            else:
                choice = {"index": index, "text": text}
            if self._token_ids is not None:
                choice["token_ids"] = self._token_ids[index]
            choice["logprobs"] = None
            choice["finish_reason"] = self._finish[index] or "stop"
            choices.append(choice)
        usage = self.usage
        return _encode(
            {
                "id": self._id,
                "object": "chat.completion" if self._chat else "text_completion",
                "created": self._created,
                "model": self._model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
                },
            }
        )
