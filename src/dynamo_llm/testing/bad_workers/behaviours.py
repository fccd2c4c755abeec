"""The behaviours: one aiohttp app that misbehaves as its :class:`Options` say, and keeps a
record of what it saw (the table of behaviours and the record's shape are in the package's
docstring, :mod:`dynamo_llm.testing.bad_workers`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["BEHAVIOURS", "FEW", "Options", "WorkerApp"]

BEHAVIOURS = (
    "ok",
    "slow",
    "refuse",
    "zombie",
    "zombie-after-first",
    "stop-mid-stream",
    "die-mid-stream",
    "error-mid-stream",
    "http-500",
    "busy",
    "malformed-sse",
)
# How many events the mid-stream behaviours send before misbehaving.
FEW = 3


@dataclass
class Options:
    behaviour: str
    tokens: int = 5
    gap: float = 0.0
    model: str = "bad-model"
    foreign_ids: bool = False
    owned_by: str = "bad"


@dataclass
class _Seen:
    id: str
    path: str
    body: Any
    upstream_id: str = ""
    disconnected: bool = False
    disconnected_at: float | None = None
    completed: bool = False
    stopped: bool = False
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "upstream_id": self.upstream_id,
            "path": self.path,
            "body": self.body,
            "disconnected": self.disconnected,
            "disconnected_at": self.disconnected_at,
            "completed": self.completed,
            "stopped": self.stopped,
        }


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return _dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


class WorkerApp:
    """The aiohttp app of one bad worker: its routes, its behaviour, its record."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.seen: list[_Seen] = []
        self.changed = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/_record", self.record)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/requests/{id:.+}/stop", self.stop)
        return app

    def _touch(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def _hang_if_zombie(self) -> None:
        if self.options.behaviour == "zombie":
            await asyncio.Event().wait()

    # --- control plane ------------------------------------------------------------------------

    async def record(self, request: web.Request) -> web.Response:
        ended = request.query.get("wait")
        arrived = request.query.get("arrived")
        if ended is not None or arrived is not None:
            within = float(request.query.get("within", "5"))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    while not any(
                        (s.id == ended and s.ended.is_set()) or s.id == arrived for s in self.seen
                    ):
                        await self.changed.wait()
        body = {"requests": [s.as_json() for s in self.seen]}
        return web.Response(body=_dumps(body), content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        await self._hang_if_zombie()
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    async def models(self, request: web.Request) -> web.Response:
        await self._hang_if_zombie()
        owner = self.options.owned_by
        card = {"id": self.options.model, "object": "model", "created": 0, "owned_by": owner}
        return web.Response(
            body=_dumps({"object": "list", "data": [card]}), content_type="application/json"
        )

    async def stop(self, request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        live = [s for s in self.seen if rid in (s.id, s.upstream_id) and not s.ended.is_set()]
        for s in live:
            s.stop.set()
        if not live:
            body = _error_body(f"No request `{rid}` in flight", "not_found_error", "not_found")
            return web.Response(status=404, body=body, content_type="application/json")
        return web.Response(body=_dumps({"id": rid, "stopped": len(live)}))

    # --- generation ---------------------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        upstream_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        rid = request.headers.get("X-Client-Request-Id") or upstream_id
        seen = _Seen(rid, request.path, body, upstream_id)
        self.seen.append(seen)
        self._touch()
        try:
            return await self._behave(request, seen)
        except (asyncio.CancelledError, ConnectionResetError):
            seen.disconnected = True
            seen.disconnected_at = time.monotonic()
            raise
        finally:
            seen.ended.set()
            self._touch()

    async def _behave(self, request: web.Request, seen: _Seen) -> web.StreamResponse:
        behaviour = self.options.behaviour
        if behaviour == "zombie":
            await asyncio.Event().wait()
        if behaviour == "http-500":
            return _json_error(500, "the worker exploded (bad worker http-500)", "internal_error")
        if behaviour == "busy":
            return _json_error(
                503, "the worker is busy (bad worker busy)", "overloaded_error", "all_workers_busy"
            )
        body = seen.body if isinstance(seen.body, dict) else {}
        problem = _validate(seen.path, body)
        if problem is not None:
            return _json_error(
                400, problem[0], "invalid_request_error", "invalid_value", problem[1]
            )
        stream = _Stream(self.options, seen, body)
        if not body.get("stream"):
            return await stream.unary(request, behaviour)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        if behaviour == "malformed-sse":
            await resp.write(
                b'data: {"id": "x", "choices": [tru\n\nthis is not an event stream\n\n'
            )
            await resp.write(b"data: [DONE]\n\n")
            return resp
        await stream.run(resp, behaviour)
        return resp


def _validate(path: str, body: dict[str, Any]) -> tuple[str, str] | None:
    if path.endswith("/chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages must be a non-empty list", "messages"
    elif not body.get("prompt"):
        return "prompt must not be empty", "prompt"
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        return f"max_tokens must be at least 1, got {max_tokens}", "max_tokens"
    return None


def _json_error(
    status: int, message: str, type_: str, code: str | None = None, param: str | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=_error_body(message, type_, code, param),
        content_type="application/json",
    )


class _Stream:
    """One generation: the chunks of an OpenAI stream, or the unary answer."""

    def __init__(self, options: Options, seen: _Seen, body: dict[str, Any]) -> None:
        self.options = options
        self.seen = seen
        self.chat = seen.path.endswith("/chat/completions")
        rid = uuid.uuid4().hex if options.foreign_ids else seen.upstream_id
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + rid
        self.model = options.model
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        self.count = options.tokens if limit is None else min(options.tokens, limit)
        self.finish = "length" if limit is not None and limit <= options.tokens else "stop"
        self.token_ids = bool(body.get("return_token_ids"))
        options_ = body.get("stream_options") or {}
        self.include_usage = bool(options_.get("include_usage"))
        self.prompt_tokens = _count_prompt(body)
        self.created = int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        chunk = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return b"data: " + _dumps(chunk) + b"\n\n"

    def _choice(self, text: str, i: int | None, finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        if self.token_ids and i is not None:
            choice["token_ids"] = [i]
        return choice

    def role(self) -> bytes:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
        return self._chunk([{**choice, "finish_reason": None}])

    def token(self, i: int) -> bytes:
        return self._chunk([self._choice(f"tok{i}", i, None)])

    def tail(self) -> bytes:
        out = self._chunk([self._choice("", None, self.finish)])
        if self.include_usage:
            out += self._chunk([], usage=self._usage())
        return out + b"data: [DONE]\n\n"

    def _usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.count,
            "total_tokens": self.prompt_tokens + self.count,
        }

    async def unary(self, request: web.Request, behaviour: str) -> web.StreamResponse:
        """The unary answer, after as long as the stream would take (``--gap`` per token), as
        an engine's answer comes; a graceful stop answers with what was generated by then. The
        mid-stream behaviours misbehave where the stream would: silent after the first token,
        or after a few tokens dead, answering 500, or ending its body cut short."""
        if behaviour == "zombie-after-first":
            await asyncio.Event().wait()
        gap = self.options.gap
        limit = FEW if behaviour in ("stop-mid-stream", "die-mid-stream", "error-mid-stream") else 0
        for i in range(self.count):
            if limit and i >= limit:
                return await self._misbehave_unary(request, behaviour)
            if gap > 0:
                await self._pause(gap)
            if self.seen.stop.is_set():
                self.seen.stopped = True
                self.count = i + 1
                break
        if behaviour == "malformed-sse":
            return web.Response(body=b"this is not an answer", content_type="text/plain")
        text = "".join(f"tok{i}" for i in range(self.count))
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": self.finish}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        if self.token_ids:
            choice["token_ids"] = list(range(self.count))
        body = {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self._usage(),
        }
        self.seen.completed = True
        return web.Response(body=_dumps(body), content_type="application/json")

    async def run(self, resp: web.StreamResponse, behaviour: str) -> None:
        gap = self.options.gap
        if behaviour == "slow" and gap <= 0:
            gap = 0.5
        if self.chat:
            await resp.write(self.role())
        if behaviour == "zombie-after-first":
            await asyncio.Event().wait()
        limit = FEW if behaviour in ("stop-mid-stream", "die-mid-stream", "error-mid-stream") else 0
        for i in range(self.count):
            if self.seen.stop.is_set():
                self.seen.stopped = True
                return  # a graceful stop ends the body without [DONE], as our worker does
            await resp.write(self.token(i))
            if limit and i + 1 >= limit:
                await self._misbehave(resp, behaviour)
                return
            if gap > 0:
                await self._pause(gap)
        if self.seen.stop.is_set():
            self.seen.stopped = True
            return
        await resp.write(self.tail())
        self.seen.completed = True

    async def _pause(self, gap: float) -> None:
        """One token's time, cut short by a graceful stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(gap):
                await self.seen.stop.wait()

    async def _misbehave_unary(self, request: web.Request, behaviour: str) -> web.StreamResponse:
        if behaviour == "die-mid-stream":
            os._exit(1)
        if behaviour == "error-mid-stream":
            return _json_error(500, "the worker failed mid-answer (bad worker)", "internal_error")
        # stop-mid-stream: the body ends cleanly, cut short.
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"id": "' + self.id.encode() + b'", "choices": [')
        return resp

    async def _misbehave(self, resp: web.StreamResponse, behaviour: str) -> None:
        if behaviour == "die-mid-stream":
            os._exit(1)
        if behaviour == "error-mid-stream":
            error = _error_body("the worker failed mid-stream (bad worker)", "internal_error", None)
            await resp.write(b"event: error\ndata: " + error + b"\n\n")
        # stop-mid-stream: the handler returns and the body ends cleanly, without [DONE].


def _count_prompt(body: dict[str, Any]) -> int:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return (
            len(prompt)
            if prompt and isinstance(prompt[0], int)
            else sum(len(str(p).split()) for p in prompt)
        )
    if isinstance(prompt, str):
        return len(prompt.split())
    total = 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content.split())
    return total
