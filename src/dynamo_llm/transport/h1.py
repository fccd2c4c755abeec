"""A lean HTTP/1.1 client connection for generation requests to workers.

A generation request is always the same exchange: one POST with a JSON body, answered by an SSE
event stream that is ``Transfer-Encoding: chunked`` (every server we know), sized by
``Content-Length`` (an error body, a JSON answer) or delimited by the close. aiohttp's client
did that with ~130 Python calls, a body-writer task and several objects per request, and per
read its C parser called back into Python twice per HTTP chunk (a worker writes each event as
its own chunk), then its reader handed the chunks out one by one. :class:`Connection` is an
:class:`asyncio.Protocol` that does only this exchange:

- :meth:`Connection.request` writes the request head and body in one ``write`` and waits for
  the response head (a 1xx is skipped), parsed once with ``bytes`` operations.
- ``data_received`` takes the body bytes out of the HTTP framing in place (for chunked bodies,
  a loop of ``bytes.find`` over the buffer: one Python call per socket read, however many
  chunks it holds) and appends them to the connection's buffer, waking the reader if it waits.
- :meth:`Connection.read_any` hands over everything buffered at once (up to a limit), as
  :func:`~.buffered.read_any` did over aiohttp's reader.
- **Backpressure**: once more than :data:`HIGH_WATER` body bytes wait unread, the transport
  stops reading the socket (``pause_reading``), and reading resumes when the reader took them
  down to :data:`LOW_WATER`; with the socket's fixed receive buffer (:mod:`.pool`) the worker
  then feels TCP backpressure, as with aiohttp's reader.

The failures are this module's own small tree, which :mod:`.errors` maps to the router's
classes exactly as it maps aiohttp's::

    H1Error
    ├── ConnectFailed          refused, unresolvable or timed out      -> WorkerUnreachable
    ├── ClosedUnanswered       closed or reset before any answer byte  -> one retry
    ├── ConnectionDropped      closed or reset mid-answer              -> WorkerDisconnected
    └── BadResponse            not HTTP/1.1 (or too large a head)      -> UpstreamError

A connection goes back to its pool (:meth:`release`) only when its response was read to its end
and both sides keep it alive; anything else (a cancelled or abandoned read, a stop, a malformed
answer) closes it (:meth:`close`), which is also how a worker learns that its client went away.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

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
MAX_CHUNK_LINE = 4096
"""The longest chunk-size line (with extensions) accepted."""


class H1Error(Exception):
    """A failure of the HTTP/1.1 exchange with a worker (the tree in the module doc)."""


class ConnectFailed(H1Error):
    """No connection could be made: refused, unresolvable, or the connect timed out."""

    def __init__(self, os_error: OSError | None = None, *, timed_out: bool = False) -> None:
        super().__init__("connect timed out" if timed_out else str(os_error))
        self.os_error = os_error
        self.timed_out = timed_out

    @property
    def reason(self) -> str:
        """Our own few words for it ("connection refused"), never the address."""
        if self.timed_out:
            return "connect timed out"
        errno = self.os_error.errno if self.os_error is not None else None
        return os.strerror(errno).lower() if errno else "the connection failed"


class ClosedUnanswered(H1Error):
    """The worker closed or reset the connection before sending a byte of its answer."""


class ConnectionDropped(H1Error):
    """The worker closed or reset the connection before its answer was complete."""


class BadResponse(H1Error):
    """The worker's answer is not HTTP/1.1 we can read."""


# Body framings.
_LENGTH = 0
_CHUNKED = 1
_UNTIL_CLOSE = 2


