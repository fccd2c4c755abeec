"""Running the app on a real socket: granian (RSGI, the default) or uvicorn (ASGI).

:class:`HttpServer` runs the server inside the current event loop, so the app, its engines and
its clock all share one loop.

**The listening socket is ours.** :func:`listen_socket` binds and listens without
``SO_REUSEPORT``, so a second server on a port in use fails at once with
:class:`AddressInUse` instead of silently sharing the port (granian's own listener sets
``SO_REUSEPORT`` on every bind). Either server is handed a duplicate of that socket's descriptor,
which it closes when it stops; the original stays open, so the port stays ours until
:meth:`HttpServer.stop`, and the ``--num-workers`` processes (:mod:`dynamo_llm.supervisor`) all
accept from the one socket their parent owns. With ``port=0`` the OS picks a free port.
``start()`` returns once connections are accepted.

**Connections are not a limit.** granian admits at most ``backpressure`` connections per worker
and leaves the rest in the kernel's accept queue (its default, the backlog, is 1 024): past that
every new client, a health probe included, waits for a connection to close. The limit here is the
process's file-descriptor limit (which ``cli`` raises to its hard limit), so what bounds
connections is memory, not a counter. A client must send its request headers within
``read_timeout`` (granian's HTTP/1 header read timeout; under uvicorn, which has none, the same
rule from :mod:`.header_timeout`; the body's is enforced by the inference routes), so slow-loris
connections are closed rather than held.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
from typing import Any

import uvicorn
from granian._granian import SocketHolder
from granian.constants import HTTPModes, Interfaces, TaskImpl
from granian.http import HTTP1Settings
from granian.server.embed import Server

from ..runtime.tasks import cancel_and_wait
from .app import App
from .asgi import AsgiApp
from .header_timeout import protocol_with_header_timeout
from .rsgi import RsgiApp

log = logging.getLogger("dynamo_llm.http.server")

INTERFACES = ("rsgi", "asgi")
BACKLOG = 4096
"""Pending connections the kernel queues (capped by ``net.core.somaxconn``): a burst of new
clients waits there for an accept instead of being refused."""
DEFAULT_READ_TIMEOUT = 30.0


class AddressInUse(OSError):
    """Another process listens on the address: the server cannot start."""


def listen_socket(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A TCP socket listening on ``host:port``, owned by the caller (who closes it).

    ``SO_REUSEADDR`` lets a restart bind at once over connections in TIME_WAIT; there is no
    ``SO_REUSEPORT``, so a port another socket listens on raises :class:`AddressInUse`.
    ``TCP_NODELAY`` is set on it, hence on every connection it accepts.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it (Linux): no Nagle delay on small SSE writes, as
        # granian's own listener sets.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise AddressInUse(
                exc.errno, f"{where} is already in use (another server listens on it)"
            ) from None
        raise
    return sock


def max_connections() -> int:
    """The most connections one process can hold: its file-descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class _SharedSocketServer(Server):
    """granian's embedded server accepting from a socket we own (a duplicate of its fd)."""

    def __init__(self, target: Any, sock: socket.socket, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self._listener = sock

    def _init_shared_socket(self) -> None:
        # granian closes the descriptor it is given when its worker stops: give it a copy.
        self._sfd = os.dup(self._listener.fileno())  # type: ignore[assignment]
        self._shd = SocketHolder(self._sfd, False, self.backlog)  # type: ignore[call-arg,assignment]
        self._ssp = None


class HttpServer:
    def __init__(
        self,
        app: App,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        interface: str = "rsgi",
        http2: bool = False,
        sock: socket.socket | None = None,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
    ) -> None:
        """Serve ``app`` on ``host:port``, or on ``sock`` (a listening socket the caller owns
        and closes; ``host`` then only names it in :attr:`base_url`)."""
        if interface not in INTERFACES:
            raise ValueError(f"interface must be one of {INTERFACES}, not {interface!r}")
        self.app = app
        self.host = host
        self.port = port if sock is None else sock.getsockname()[1]
        self.interface = interface
        # HTTP/1.1 only unless asked: HTTP/2 lets one connection open many streams at once,
        # which deserves an operator's decision (uvicorn speaks HTTP/1.1 only in any case).
        self.http2 = http2
        self.read_timeout = read_timeout
        self._given = sock
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[Any] | None = None
        self._server: Any = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self, ready_within: float = 10.0) -> None:
        if self._given is not None:
            sock = self._given
        else:
            sock = self._sock = listen_socket(self.host, self.port)
            self.port = sock.getsockname()[1]
        await self.app.astart()
        if self.interface == "rsgi":
            self._start_granian(sock)
        else:
            self._start_uvicorn(sock)
        await self._wait_ready(ready_within)
        log.info("serving on %s (%s)", self.base_url, self.interface)

    def _start_granian(self, sock: socket.socket) -> None:
        # The embedded server warns that it is experimental on every start; we rely on it
        # deliberately (one event loop for server, app and engines), so keep that out of logs.
        logging.getLogger("_granian").setLevel(logging.ERROR)
        server = _SharedSocketServer(
            RsgiApp(self.app),
            sock,
            address=self.host,
            port=self.port,
            interface=Interfaces.RSGI,
            # Each request in a real asyncio task, which the body read timeout cancels.
            task_impl=TaskImpl.asyncio,
            http=HTTPModes.auto if self.http2 else HTTPModes.http1,
            log_enabled=False,
            backlog=BACKLOG,
            backpressure=max_connections(),
            http1_settings=HTTP1Settings(header_read_timeout=int(self.read_timeout * 1000)),
        )
        self._server = server
        self._task = asyncio.get_running_loop().create_task(server.serve())

    def _start_uvicorn(self, sock: socket.socket) -> None:
        config = uvicorn.Config(
            AsgiApp(self.app),
            lifespan="off",
            log_config=None,
            access_log=False,
            backlog=BACKLOG,
            http=protocol_with_header_timeout(self.read_timeout),
        )
        server = uvicorn.Server(config)
        self._server = server
        # asyncio closes the sockets it serves on when the server closes: hand it a duplicate.
        self._task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock.dup()]))

    async def _wait_ready(self, limit: float) -> None:
        # The socket listens before the server runs (the kernel queues early clients), so a
        # connection proves nothing: wait for an HTTP answer from the server itself.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        delay = 0.001
        while True:
            if self._task is not None and self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            if await self._answers(max(0.01, deadline - loop.time())):
                return
            if loop.time() > deadline:
                raise TimeoutError(f"{self.base_url} not ready in {limit}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _answers(self, within: float) -> bool:
        writer = None
        try:
            async with asyncio.timeout(min(within, 1.0)):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                writer.write(b"GET /live HTTP/1.1\r\nhost: ready\r\nconnection: close\r\n\r\n")
                return (await reader.readline()).startswith(b"HTTP/")
        except (OSError, TimeoutError):
            return False
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def stop(self) -> None:
        """Stop accepting and close the server (call ``app.shutdown()`` first to drain)."""
        server, task = self._server, self._task
        if server is not None and task is not None:
            if self.interface == "rsgi":
                server.interrupt_signal = True
                server.main_loop_interrupt.set()
            else:
                server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=10)
            except TimeoutError:
                await cancel_and_wait(task)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._server = self._task = None
        await self.app.aclose()

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
