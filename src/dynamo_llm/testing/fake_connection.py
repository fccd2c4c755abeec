"""An in-memory :class:`~dynamo_llm.http.connection.Connection` for tests without sockets.

It records what the app wrote and lets a test hang up at a moment of its choosing, so the
outcome table of the disconnect monitor can be driven exactly, in simulated time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..errors import RequestTooLarge
from ..http.connection import Headers, HttpRequest


class _Headers:
    def __init__(self, headers: dict[str, str]) -> None:
        self._map = {k.lower(): v for k, v in headers.items()}

    def get(self, key: str, default: str | None = None) -> str | None:
        return self._map.get(key, default)


def make_request(
    path: str, headers: dict[str, str] | None = None, method: str = "POST"
) -> HttpRequest:
    merged = {"content-type": "application/json", **(headers or {})}
    return HttpRequest(method, path, "", _Headers(merged))


class FakeConnection:
    """Records the response; ``hang_up()`` simulates the client going away."""

    def __init__(self, body: bytes = b"") -> None:
        self.body = body
        self.disconnected = False
        self._callbacks: list[Callable[[], None]] = []
        self.status: int | None = None
        self.headers: Headers = []
        self.response_body: bytes | None = None
        self.frames: list[bytes] = []
        self.streaming = False
        self.ended = False
        self.frame_sent = asyncio.Event()
        self.closed_errors: tuple[type[BaseException], ...] = (ConnectionResetError,)

    @property
    def is_disconnected(self) -> bool:
        return self.disconnected

    def on_disconnect(self, callback: Callable[[], None]) -> None:
        if self.disconnected:
            callback()
        else:
            self._callbacks.append(callback)

    def hang_up(self) -> None:
        if not self.disconnected:
            self.disconnected = True
            callbacks, self._callbacks = self._callbacks, []
            for callback in callbacks:
                callback()

    async def read_body(self, limit: int) -> bytes:
        if len(self.body) > limit:
            raise RequestTooLarge(f"Request body exceeds the limit of {limit} bytes")
        return self.body

    async def respond(self, status: int, headers: Headers, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.response_body = body

    async def start_stream(self, status: int, headers: Headers) -> FakeConnection:
        self.status = status
        self.headers = headers
        self.streaming = True
        return self

    async def send(self, data: bytes) -> None:
        if self.disconnected:
            raise ConnectionResetError("client went away")
        self.frames.append(data)
        self.frame_sent.set()

    async def end_stream(self) -> None:
        self.ended = True

    @property
    def text(self) -> str:
        return b"".join(self.frames).decode()
