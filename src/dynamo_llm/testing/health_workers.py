"""Scripted fake workers in this process, and a routed frontend in front of them.

For the tests of the probe (does a quarantined worker come back?), of a 200 that carries no event
stream, and of silent workers. A :class:`ScriptedWorker` is an aiohttp server on a loopback port
in the test's own event loop, so the test can wait on what the worker saw without polling::

    # No /health; the first generation request never answers, the later ones do.
    async with scripted_worker(model="m", health="missing", script=["hang"]) as w:
        async with routed_fleet({"m": [w.url]}, env) as (fe, fleet):
            ...
            probe = await w.wait_for(lambda s: s.is_probe and s.ended)

Each generation request (``POST /v1/completions`` or ``/v1/chat/completions``) behaves as the
next entry of ``script`` says, or as ``default`` once the script is used up:

==============  ===================================================================================
``ok``          ``tokens`` tokens ``tok0 tok1 ...``; streamed as SSE with a usage chunk and
                ``[DONE]`` when ``stream`` is true, else one JSON answer; honours ``max_tokens``
``hang``        reads the request, never answers
``first-hang``  sends the headers and the first token, then goes silent
``drop``        sends the first token, then ends the body cleanly without ``[DONE]``
``cut``         sends the headers, then closes the connection before any event (chunked, so
                the client sees the body cut short, not ended)
``empty``       200 ``text/event-stream`` with an empty body (llama_cpp.server, over-long prompt)
``empty-close`` the same, and then, as llama_cpp.server's uvicorn does once its app raised, the
                connection is closed: the next request sent on it is read and lost unanswered
``close``       reads the request and closes the connection without answering
``json-error``  200 ``application/json`` with an OpenAI error body
``http-500``    500 with an OpenAI error body
==============  ===================================================================================

``health`` is ``ok`` (200), ``hang`` or ``missing`` (404, as llama_cpp.server). ``routes`` names
the generation routes the worker offers (``completions``, ``chat``); the others answer 404, as a
server without the route does. ``GET /v1/models`` always answers (discovery needs it).

Every request is recorded as a :class:`Seen` (``seen``): its path, id, body, whether it was a
probe (a ``stream: false`` generation request or a ``GET /health``; the frontend streams every
client request upstream) and whether the client closed the connection before the answer ended
(``disconnected``; aiohttp's ``handler_cancellation`` cancels the handler at once, as a real
engine server reacts). A request lost on a connection closed by ``empty-close`` is recorded with
the behaviour ``lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from ..config import Config
from ..fleet import Fleet
from ..http.app import create_app
from ..http.server import HttpServer
from ..metrics import Metrics
from ..runtime.clock import SystemClock
from ..transport import WorkerClient, make_session
from .frontend import Frontend

__all__ = [
    "BEHAVIOURS",
    "ScriptedWorker",
    "Seen",
    "routed_fleet",
    "scripted_worker",
    "worker_client",
]

BEHAVIOURS = (
    "ok",
    "hang",
    "first-hang",
    "drop",
    "cut",
    "empty",
    "empty-close",
    "close",
    "json-error",
    "http-500",
)
GENERATION_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(eq=False)
class Seen:
    """One request the worker received."""

    path: str
    id: str
    body: Any
    behaviour: str
    ended: bool = False
    disconnected: bool = False
    answered: bool = False  # the whole answer was written

    @property
    def is_probe(self) -> bool:
        if self.path == "/health":
            return True
        return self.path in GENERATION_PATHS.values() and not _get(self.body, "stream")


def _get(body: Any, name: str) -> Any:
    return body.get(name) if isinstance(body, dict) else None


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error(message: str, type_: str) -> bytes:
    return _dumps({"error": {"message": message, "type": type_, "param": None, "code": None}})


class ScriptedWorker:
    """A fake OpenAI-compatible worker whose behaviour the test scripts (see the module doc)."""

    def __init__(
        self,
        *,
        model: str,
        tokens: int = 5,
        routes: Iterable[str] = ("completions", "chat"),
        health: str = "ok",
        default: str = "ok",
        script: Iterable[str] = (),
    ) -> None:
        self.model = model
        self.tokens = tokens
        self.routes = set(routes)
        self.health = health
        self.default = default
        self.script: list[str] = list(script)
        self.seen: list[Seen] = []
        self.url = ""
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        # Connections an ``empty-close`` answer left to be closed at their next request.
        self._closing: set[asyncio.BaseTransport] = set()

    # --- what the test uses -------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[Seen], bool], *, within: float = 10.0) -> Seen:
        """The first request that satisfies ``predicate``, once there is one."""
        async with asyncio.timeout(within):
            while True:
                for seen in self.seen:
                    if predicate(seen):
                        return seen
                self._changed.clear()
                await self._changed.wait()

    def requests(self, *, probes: bool = False) -> list[Seen]:
        """The generation requests seen, without the probes (or only the probes)."""
        return [s for s in self.seen if s.is_probe is probes and s.path != "/v1/models"]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        for name, path in GENERATION_PATHS.items():
            app.router.add_post(path, self._generate_route(name))
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- the routes ---------------------------------------------------------------------------

    def _touch(self) -> None:
        self._changed.set()

    async def _record(
        self, seen: Seen, answer: Callable[[], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.seen.append(seen)
        self._touch()
        try:
            return await answer()
        except (asyncio.CancelledError, ConnectionResetError):
            seen.disconnected = True
            raise
        finally:
            seen.ended = True
            self._touch()

    async def _health(self, request: web.Request) -> web.StreamResponse:
        seen = Seen(request.path, request.headers.get("X-Request-Id", ""), None, self.health)

        async def answer() -> web.StreamResponse:
            if self.health == "hang":
                await asyncio.Event().wait()
            seen.answered = True
            if self.health == "missing":
                return web.Response(status=404, text="Not Found")
            return web.Response(body=b'{"status":"ok"}', content_type="application/json")

        return await self._record(seen, answer)

    async def _models(self, request: web.Request) -> web.Response:
        card = {"id": self.model, "object": "model", "created": 0, "owned_by": "scripted"}
        body = _dumps({"object": "list", "data": [card]})
        return web.Response(body=body, content_type="application/json")

    def _generate_route(self, name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            if name not in self.routes:
                return web.Response(status=404, text="Not Found")
            try:
                body = json.loads(await request.read())
            except ValueError:
                body = None
            if request.transport in self._closing:
                behaviour = "lost"
            else:
                behaviour = self.script.pop(0) if self.script else self.default
            seen = Seen(request.path, request.headers.get("X-Request-Id", ""), body, behaviour)
            return await self._record(seen, lambda: self._behave(request, seen, name == "chat"))

        return handler

    async def _behave(self, request: web.Request, seen: Seen, chat: bool) -> web.StreamResponse:
        behaviour = seen.behaviour
        if behaviour == "hang":
            await asyncio.Event().wait()
        if behaviour in ("lost", "close"):
            assert request.transport is not None
            self._closing.discard(request.transport)
            request.transport.close()
            return web.Response(status=500)  # never written: the connection is gone
        if behaviour == "http-500":
            seen.answered = True
            return web.Response(
                status=500,
                body=_error("the engine failed (scripted)", "internal_error"),
                content_type="application/json",
            )
        if behaviour == "json-error":
            seen.answered = True
            return web.Response(
                body=_error("the prompt is too long for this engine (scripted)", "internal_error"),
                content_type="application/json",
            )
        if behaviour == "cut":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(b": ")  # a first chunk, so the headers are on the wire
            assert request.transport is not None
            request.transport.close()
            return resp
        if behaviour in ("empty", "empty-close"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write_eof()
            seen.answered = True
            if behaviour == "empty-close" and request.transport is not None:
                self._closing.add(request.transport)
            return resp
        answer = _Answer(self, seen, chat)
        if not _get(seen.body, "stream"):
            seen.answered = True
            return web.Response(body=answer.unary(), content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(answer.count):
            await resp.write(answer.token(i))
            if behaviour == "first-hang":
                await asyncio.Event().wait()
            if behaviour == "drop":
                return resp  # the body ends without [DONE]
        await resp.write(answer.tail())
        seen.answered = True
        return resp


class _Answer:
    """The chunks (or the unary answer) of one ``ok`` generation."""

    def __init__(self, worker: ScriptedWorker, seen: Seen, chat: bool) -> None:
        self.chat = chat
        self.model = worker.model
        self.id = ("chatcmpl-" if chat else "cmpl-") + (seen.id or "x")
        limit = _get(seen.body, "max_tokens") or _get(seen.body, "max_completion_tokens")
        self.count = worker.tokens if not isinstance(limit, int) else min(worker.tokens, limit)
        self.finish = "length" if isinstance(limit, int) and limit <= worker.tokens else "stop"

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        chunk = {"id": self.id, "object": kind, "created": 0, "model": self.model}
        return b"data: " + _dumps({**chunk, "choices": choices, **extra}) + b"\n\n"

    def _choice(self, text: str, finish: str | None, *, whole: bool = False) -> dict[str, Any]:
        """A choice carrying ``text``: a chunk's delta, or (``whole``) the unary message."""
        if not self.chat:
            content: dict[str, Any] = {"text": text}
        elif whole:
            content = {"message": {"role": "assistant", "content": text}}
        else:
            content = {"delta": {"content": text}}
        return {"index": 0, **content, "logprobs": None, "finish_reason": finish}

    def token(self, i: int) -> bytes:
        return self._chunk([self._choice(f"tok{i}", None)])

    def tail(self) -> bytes:
        usage = {"prompt_tokens": 2, "completion_tokens": self.count}
        usage["total_tokens"] = 2 + self.count
        return (
            self._chunk([self._choice("", self.finish)])
            + self._chunk([], usage=usage)
            + b"data: [DONE]\n\n"
        )

    def unary(self) -> bytes:
        text = "".join(f"tok{i}" for i in range(self.count))
        kind = "chat.completion" if self.chat else "text_completion"
        choices = [self._choice(text, self.finish, whole=True)]
        return _dumps({"id": self.id, "object": kind, "model": self.model, "choices": choices})


