"""A fake OpenAI-compatible worker that records exactly what the frontend sent it.

:func:`recording_worker` serves one on ``127.0.0.1`` (an OS-chosen port) inside the test's event
loop, so a test can read what it received without a control route::

    async with recording_worker() as worker:
        ...  # point a routed frontend at worker.url, send a request
        seen = worker.received[0]  # .path, .headers (lower-cased names), .body (bytes), .json

It streams like vLLM: ``--tokens`` chunks ``tok0 tok1 ...`` whose response id is
``chatcmpl-<X-Request-Id>`` (``cmpl-`` for completions), honouring ``max_tokens`` /
``max_completion_tokens``, ``return_token_ids`` (ids ``0..N-1``) and
``stream_options.include_usage``; a unary request gets the folded answer. What it does with each
request is a :class:`Script`: ``"ok"``, or ``"cut@K"`` (K tokens, then the body ends without
``[DONE]``, which a frontend may migrate). Several workers may share one script, so that "the
first request anywhere is cut" is deterministic whichever worker the router picks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["Received", "RecordingWorker", "Script", "recording_worker"]


@dataclass(frozen=True)
class Received:
    """One generation request as it arrived: its path, headers and raw body."""

    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Script:
    """What the next requests get, in arrival order (then ``"ok"``)."""

    steps: list[str] = field(default_factory=list)

    def next(self) -> tuple[str, int]:
        step = self.steps.pop(0) if self.steps else "ok"
        kind, _, at = step.partition("@")
        return kind, int(at or 0)


class RecordingWorker:
    """The worker's state: what it received, and the event of each arrival."""

    def __init__(self, *, model: str, tokens: int, script: Script) -> None:
        self.model = model
        self.tokens = tokens
        self.script = script
        self.url = ""
        self.received: list[Received] = []
        self._arrived = asyncio.Condition()

    async def until_received(self, count: int) -> list[Received]:
        """Return once ``count`` requests have arrived (the caller bounds the wait)."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: len(self.received) >= count)
        return self.received

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/completions", self._generate)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        card = {"id": self.model, "object": "model", "created": 0, "owned_by": "recorder"}
        return web.json_response({"object": "list", "data": [card]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        received = Received(
            request.path,
            {name.lower(): value for name, value in request.headers.items()},
            await request.read(),
        )
        async with self._arrived:
            self.received.append(received)
            self._arrived.notify_all()
        kind, cut_at = self.script.next()
        body = received.json
        chat = request.path.endswith("/chat/completions")
        prefix = "chatcmpl-" if chat else "cmpl-"
        answer = _Answer(
            id=prefix + received.headers.get("x-request-id", "none"),
            model=self.model,
            chat=chat,
            body=body,
            tokens=self.tokens,
        )
        if not body.get("stream"):
            return web.json_response(answer.unary())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(answer.count):
            if kind == "cut" and i == cut_at:
                return resp  # the body ends without [DONE]
            await resp.write(answer.event(answer.token(i)))
        await resp.write(answer.event(answer.finish()))
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(answer.event(answer.usage_chunk()))
        await resp.write(b"data: [DONE]\n\n")
        return resp


class _Answer:
    def __init__(
        self, *, id: str, model: str, chat: bool, body: dict[str, Any], tokens: int
    ) -> None:
        self.id = id
        self.model = model
        self.chat = chat
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        self.count = tokens if limit is None else min(tokens, limit)
        self.with_ids = bool(body.get("return_token_ids"))
        self.created = int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def _choice(self, text: str, ids: Iterable[int] | None, finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        if self.with_ids and ids is not None:
            choice["token_ids"] = list(ids)
        return choice

    def token(self, i: int) -> dict[str, Any]:
        return self._chunk([self._choice(f"tok{i}", [i], None)])

    def finish(self) -> dict[str, Any]:
        return self._chunk([self._choice("", None, "length")])

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": 3, "completion_tokens": self.count, "total_tokens": 3 + self.count}

    def usage_chunk(self) -> dict[str, Any]:
        return self._chunk([], usage=self.usage())

    def unary(self) -> dict[str, Any]:
        text = "".join(f"tok{i}" for i in range(self.count))
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(),
        }

    @staticmethod
    def event(obj: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


@contextlib.asynccontextmanager
async def recording_worker(
    *, model: str = "rec-model", tokens: int = 4, script: Script | None = None
) -> AsyncIterator[RecordingWorker]:
    """Serve a :class:`RecordingWorker` on 127.0.0.1 for the body of the ``async with``."""
    worker = RecordingWorker(model=model, tokens=tokens, script=script or Script())
    runner = web.AppRunner(worker.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        worker.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield worker
    finally:
        await runner.cleanup()
