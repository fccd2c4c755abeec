"""Shared by the tests that run the routed frontend in this process in front of real workers.

The frontend is ``build_routed_app`` served by granian on a loopback port, exactly as
``dynamo-llm serve --upstream-file`` runs it; the workers are processes from
:mod:`dynamo_llm.testing.bad_workers`. Used by ``test_router_integration``,
``test_fault_matrix``, ``test_migration`` and ``test_discovery``.
"""

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec

from dynamo_llm.config import Config
from dynamo_llm.fleet import Fleet, build_routed_app
from dynamo_llm.http.app import App
from dynamo_llm.http.server import HttpServer
from dynamo_llm.router import Worker
from dynamo_llm.runtime.clock import SystemClock
from dynamo_llm.testing import Frontend
from dynamo_llm.testing.bad_workers import BadWorker, spawn_bad_worker
from tests.helpers import registered
from tests.system.raw_http import raw_post, read_events

SAFETY_NET = 20.0
# A worker that streams its first token, then waits this long before the next: "mid-stream".
HOLD = 30.0
# Short router limits (seconds) so the fault tests end fast; the HTTP layer's net is twice that.
LIMITS = {"DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS": "1", "DYN_HTTP_FIRST_TOKEN_TIMEOUT_SECS": "1"}


# --- the frontend --------------------------------------------------------------------------------


class RoutedFrontend(Frontend):
    """A routed app on a real socket, its :class:`Fleet`, and an HTTP client to it."""

    def __init__(self, app: App, server: HttpServer, fleet: Fleet) -> None:
        super().__init__(app, server)
        self.fleet = fleet
        self.http = httpx.AsyncClient(base_url=server.base_url, timeout=SAFETY_NET)
        self._changed = asyncio.Event()
        fleet.workers.on_change(lambda _models: self._changed.set())

    def worker(self, url: str) -> Worker:
        return registered(self.fleet.workers, url)

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds, re-checking whenever the worker set changes."""
        while True:
            self._changed.clear()
            if predicate():
                return
            await self._changed.wait()

    def worker_gauges(self) -> dict[str, tuple[float, float]]:
        """Per worker: (``worker_inflight_requests``, ``worker_quarantined``)."""
        return {
            w.id: (
                self.value("worker_inflight_requests", worker=w.id),
                self.value("worker_quarantined", worker=w.id),
            )
            for w in self.fleet.workers
        }

    def assert_idle(self, requests: int) -> None:
        """No request in flight anywhere, each of ``requests`` counted exactly once."""
        assert self.value("inflight_requests") == 0
        assert self.value("queued_requests") == 0
        assert self.value("requests_total") == requests
        assert all(inflight == 0 for inflight, _ in self.worker_gauges().values())
        assert all(w.inflight == 0 for w in self.fleet.workers)


async def health(fe: RoutedFrontend) -> tuple[int, dict[str, str]]:
    """``/health``: its status and each worker's state."""
    response = await fe.http.get("/health")
    states = {w["url"]: w["state"] for model in response.json()["models"] for w in model["workers"]}
    return response.status_code, states


def fleet_of(app: App) -> Fleet:
    # build_routed_app keeps its Fleet only as the app's lifecycle hooks: find it there.
    for start, _ in app._lifecycle:
        fleet = getattr(start, "__self__", None)
        if isinstance(fleet, Fleet):
            return fleet
    raise AssertionError("build_routed_app registered no Fleet")


