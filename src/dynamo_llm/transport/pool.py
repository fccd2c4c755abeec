"""The pool of keep-alive connections to workers that generation requests use (:mod:`.h1`).

It keeps what :func:`~.client.make_session` gives aiohttp's connector, for the requests it now
carries instead: at most ``limit`` connections open at once (0: no bound; a request waits for a
free one, bounded only by the caller's timers, once no idle connection to another worker is left
to close for it), an idle connection closed after
``keepalive_timeout`` (shorter than the common worker servers' own idle timeout, so that a
connection is not reused just as the worker closes it), ``connect_timeout`` on the TCP connect,
``TCP_NODELAY``, and the fixed receive buffer (:data:`RECEIVE_BUFFER`) that makes a worker feel a
stalled stream. Connections are kept per worker address and reused last-in first
out (the most recently used is the least likely to have been closed by the worker).

:meth:`Pool.request_head` builds the request head: ``Host``, the body's length, the caller's
headers and the ``Authorization`` a worker gets: its own key (:class:`~.auth.WorkerKeys`) if it
has one, else the credentials in its URL (``http://user:token@host``, as HTTP basic auth), else
the ``--upstream-api-key``. A URL's parts are worked out once per base URL.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import urllib.parse
from collections import deque
from typing import NamedTuple

from ..runtime.clock import Clock, SystemClock, TimerHandle
from .auth import WorkerKeys
from .h1 import ConnectFailed, Connection

__all__ = ["Endpoint", "Pool"]

RESOLVE_TTL = 60.0
"""How long a worker host's addresses are cached (aiohttp's ``ttl_dns_cache`` was 60 s)."""

RECEIVE_BUFFER = 256 * 1024
"""The receive buffer of a connection to a worker (the kernel doubles it for its bookkeeping).

