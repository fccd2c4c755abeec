"""What request handling needs from an HTTP server, and nothing more.

The app never touches a server interface directly: an adapter (``rsgi`` for granian's native
interface, ``asgi`` for uvicorn and any ASGI host) wraps each request in an :class:`HttpRequest`
and a :class:`Connection`. The one thing a connection must do well is say, as soon as it knows,
that the client went away: ``on_disconnect(callback)``. Under granian that is
``protocol.client_disconnect()``, a future that resolves within about a millisecond of a
hang-up; under ASGI it is ``http.disconnect`` from ``receive()``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

Headers = list[tuple[str, str]]


class HeaderLookup(Protocol):
    def get(self, key: str, default: str | None = None) -> str | None: ...


class HttpRequest:
    """Method, path and headers of one request; header names are looked up lower-case."""

    __slots__ = ("headers", "method", "path", "query_string")

    def __init__(self, method: str, path: str, query_string: str, headers: HeaderLookup) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers


class StreamWriter(Protocol):
    """The body of a streamed response.

    ``send`` is an attribute (a bound method of the server's transport, called once per chunk
    with no wrapper in between); it raises one of ``closed_errors`` once the client is gone.
    """

    @property
    def send(self) -> Callable[[bytes], Awaitable[None]]: ...

    @property
    def closed_errors(self) -> tuple[type[BaseException], ...]: ...


class DisconnectSignal:
    """The part of a connection adapter that reports the client going away, once.

    ``on_disconnect`` registers a callback (called at once if the client already left) and
    returns True for the first registration, when the adapter should start listening;
    ``_fire()`` is what the adapter calls when its server says the client left.
    """

    __slots__ = ("_callbacks", "disconnected")

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], None]] = []
        self.disconnected = False

    @property
    def is_disconnected(self) -> bool:
        return self.disconnected

    def _add_callback(self, callback: Callable[[], None]) -> bool:
        if self.disconnected:
            callback()
            return False
        first = not self._callbacks
        self._callbacks.append(callback)
        return first

    def _fire(self, *_: object) -> None:
        if self.disconnected:
            return
        self.disconnected = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def _forget_callbacks(self) -> None:
        self._callbacks = []


class Connection(Protocol):
    @property
    def is_disconnected(self) -> bool: ...

    def on_disconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once when the client goes away (at once if it already has)."""

    async def read_body(self, limit: int) -> bytes:
        """The whole request body; raises ``RequestTooLarge`` past ``limit`` bytes."""

    async def respond(self, status: int, headers: Headers, body: bytes) -> None: ...

    async def start_stream(self, status: int, headers: Headers) -> StreamWriter:
        """Send the status and headers of a streamed response."""

    async def end_stream(self) -> None: ...
