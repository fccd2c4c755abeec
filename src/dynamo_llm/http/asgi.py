"""The app as an ASGI application (uvicorn, or mounted inside another ASGI app).

Under ASGI the only reliable disconnect signal is ``http.disconnect`` from ``receive()``; a single
``is_disconnected()`` poll is not. Once the body is read, a small task per request waits on
``receive()`` and reports the hang-up; it is cancelled and awaited when the request ends.
``lifespan`` events start and stop the app's background work.

ASGI servers are laxer than granian at the edge, so the adapter enforces what granian does: a
request with both ``Content-Length`` and ``Transfer-Encoding`` (the shape of request smuggling)
is refused with 400 and the connection closed, never processed by one of the two; a declared
length over the body limit gets 413 before any of the body is read, so a client that sent
``Expect: 100-continue`` is not invited to send it. Either answer closes the connection, since
an unread body would otherwise be taken for the next request. (A chunked body that grows past
the limit is answered 413 as it arrives; the server discards the rest.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..errors import InvalidRequest, RequestTooLarge, render_error
from ..runtime.tasks import cancel_and_wait
from .app import App
from .connection import DisconnectSignal, Headers, HttpRequest
from .exchange import ClientGone
from .responses import JSON_HEADERS

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _Headers:
    __slots__ = ("_map",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._map = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}

    def get(self, key: str, default: str | None = None) -> str | None:
        return self._map.get(key, default)


def _encode_headers(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


class _AsgiWriter:
    __slots__ = ("_send", "closed_errors")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.closed_errors: tuple[type[BaseException], ...] = (OSError,)

    async def send(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})


class AsgiConnection(DisconnectSignal):
    def __init__(self, receive: Receive, send: Send, declared_length: int | None = None) -> None:
        super().__init__()
        self._receive = receive
        self._send = send
        self._watcher: asyncio.Task[None] | None = None
        self._body_done = False
        self._declared = declared_length
        self._close = False  # answer with Connection: close (the body was not read)

    def on_disconnect(self, callback: Callable[[], None]) -> None:
        self._add_callback(callback)
        if not self.disconnected and self._watcher is None and self._body_done:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._fire()
                return

    async def read_body(self, limit: int) -> bytes:
        if self._declared is not None and self._declared > limit:
            self._close = True
            raise RequestTooLarge(
                f"Request body of {self._declared} bytes exceeds the limit of {limit} bytes"
            )
        chunks = []
        size = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._fire()
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(f"Request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        self._body_done = True
        if self._callbacks and self._watcher is None:  # registered while the body was read
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return b"".join(chunks)

    async def respond(self, status: int, headers: Headers, body: bytes) -> None:
        if self._close:
            headers = [*headers, ("connection", "close")]
        await self._send(
            {"type": "http.response.start", "status": status, "headers": _encode_headers(headers)}
        )
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def start_stream(self, status: int, headers: Headers) -> _AsgiWriter:
        await self._send(
            {"type": "http.response.start", "status": status, "headers": _encode_headers(headers)}
        )
        return _AsgiWriter(self._send)

    async def end_stream(self) -> None:
        if not self.disconnected:
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def aclose(self) -> None:
        self._forget_callbacks()
        if self._watcher is not None:
            await cancel_and_wait(self._watcher)


async def _refuse_ambiguous_length(send: Send) -> None:
    error = InvalidRequest(
        "The request's length is ambiguous: send Content-Length or Transfer-Encoding, not both",
        code="ambiguous_content_length",
    )
    headers = [*JSON_HEADERS, ("connection", "close")]
    await send({"type": "http.response.start", "status": 400, "headers": _encode_headers(headers)})
    await send({"type": "http.response.body", "body": render_error(error), "more_body": False})


class AsgiApp:
    """An ASGI 3 application wrapping :class:`~dynamo_llm.http.app.App`."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = _Headers(scope.get("headers", []))
        length = headers.get("content-length")
        if length is not None and headers.get("transfer-encoding") is not None:
            await _refuse_ambiguous_length(send)
            return
        declared: int | None = None
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _refuse_ambiguous_length(send)
                return
        conn = AsgiConnection(receive, send, declared)
        request = HttpRequest(
            scope["method"],
            scope["path"],
            scope.get("query_string", b"").decode("latin-1"),
            headers,
        )
        try:
            await self.app.handle(request, conn)
        finally:
            await conn.aclose()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.app.astart()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.app.shutdown()
                await self.app.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return