Fixed rather than autotuned, which on Linux may grow to ``net.ipv4.tcp_rmem``'s maximum (32 MiB
here): a stream whose client stopped reading stops being read from its worker's connection, and
only a bounded buffer makes the worker feel that soon. A token stream needs little: 256 KiB keeps
up with 25 MB/s at a 10 ms round trip. (Only generation needs it: the probes, model lists and
stops of aiohttp's session read small answers whole.)
"""


class Endpoint(NamedTuple):
    """A worker base URL, taken apart once."""

    key: tuple[str, int, bool]
    """(host, port, TLS): the connections that can carry its requests."""
    base: str
    """The URL without credentials or trailing slash (what :class:`WorkerKeys` is keyed by)."""
    prefix: bytes
    """The path under which the API sits (``b""`` for most workers)."""
    host_header: bytes
    basic_auth: str | None


class Pool:
    """Per-worker pools of :class:`~.h1.Connection`, with one bound over all of them; the
    keep-alive is timed by ``clock`` (the system's unless a test gives another)."""

    __slots__ = (
        "_addresses",
        "_authorization",
        "_clock",
        "_closed",
        "_connect_timeout",
        "_endpoints",
        "_expiry",
        "_idle",
        "_keepalive",
        "_limit",
        "_open",
        "_receive_buffer",
        "_ssl",
        "_waiters",
        "worker_keys",
    )

    def __init__(
        self,
        connect_timeout: float | None,
        limit: int = 0,
        *,
        keepalive_timeout: float = 4.0,
        authorization: str | None = None,
        worker_keys: WorkerKeys | None = None,
        receive_buffer: int = RECEIVE_BUFFER,
        clock: Clock | None = None,
    ) -> None:
        self._clock = clock or SystemClock()
        self._connect_timeout = connect_timeout
        self._limit = limit
        self._keepalive = keepalive_timeout
        self._authorization = authorization
        self.worker_keys = worker_keys
        self._receive_buffer = receive_buffer
        self._idle: dict[object, list[Connection]] = {}
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._endpoints: dict[str, Endpoint] = {}
        self._addresses: dict[tuple[str, int], tuple[float, list[tuple[object, ...]]]] = {}
        self._expiry: TimerHandle | None = None
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    @property
    def idle(self) -> int:
        """How many connections wait in the pool."""
        return sum(len(conns) for conns in self._idle.values())

    @property
    def open(self) -> int:
        """How many connections are open (idle or carrying a request)."""
        return self._open

    @property
    def waiting(self) -> int:
        """How many requests wait for a connection (the bound is reached)."""
        return len(self._waiters)

    def must_wait(self, endpoint: Endpoint) -> bool:
        """Whether :meth:`acquire` would wait now: the bound is reached, with no idle connection
        to this worker to reuse nor one to another worker to close for it."""
        if not self._limit or self._open < self._limit or self._idle.get(endpoint.key):
            return False
        return not any(self._idle.values())

    def endpoint(self, url: str) -> Endpoint:
        """The parts of the worker base URL ``url`` (cached); ValueError when it is not one."""
        found = self._endpoints.get(url)
        if found is None:
            found = self._endpoints[url] = _parse(url)
        return found

    def request_head(self, endpoint: Endpoint, path: str, headers: bytes, length: int) -> bytes:
        """A POST's head: ``headers`` are ``Name: value\\r\\n`` lines, already encoded."""
        authorization = self._authorization
        if endpoint.basic_auth is not None:
            authorization = endpoint.basic_auth
        keys = self.worker_keys
        if keys:
            key = keys.key_for(endpoint.base + path)
            if key is not None:
                authorization = f"Bearer {key}"
        auth = b"" if authorization is None else _AUTH % authorization.encode()
        return b"".join((
            b"POST ", endpoint.prefix, path.encode(), b" HTTP/1.1\r\nHost: ", endpoint.host_header,
            b"\r\n", headers, auth, b"Content-Length: ", str(length).encode(), b"\r\n\r\n",
        ))  # fmt: skip

    async def acquire(self, endpoint: Endpoint) -> Connection:
        """A connection to the worker: its most recently used idle one, else a new one.

        Raises :class:`~.h1.ConnectFailed`. Cancelled, it leaves nothing behind.
        """
        if self._closed:
            raise ConnectFailed(ConnectionAbortedError(0, "the client is closed"))
        key = endpoint.key
        while True:
            # Taken after every wake-up too: a connection may have come back meanwhile.
            conn = self._take_idle(key)
            if conn is not None:
                return conn
            if not self._limit or self._open < self._limit:
                break
            if self._close_oldest_idle():
                continue  # another worker's idle connection made room: no wait for its expiry
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the slot it was given on
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self._open += 1
        try:
            return await self._connect(endpoint)
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise

    def put_back(self, key: object, conn: Connection) -> None:
        """A connection whose response was read to its end (from :meth:`Connection.release`)."""
        if self._closed:
            conn.close()
            return
        now = self._clock.now()
        conn.idle_since = now
        self._idle.setdefault(key, []).append(conn)
        if self._waiters:
            self._wake_one()
        if self._expiry is None:
            self._expiry = self._clock.call_at(now + self._keepalive, self._expire)

    def forget(self, key: object, conn: Connection) -> None:
        """A connection that closed (from the connection itself)."""
        self._open -= 1
        idle = self._idle.get(key)
        if idle and conn in idle:
            idle.remove(conn)
        self._wake_one()

    async def aclose(self) -> None:
        """Close every idle connection; those carrying a request close when released."""
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for conns in list(self._idle.values()):
            for conn in list(conns):
                conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing

    def _take_idle(self, key: object) -> Connection | None:
        """The most recently used idle connection still within the keep-alive; the expired
        ones it meets are closed (the expiry timer may not have run yet on a busy loop)."""
        idle = self._idle.get(key)
        if not idle:
            return None
        now = self._clock.now()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self._keepalive:
                return conn
            conn.close()
        return None

    def _close_oldest_idle(self) -> bool:
        """Close the idle connection idle the longest, whichever worker it is to; whether there
        was one. At the bound, an idle connection is only room held for a request that may never
        come, while this one waits."""
        oldest: tuple[list[Connection], Connection] | None = None
        for conns in self._idle.values():
            if conns and (oldest is None or conns[0].idle_since < oldest[1].idle_since):
                oldest = (conns, conns[0])  # reused last-in first out: [0] is the longest idle
        if oldest is None:
            return False
        conns, conn = oldest
        conns.remove(conn)
        conn.close()  # forget() gives its slot back, now
        return True

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _expire(self) -> None:
        self._expiry = None
        now = self._clock.now()
        oldest = None
        for conns in list(self._idle.values()):
            for conn in list(conns):
                if now - conn.idle_since >= self._keepalive:
                    conn.close()
                elif oldest is None or conn.idle_since < oldest:
                    oldest = conn.idle_since
        if oldest is not None:
            self._expiry = self._clock.call_at(oldest + self._keepalive, self._expire)

    async def _connect(self, endpoint: Endpoint) -> Connection:
        host, port, tls = endpoint.key
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                for family, type_, proto, _, address in await self._resolve(host, port):
                    sock = socket.socket(family, type_, proto)  # type: ignore[arg-type]
                    try:
                        sock.setblocking(False)
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._receive_buffer)
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        await loop.sock_connect(sock, address)  # type: ignore[arg-type]
                        # Counted by the pool only once made: a stop during the handshake closes
                        # the transport, and its connection_lost must not give back the count
                        # that acquire's own handler gives back.
                        _, conn = await loop.create_connection(
                            lambda: Connection(None, endpoint.key),
                            sock=sock,
                            ssl=self._ssl_context() if tls else None,
                            server_hostname=host if tls else None,
                        )
                        if conn.closed:  # lost before it was counted: a failed connect
                            raise ConnectionResetError(0, "closed while connecting")
                        conn._pool = self
                        return conn
                    except OSError as exc:
                        sock.close()
                        last = exc
                    except BaseException:
                        sock.close()
                        raise
        except TimeoutError:
            raise ConnectFailed(timed_out=True) from None
        raise ConnectFailed(last or OSError(0, "no address"))

    async def _resolve(self, host: str, port: int) -> list[tuple[object, ...]]:
        loop = asyncio.get_running_loop()
        cached = self._addresses.get((host, port))
        if cached is not None and loop.time() - cached[0] < RESOLVE_TTL:
            return cached[1]
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConnectFailed(exc, host=host) from None
        except UnicodeError:
            # The host cannot even be encoded for the resolver (a label over 63 characters, an
            # empty one, bad IDNA): the worker cannot be reached, the same as an unknown name.
            raise ConnectFailed(host=host) from None
        addresses: list[tuple[object, ...]] = list(infos)
        self._addresses[(host, port)] = (loop.time(), addresses)
        return addresses

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl


_AUTH = b"Authorization: %s\r\n"


def _parse(url: str) -> Endpoint:
    parts = urllib.parse.urlsplit(url.rstrip("/"))
    tls = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    default = (tls and port == 443) or (not tls and port == 80)
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if default else f"{shown}:{port}"
    basic = None
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    scheme = "https" if tls else "http"
    base = f"{scheme}://{host_header}{parts.path}"
    return Endpoint((host, port, tls), base, parts.path.encode(), host_header.encode(), basic)
