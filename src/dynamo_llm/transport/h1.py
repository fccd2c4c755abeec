"""A lean HTTP/1.1 client connection for generation requests to workers.

A generation request is always the same exchange: one POST with a JSON body, answered by an SSE
event stream that is ``Transfer-Encoding: chunked`` (every server we know), sized by
``Content-Length`` (an error body, a JSON answer) or delimited by the close. aiohttp's client
did that with ~130 Python calls, a body-writer task and several objects per request, and per
read its C parser called back into Python twice per HTTP chunk (a worker writes each event as
its own chunk), then its reader handed the chunks out one by one. :class:`Connection` is an
:class:`asyncio.Protocol` that does only this exchange:

- :meth:`Connection.request` writes the request head and body in one ``write`` and waits for
  the response head (a 1xx is skipped).
- ``data_received`` feeds httptools' parser (llhttp, in C: the parser uvicorn uses), which calls
  back once per header and once per HTTP chunk's body, with the bytes appended to the
  connection's buffer; the reader, if it waits, is woken once per socket read.
  (``bench/bench_relay.py`` measured a hand-written dechunker, a loop of ``bytes.find`` over
  the buffer, 50-70 µs slower per 100-token stream: ``bench/README.md``.)
- :meth:`Connection.read_any` hands over everything buffered at once (up to a limit, so that a
  stream held back for a slow client is passed on in pieces its buffer can be watched between).
- **Backpressure**: once more than :data:`HIGH_WATER` body bytes wait unread, the transport
  stops reading the socket (``pause_reading``), and reading resumes when the reader took them
  down to :data:`LOW_WATER`; with the socket's fixed receive buffer (:mod:`.pool`) the worker
  then feels TCP backpressure, as with aiohttp's reader.

The failures are this module's own small tree, which :mod:`.errors` maps to the router's
classes exactly as it maps aiohttp's::

    H1Error
    ├── ConnectFailed          refused, unresolvable or timed out      -> WorkerUnreachable
    │                          (or a host that is no host name at all)
    ├── ClosedUnanswered       closed or reset before any answer byte  -> one retry
    ├── ConnectionDropped      closed or reset mid-answer              -> WorkerDisconnected
    └── BadResponse            not HTTP/1.1 (or too large a head)      -> UpstreamError

A connection goes back to its pool (:meth:`release`) only when its response was read to its end
and both sides keep it alive; anything else (a cancelled or abandoned read, a stop, a malformed
answer) closes it (:meth:`close`), which is also how a worker learns that its client went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING, cast

import httptools

if TYPE_CHECKING:
    from .pool import Pool

__all__ = [
    "HIGH_WATER",
    "LOW_WATER",
    "BadResponse",
    "ClosedUnanswered",
    "ConnectFailed",
    "Connection",
    "ConnectionDropped",
    "H1Error",
]

HIGH_WATER = 128 * 1024
"""Unread body bytes past which the socket is no longer read (aiohttp's reader: 2 x 64 KiB)."""
LOW_WATER = 64 * 1024
"""Unread body bytes below which reading resumes."""
MAX_HEAD = 64 * 1024
"""The largest response head (status line and headers) accepted."""
MAX_SHOWN_HOST = 80
"""How much of a worker's host name a failure's message shows (a URL may be any length)."""


class H1Error(Exception):
    """A failure of the HTTP/1.1 exchange with a worker (the tree in the module doc)."""


class ConnectFailed(H1Error):
    """No connection could be made: refused, unresolvable, or the connect timed out.

    ``host`` is set when the worker's host name is what failed: it could not be resolved
    (``os_error`` the resolver's), or it is not a name a resolver can be asked about at all (a
    label over 63 characters, an empty one, bad IDNA; no ``os_error``).
    """

    def __init__(
        self, os_error: OSError | None = None, *, timed_out: bool = False, host: str | None = None
    ) -> None:
        self.os_error = os_error
        self.timed_out = timed_out
        self.host = host
        super().__init__(self.reason if os_error is None else str(os_error))

    @property
    def reason(self) -> str:
        """Our own few words for it ("connection refused"), never the address it tried; a
        host name that failed is named, bounded (the operator's URL, without its credentials)."""
        if self.timed_out:
            return "connect timed out"
        if self.host is not None:
            why = "is not a valid host name" if self.os_error is None else "could not be resolved"
            return f"the worker's host `{_shown_host(self.host)}` {why}"
        errno = self.os_error.errno if self.os_error is not None else None
        return os.strerror(errno).lower() if errno else "the connection failed"


def _shown_host(host: str) -> str:
    """``host`` as a message may show it: plain printable ASCII, at most MAX_SHOWN_HOST long."""
    text = host.encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= MAX_SHOWN_HOST else text[:MAX_SHOWN_HOST] + "..."


class ClosedUnanswered(H1Error):
    """The worker closed or reset the connection before sending a byte of its answer."""


class ConnectionDropped(H1Error):
    """The worker closed or reset the connection before its answer was complete."""


class BadResponse(H1Error):
    """The worker's answer is not HTTP/1.1 we can read."""


class Connection(asyncio.Protocol):
    """One keep-alive connection to a worker, and the one response being read on it."""

    __slots__ = (
        "_body",
        "_eof",
        "_error",
        "_head_size",
        "_head_waiter",
        "_in_head",
        "_key",
        "_loop",
        "_parser",
        "_paused",
        "_pool",
        "_size",
        "_until_close",
        "_waiter",
        "closed",
        "content_type",
        "headers",
        "idle_since",
        "keep_alive",
        "status",
        "transport",
    )

    def __init__(self, pool: Pool | None = None, key: object = None) -> None:
        self._pool = pool
        self._key = key
        self.transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.content_type = ""
        self.keep_alive = True
        self._parser: httptools.HttpResponseParser | None = None
        self._in_head = True
        self._head_size = 0
        self._head_waiter: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._eof = False
        self._error: H1Error | None = None
        self._until_close = False
        self._paused = False

    # --- the exchange ---------------------------------------------------------------------

    async def request(self, data: bytes) -> None:
        """Send a whole request and wait for the response head (``status``, ``headers``).

        Raises :class:`ClosedUnanswered`, :class:`ConnectionDropped` or :class:`BadResponse`;
        cancelled, the connection is closed.
        """
        transport = self.transport
        if transport is None or self.closed:
            raise ClosedUnanswered("the connection is closed")
        loop = asyncio.get_running_loop()
        waiter = self._head_waiter = loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        transport.write(data)
        try:
            await waiter
        except BaseException:
            self.close()
            raise

    def is_eof(self) -> bool:
        """Whether the whole body was received (it may still wait unread)."""
        return self._eof

    async def read_any(self, limit: int = 65536) -> bytes:
        """The body bytes received and not yet read, at once (b"" at the end of the body),
        stopping after the piece that reaches ``limit`` bytes.

        Raises :class:`ConnectionDropped` (or :class:`BadResponse`) once what came before the
        failure was read.
        """
        body = self._body
        while not body:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        size = self._size
        if size <= limit:
            # All of it (most often one piece: a socket read of one HTTP chunk, which join
            # returns as is).
            data = b"".join(body)
            body.clear()
            self._size = size = 0
        else:
            got = 0
            taken = 0
            for part in body:
                got += len(part)
                taken += 1
                if got >= limit:
                    break
            data = b"".join(body[:taken])
            del body[:taken]
            self._size = size = size - got
        if self._paused and size < LOW_WATER:
            self._paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()
        return data

    def release(self) -> None:
        """Done with the response: back to the pool if it was read to its end and both sides
        keep the connection alive, else closed."""
        if self.closed:
            return
        if not (self._eof and self.keep_alive and not self._body and self._error is None):
            self.close()
            return
        self._reset()
        if self._pool is not None:
            self._pool.put_back(self._key, self)
        else:
            self.close()

    def close(self) -> None:
        """Close the connection now (a pending read fails; the worker sees the close)."""
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        if self._error is None and not self._eof:
            self._fail(ConnectionDropped("the connection was closed"))
        if self._pool is not None:
            self._pool.forget(self._key, self)

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass, but has its methods.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        if self._in_head:
            if self._head_waiter is not None:
                cls = ConnectionDropped if self._head_size else ClosedUnanswered
                self._fail(cls("the worker closed the connection"))
        elif not self._eof and self._error is None:
            if self._until_close and exc is None:
                self._eof = True
                self._wake()
            else:
                self._fail(ConnectionDropped("the response body was cut short"))
        if not was_closed and self._pool is not None:
            self._pool.forget(self._key, self)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._eof or self._error is not None:
            # Bytes on an idle connection, or after the answer: it cannot be reused.
            self.keep_alive = False
            if parser is None:
                self.close()
            return
        in_head = self._in_head
        if in_head:
            self._head_size += len(data)
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if not self._eof:
                self._fail(BadResponse(f"the response is not valid HTTP/1.1: {exc}"))
            self.keep_alive = False
            self.close()
            return
        if in_head and self._in_head and self._head_size > MAX_HEAD:
            self._fail(BadResponse("the response head is too large"))
            self.close()
            return
        if self._size > HIGH_WATER and not self._paused and not self.closed:
            self._paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        waiter = self._waiter
        if waiter is not None:  # _wake, inlined on the per-read path
            self._waiter = None
            try:  # noqa: SIM105 (contextlib.suppress is two more calls per read)
                waiter.set_result(None)
            except asyncio.InvalidStateError:
                pass  # cancelled: its reader is being unwound

    # --- httptools' callbacks ---------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self.headers
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        if self._eof or not self._in_head:
            self.keep_alive = False  # a second answer: ignored, and the connection not reused
            return
        assert self._parser is not None
        status = self._parser.get_status_code()
        if status < 200:
            self.headers = {}  # a 1xx: the real answer follows
            return
        headers = self.headers
        self.status = status
        self.content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        self.keep_alive = self._parser.should_keep_alive()
        self._until_close = (
            "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower()
            and status not in (204, 304)
        )
        if self._until_close:
            self.keep_alive = False
        self._in_head = False
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        if not self._eof:
            self._body.append(body)
            self._size += len(body)

    def on_message_complete(self) -> None:
        if not self._in_head:
            self._eof = True

    # --- wake-ups ---------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            # Woken once: the reader makes a new waiter when it has to wait again. (Not
            # ``done()`` first: that is a call per read, and the waiter is only ever done when
            # its reader was cancelled.)
            self._waiter = None
            with contextlib.suppress(asyncio.InvalidStateError):  # cancelled: being unwound
                waiter.set_result(None)

    def _fail(self, error: H1Error) -> None:
        if self._eof:
            return  # the answer was whole: a failure after it changes nothing
        if self._error is None:
            self._error = error
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self._wake()
