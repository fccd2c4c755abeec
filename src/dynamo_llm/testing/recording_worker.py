"""A fake OpenAI-compatible worker that records exactly what the frontend sent it.

:func:`recording_worker` serves one on ``127.0.0.1`` (an OS-chosen port) inside the test's event
loop, so a test can read what it received without a control route::

    async with recording_worker() as worker:
        ...  # point a routed frontend at worker.url, send a request
        seen = worker.received[0]  # .path, .headers (lower-cased names), .body (bytes), .json

It answers like the ``ok`` bad worker (:mod:`.bad_workers`) and like vLLM: ``tokens`` chunks
``tok0 tok1 ...`` whose response id is ``chatcmpl-<X-Request-Id>`` (``cmpl-`` for completions),
honouring ``max_tokens`` / ``max_completion_tokens``, ``return_token_ids`` (ids ``0..N-1``) and
``stream_options.include_usage``; a unary request gets the folded answer. What it does with each
request is a :class:`Script`: ``"ok"``, or ``"cut@K"`` (K tokens, then the body ends without
``[DONE]``, which a frontend may migrate). Several workers may share one script, so that "the
first request anywhere is cut" is deterministic whichever worker the router picks.

With ``api_key``, the worker is a vLLM started with ``--api-key``: every ``/v1/`` request that
does not carry ``Authorization: Bearer <api_key>`` gets 401 (and is counted in ``refused``, not
recorded). ``worker.api_key`` may be changed while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

# The answers are the bad workers' ``ok`` ones (their chunks, usage and unary body).
from .bad_workers.behaviours import Options, _Seen, _Stream

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

    def __init__(
        self, *, model: str, tokens: int, script: Script, api_key: str | None = None
    ) -> None:
        self.model = model
        self.tokens = tokens
        self.script = script
        self.api_key = api_key
        self.refused = 0
        self.url = ""
        self.received: list[Received] = []
        self._arrived = asyncio.Condition()

    async def until_received(self, count: int) -> list[Received]:
        """Return once ``count`` requests have arrived (the caller bounds the wait)."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: len(self.received) >= count)
        return self.received

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._check_key])
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/completions", self._generate)
        return app

    @web.middleware
    async def _check_key(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        needed = self.api_key is not None and request.path.startswith("/v1/")
        if needed and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            self.refused += 1
            error = {"message": "Invalid API key", "type": "authentication_error"}
            return web.json_response({"error": error}, status=401)
        return await handler(request)

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
        upstream_id = received.headers.get("x-request-id", "none")
        client_id = received.headers.get("x-client-request-id", upstream_id)
        seen = _Seen(client_id, request.path, body, upstream_id)
        answer = _Stream(Options("ok", self.tokens, model=self.model), seen, body)
        if not body.get("stream"):
            return await answer.unary(request, "ok")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if answer.chat:
            await resp.write(answer.role())
        for i in range(answer.count):
            if kind == "cut" and i == cut_at:
                return resp  # the body ends without [DONE]
            await resp.write(answer.token(i))
        await resp.write(answer.tail())
        return resp


@contextlib.asynccontextmanager
async def recording_worker(
    *,
    model: str = "rec-model",
    tokens: int = 4,
    script: Script | None = None,
    api_key: str | None = None,
) -> AsyncIterator[RecordingWorker]:
    """Serve a :class:`RecordingWorker` on 127.0.0.1 for the body of the ``async with``."""
    worker = RecordingWorker(model=model, tokens=tokens, script=script or Script(), api_key=api_key)
    runner = web.AppRunner(worker.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        worker.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield worker
    finally:
        await runner.cleanup()