@contextlib.asynccontextmanager
async def routed_frontend(
    tmp_path: Path,
    models: Mapping[str, list[str]] | None = None,
    *,
    upstreams: tuple[str, ...] = (),
    mode: str = "round-robin",
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[RoutedFrontend]:
    """The routed frontend on 127.0.0.1, its workers named by an upstream file (``models``)
    and/or ``--upstream`` URLs; ``env`` as the process environment would give it."""
    config = Config.from_env({"DYN_ROUTER_MODE": mode, **(env or {})})
    if models is not None:
        path = tmp_path / f"upstreams-{uuid.uuid4().hex[:8]}.yaml"
        path.write_text(json.dumps(models))  # JSON is YAML too
        config = config.replace(upstream_file=str(path))
    config = config.replace(upstreams=upstreams)
    app = build_routed_app(config, SystemClock())
    fleet = fleet_of(app)
    server = HttpServer(app, "127.0.0.1", 0)
    await server.start()
    frontend = RoutedFrontend(app, server, fleet)
    try:
        yield frontend
    finally:
        await frontend.http.aclose()
        await app.shutdown(grace=0, kill_wait=5)
        await server.stop()


@contextlib.asynccontextmanager
async def bad_workers(**specs: dict[str, Any]) -> AsyncIterator[dict[str, BadWorker]]:
    """Start several bad workers at once: ``name=dict(behaviour=..., tokens=..., gap=...)``."""
    async with contextlib.AsyncExitStack() as stack:
        workers: dict[str, BadWorker] = {}

        async def start(name: str, spec: dict[str, Any]) -> None:
            workers[name] = await stack.enter_async_context(spawn_bad_worker(**spec))

        async with asyncio.TaskGroup() as group:
            for name, spec in specs.items():
                group.create_task(start(name, spec))
        yield workers


# --- the client ----------------------------------------------------------------------------------


def chat(model: str, *, stream: bool, content: str = "say something") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream}


def completion(model: str, *, stream: bool, prompt: str = "say something") -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "stream": stream}


def path_of(payload: Mapping[str, Any]) -> str:
    return "/v1/chat/completions" if "messages" in payload else "/v1/completions"


class RawClient:
    """One request over a raw socket, so that the test picks the exact moment of the hang-up."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def send(
        cls, fe: Frontend, payload: Mapping[str, Any], headers: Mapping[str, str]
    ) -> "RawClient":
        reader, writer = await asyncio.open_connection("127.0.0.1", fe.server.port)
        lines = (f"{name}: {value}".encode() for name, value in headers.items())
        writer.write(raw_post(path_of(payload), msgspec.json.encode(payload), *lines))
        await writer.drain()
        return cls(reader, writer)

    async def events(self, count: int) -> None:
        """Read until ``count`` SSE data lines have arrived."""
        await read_events(self.reader, count)

    async def rest(self) -> bytes:
        """The rest of a chunked response, up to its last chunk."""
        return await self.reader.readuntil(b"\r\n0\r\n\r\n")

    def hang_up(self) -> float:
        """Reset the connection now; returns the moment, on the system-wide monotonic clock."""
        t0 = time.monotonic()
        self.writer.transport.abort()
        return t0


@dataclass
class Reply:
    status: int
    body: bytes
    seconds: float

    def error(self) -> dict[str, Any]:
        """The error body: the JSON of an HTTP error, or the data of an SSE ``event: error``."""
        if self.status != 200:
            return dict(json.loads(self.body)["error"])
        for event in self.body.split(b"\n\n"):
            if event.startswith(b"event: error\n"):
                data = event.split(b"\n", 1)[1].removeprefix(b"data: ")
                return dict(json.loads(data)["error"])
        raise AssertionError(f"no error in {self.body[-300:]!r}")

    @property
    def done(self) -> bool:
        return self.body.endswith(b"data: [DONE]\n\n")


async def send(
    fe: RoutedFrontend,
    payload: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """A whole request; a stream is read to its end."""
    t0 = time.monotonic()
    async with fe.http.stream(
        "POST", path_of(payload), json=payload, headers=dict(headers or {})
    ) as response:
        body = await response.aread()
    return Reply(response.status_code, body, time.monotonic() - t0)


async def ok(fe: RoutedFrontend, payload: Mapping[str, Any], **headers: str) -> Reply:
    reply = await send(fe, payload, headers)
    assert reply.status == 200, reply.body
    assert reply.done or not payload.get("stream"), reply.body[-300:]
    return reply


def rid() -> str:
    return uuid.uuid4().hex
