"""Running the app on a real socket: granian (RSGI, the default) or uvicorn (ASGI).

:class:`HttpServer` runs the server inside the current event loop, so the app, its engines and
its clock all share one loop. With ``port=0`` the OS picks a free port: the server reserves it
with a bound (not listening) ``SO_REUSEPORT`` socket, which granian's own listener then joins, so
no other process can take it in between. ``start()`` returns once connections are accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import uvicorn
from granian.constants import HTTPModes, Interfaces
from granian.server.embed import Server

from ..runtime.tasks import cancel_and_wait
from .app import App
from .asgi import AsgiApp
from .rsgi import RsgiApp

log = logging.getLogger("dynamo_llm.http.server")

INTERFACES = ("rsgi", "asgi")


class HttpServer:
    def __init__(
        self,
        app: App,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        interface: str = "rsgi",
        http2: bool = False,
    ) -> None:
        if interface not in INTERFACES:
            raise ValueError(f"interface must be one of {INTERFACES}, not {interface!r}")
        self.app = app
        self.host = host
        self.port = port
        self.interface = interface
        # HTTP/1.1 only unless asked: HTTP/2 lets one connection open many streams at once,
        # which deserves an operator's decision (uvicorn speaks HTTP/1.1 only in any case).
        self.http2 = http2
        self._task: asyncio.Task[Any] | None = None
        self._reservation: socket.socket | None = None
        self._server: Any = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self, ready_within: float = 10.0) -> None:
        await self.app.astart()
        if self.interface == "rsgi":
            self._start_granian()
        else:
            self._start_uvicorn()
        await self._wait_ready(ready_within)
        log.info("serving on %s (%s)", self.base_url, self.interface)

    def _reserve(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._reservation = sock

    def _start_granian(self) -> None:
        self._reserve()
        # The embedded server warns that it is experimental on every start; we rely on it
        # deliberately (one event loop for server, app and engines), so keep that out of logs.
        logging.getLogger("_granian").setLevel(logging.ERROR)
        server = Server(
            RsgiApp(self.app),
            address=self.host,
            port=self.port,
            interface=Interfaces.RSGI,
            http=HTTPModes.auto if self.http2 else HTTPModes.http1,
            log_enabled=False,
            backlog=1024,
        )
        self._server = server
        self._task = asyncio.get_running_loop().create_task(server.serve())

    def _start_uvicorn(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._reservation = sock
        config = uvicorn.Config(
            AsgiApp(self.app), lifespan="off", log_config=None, access_log=False
        )
        server = uvicorn.Server(config)
        self._server = server
        self._task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))

    async def _wait_ready(self, limit: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        delay = 0.001
        while True:
            if self._task is not None and self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                if loop.time() > deadline:
                    raise TimeoutError(f"{self.base_url} not ready in {limit}s") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

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
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None
        self._server = self._task = None
        await self.app.aclose()

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
