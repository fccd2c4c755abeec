"""The app under granian's native RSGI interface (the default server).

RSGI gives what the request lifecycle needs directly: ``protocol.client_disconnect()`` is a future
that resolves within about a millisecond of a hang-up (no task, no polling), and a stream write
after that raises ``RSGIProtocolClosed``. The handler coroutine granian runs cannot be cancelled
(its task object ignores ``cancel()``), which is why the app runs all cancellable work in tasks of
its own and only *waits* in the handler.

A response stream's ``send_bytes`` never waits (granian queues without bound), so the writer can
also say how much its client has not read yet, from the connection's socket (:mod:`.unread`),
for the pump's backpressure.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from granian.rsgi import ProtocolClosed, ProtocolError  # type: ignore[attr-defined]

from ..errors import RequestTooLarge
from .app import App
from .connection import DisconnectSignal, Headers, HttpRequest
from .exchange import ClientGone
from .unread import UnreadMeter, open_meter


async def _send_after_end(data: bytes) -> None:
    raise ProtocolClosed("the response stream has ended")


class _RsgiWriter:
    __slots__ = ("_client", "closed_errors", "send")

    def __init__(self, transport: Any, client: str | None) -> None:
        self.send: Callable[[bytes], Awaitable[None]] = transport.send_bytes
        self.closed_errors: tuple[type[BaseException], ...] = (ProtocolClosed, RuntimeError)
        self._client = client

    def meter(self, sent: int) -> UnreadMeter | None:
        """What the client has not read yet, from the kernel (:mod:`.unread`); None when the
        connection's socket cannot be watched."""
        return None if self._client is None else open_meter(self._client, sent)

    def detach(self) -> None:
        # granian ends a streamed body when its transport object is freed: drop our reference
        # now rather than whenever the last holder of this writer lets go of it.
        self.send = _send_after_end


class RsgiConnection(DisconnectSignal):
    __slots__ = ("_client", "_disconnect", "_headers", "_proto", "_writer")

    def __init__(self, proto: Any, headers: Any, client: str | None = None) -> None:
        super().__init__()
        self._proto = proto
        self._headers = headers
        self._client = client  # "host:port" over HTTP/1.1 TCP: its socket can be watched
        self._disconnect: Any = None
        self._writer: _RsgiWriter | None = None

    def on_disconnect(self, callback: Callable[[], None]) -> None:
        if self._add_callback(callback) and self._disconnect is None:
            self._disconnect = self._proto.client_disconnect()
            self._disconnect.add_done_callback(self._fire)

    def detach(self) -> None:
        """The request is over: later disconnect notifications concern nobody."""
        self._forget_callbacks()
        if self._disconnect is not None and not self._disconnect.done():
            self._disconnect.remove_done_callback(self._fire)

    async def read_body(self, limit: int) -> bytes:
        try:
            return await self._read_body(limit)
        except (ProtocolClosed, ProtocolError):
            # The client went away (or broke the protocol) before its body was complete.
            self._fire()
            raise ClientGone from None

    async def _read_body(self, limit: int) -> bytes:
        length = self._headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > limit:
                raise RequestTooLarge(
                    f"Request body of {declared} bytes exceeds the limit of {limit} bytes"
                )
            if declared >= 0:
                body: bytes = await self._proto()
                if len(body) > limit:
                    raise RequestTooLarge(f"Request body exceeds the limit of {limit} bytes")
                return body
        chunks = []
        size = 0
        async for chunk in self._proto:
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(f"Request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def respond(self, status: int, headers: Headers, body: bytes) -> None:
        self._proto.response_bytes(status, headers, body)

    async def start_stream(self, status: int, headers: Headers) -> _RsgiWriter:
        self._writer = _RsgiWriter(self._proto.response_stream(status, headers), self._client)
        return self._writer

    async def end_stream(self) -> None:
        if self._writer is not None:
            self._writer.detach()
            self._writer = None


class RsgiApp:
    """An RSGI application object for granian."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.proto != "http":
            return
        headers = scope.headers
        # One connection carries one stream at a time only over HTTP/1: its socket then says
        # how much of that stream the client has read.
        client = scope.client if scope.http_version.startswith("1") else None
        conn = RsgiConnection(proto, headers, client)
        try:
            await self.app.handle(
                HttpRequest(scope.method, scope.path, scope.query_string, headers), conn
            )
        finally:
            conn.detach()