@contextlib.asynccontextmanager
async def scripted_worker(**options: Any) -> AsyncIterator[ScriptedWorker]:
    """A :class:`ScriptedWorker` serving for the body of the ``async with`` (see the module doc)."""
    worker = ScriptedWorker(**options)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.aclose()


@contextlib.asynccontextmanager
async def worker_client(connect_timeout: float = 2.0) -> AsyncIterator[WorkerClient]:
    """The router's worker client over a fresh pooled session, closed afterwards."""
    session = make_session(connect_timeout)
    client = WorkerClient(session)
    try:
        yield client
    finally:
        await client.aclose()
        await session.close()


@contextlib.asynccontextmanager
async def routed_fleet(
    models: Mapping[str, list[str]], env: Mapping[str, str] | None = None
) -> AsyncIterator[tuple[Frontend, Fleet]]:
    """The routed frontend on 127.0.0.1, and its :class:`Fleet`, as ``serve --upstream-file``
    runs it: ``models`` maps each model to its worker URLs, in the order round-robin takes them.

    ``env`` is the environment the configuration is read from, as the process would see it.
    """
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "upstreams.yaml"
        path.write_text(json.dumps(dict(models)))  # JSON is YAML too
        config = Config.from_env(dict(env or {})).replace(upstream_file=str(path))
        async with _serving(config) as served:
            yield served


@contextlib.asynccontextmanager
async def _serving(config: Config) -> AsyncIterator[tuple[Frontend, Fleet]]:
    clock = SystemClock()
    metrics = Metrics(prefix=config.metrics_prefix)
    app = create_app(config, [], metrics, clock)
    fleet = Fleet(config, app, clock, metrics)
    app.add_lifecycle(fleet.start, fleet.aclose)
    server = HttpServer(app, "127.0.0.1", 0)
    await server.start()
    try:
        yield Frontend(app, server), fleet
    finally:
        await app.shutdown(grace=0, kill_wait=5)
        await server.stop()
