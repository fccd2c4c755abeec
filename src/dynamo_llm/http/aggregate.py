"""Folding an engine's stream into one unary OpenAI response (the protocols' response structs)."""

from __future__ import annotations

import msgspec

from ..engines.base import EngineOutput, Usage
from ..protocols.chat import ChatChoice, ChatCompletionResponse, ResponseMessage
from ..protocols.common import usage_info
from ..protocols.completions import CompletionChoice, CompletionResponse

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
            self.usage += out.usage

    def render(self) -> bytes:
        usage = usage_info(self.usage)
        token_ids = self._token_ids
        response: ChatCompletionResponse | CompletionResponse
        if self._chat:
            response = ChatCompletionResponse(
                id=self._id,
                created=self._created,
                model=self._model,
                choices=[
                    ChatChoice(
                        index=index,
                        message=ResponseMessage(content="".join(parts)),
                        finish_reason=self._finish[index] or "stop",
                        token_ids=token_ids[index] if token_ids is not None else None,
                    )
                    for index, parts in enumerate(self._texts)
                ],
                usage=usage,
            )
        else:
            response = CompletionResponse(
                id=self._id,
                created=self._created,
                model=self._model,
                choices=[
                    CompletionChoice(
                        index=index,
                        text="".join(parts),
                        finish_reason=self._finish[index] or "stop",
                        token_ids=token_ids[index] if token_ids is not None else None,
                    )
                    for index, parts in enumerate(self._texts)
                ],
                usage=usage,
            )
        return _encode(response)