class Connection(asyncio.Protocol):
    """One keep-alive connection to a worker, and the one response being read on it."""

    __slots__ = (
        "_body",
        "_chunk_left",
        "_eof",
        "_error",
        "_framing",
        "_head_waiter",
        "_in_head",
        "_key",
        "_length_left",
        "_paused",
        "_pending",
        "_pool",
        "_size",
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
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.content_type = ""
        self.keep_alive = True
        self._in_head = True
        self._pending = b""  # head bytes, or a chunk's framing cut by a read
        self._head_waiter: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._eof = False
        self._error: H1Error | None = None
        self._framing = _UNTIL_CLOSE
        self._length_left = 0
        self._chunk_left = -1  # -1: a chunk-size line is next; -2: the CRLF after a chunk
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
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        if len(body) == 1:
            data = body.pop()
        elif self._size <= limit:
            data = b"".join(body)
            body.clear()
        else:
            size = 0
            taken = 0
            for part in body:
                size += len(part)
                taken += 1
                if size >= limit:
                    break
            data = b"".join(body[:taken])
            del body[:taken]
        self._size -= len(data)
        if self._paused and self._size < LOW_WATER:
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
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        if self._in_head:
            if self._head_waiter is not None or self._pending:
                cls = ClosedUnanswered if not self._pending else ConnectionDropped
                self._fail(cls("the worker closed the connection"))
        elif not self._eof and self._error is None:
            if self._framing == _UNTIL_CLOSE and exc is None:
                self._eof = True
                self._wake()
            else:
                self._fail(ConnectionDropped("the response body was cut short"))
        if not was_closed and self._pool is not None:
            self._pool.forget(self._key, self)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            if self._head_waiter is None:
                # Bytes on an idle connection: nothing we asked for; it cannot be reused.
                self.close()
                return
            data = self._pending + data if self._pending else data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HEAD:
                    self._fail(BadResponse("the response head is too large"))
                    self.close()
                else:
                    self._pending = data
                return
            self._pending = b""
            try:
                informational = self._parse_head(data[:end])
            except BadResponse as exc:
                self._fail(exc)
                self.close()
                return
            data = data[end + 4 :]
            if informational:
                self.data_received(data)  # the real answer follows a 1xx
                return
            self._in_head = False
            waiter = self._head_waiter
            if not waiter.done():
                waiter.set_result(None)
            if not data and not self._eof:
                return
        if self._eof or self._error is not None:
            if data:
                self.keep_alive = False  # bytes after the response: do not reuse
            return
        framing = self._framing
        if framing == _CHUNKED:
            try:
                self._feed_chunked(data)
            except BadResponse as exc:
                self._fail(exc)
                self.close()
                return
        elif framing == _LENGTH:
            left = self._length_left
            if len(data) >= left:
                if len(data) > left:
                    self.keep_alive = False
                    data = data[:left]
                self._length_left = 0
                self._eof = True
            else:
                self._length_left = left - len(data)
            if data:
                self._body.append(data)
                self._size += len(data)
        else:
            self._body.append(data)
            self._size += len(data)
        if self._size > HIGH_WATER and not self._paused and not self.closed:
            self._paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake()

    # --- framing ----------------------------------------------------------------------

    def _parse_head(self, head: bytes) -> bool:
        """The status and headers; True for a 1xx (another head follows)."""
        lines = head.split(b"\r\n")
        status_line = lines[0]
        if not status_line.startswith(b"HTTP/1."):
            raise BadResponse("the response is not HTTP/1.x")
        try:
            status = int(status_line[9:12])
        except ValueError:
            raise BadResponse("the response has no status code") from None
        if not 100 <= status <= 599 or status_line[8:9] != b" ":
            raise BadResponse("the response has no status code")
        if status < 200:
            return True
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise BadResponse("a response header is malformed")
            key = name.decode("latin-1").lower()
            text = value.strip().decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        self.status = status
        self.headers = headers
        content_type = headers.get("content-type", "")
        self.content_type = content_type.partition(";")[0].strip().lower()
        connection = headers.get("connection", "").lower()
        self.keep_alive = status_line[7:8] == b"1" and "close" not in connection
        if status in (204, 304):
            self._framing = _LENGTH
            self._eof = True
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._framing = _CHUNKED
        elif (length := headers.get("content-length")) is not None:
            if not length.isdigit():
                raise BadResponse("the Content-Length is not a number")
            self._framing = _LENGTH
            self._length_left = int(length)
            self._eof = self._length_left == 0
        else:
            self._framing = _UNTIL_CLOSE
            self.keep_alive = False
        return False

    def _feed_chunked(self, data: bytes) -> None:
        """Append the chunk bodies in ``data`` to the buffer (see the module doc)."""
        if self._pending:
            data = self._pending + data
            self._pending = b""
        body = self._body
        n = len(data)
        pos = 0
        left = self._chunk_left
        while pos < n:
            if left > 0:
                end = pos + left
                if end >= n:
                    part = data if pos == 0 else data[pos:]
                    body.append(part)
                    self._size += n - pos
                    self._chunk_left = end - n if end > n else -2
                    return
                body.append(data[pos:end])
                self._size += left
                pos = end
                left = -2
            if left == -2:
                if n - pos < 2:
                    self._pending = data[pos:]
                    self._chunk_left = -2
                    return
                if data[pos : pos + 2] != b"\r\n":
                    raise BadResponse("a chunk does not end with CRLF")
                pos += 2
                left = -1
                continue
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                if n - pos > MAX_CHUNK_LINE:
                    raise BadResponse("a chunk-size line is too long")
                self._pending = data[pos:]
                self._chunk_left = -1
                return
            line = data[pos:eol]
            if left == -3:
                # Trailers, up to an empty line.
                pos = eol + 2
                if not line:
                    self._eof = True
                    self._chunk_left = 0
                    if pos < n:
                        self.keep_alive = False
                    return
                continue
            semi = line.find(b";")
            try:
                size = int(line if semi < 0 else line[:semi], 16)
            except ValueError:
                raise BadResponse("a chunk size is not hexadecimal") from None
            if size < 0:
                raise BadResponse("a chunk size is negative")
            pos = eol + 2
            left = size if size else -3
        self._chunk_left = left

    # --- wake-ups ---------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: H1Error) -> None:
        if self._error is None:
            self._error = error
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self._wake()
