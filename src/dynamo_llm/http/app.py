"""The OpenAI-compatible HTTP application, independent of the server interface.

:func:`create_app` builds an :class:`App` from the configuration, the served models, the
metrics and the clock. Server adapters (``rsgi``, ``asgi``) hand it each request as an
:class:`~dynamo_llm.http.connection.HttpRequest` and a
:class:`~dynamo_llm.http.connection.Connection`; :meth:`App.handle` does the rest.

An inference request goes: read and validate the body (errors are plain JSON responses, counted
with the fixed ``unknown_model`` label when the model is not served), admit it (in-flight and
queued gauges), then the handler phase (admission by the engine, in a task, under the armed
connection handle) and, for a streaming request, the stream phase
(:func:`~dynamo_llm.http.disconnect.monitor_for_disconnects`). The outcome record is released in
exactly one place, the ``finally`` of :meth:`App._inference`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..config import Config
from ..engines.base import NO_ROUTING_HINT, Engine, EngineRequest, RoutingHint, aclose_stream
from ..engines.endpoints import (
    CHAT,
    COMPLETIONS,
    EndpointFamily,
    P,
)
from ..engines.fanout import open_fanout
from ..errors import (
    AllWorkersBusy,
    DynamoError,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    UnsupportedMediaType,
    internal_error,
    render_error,
)
from ..metrics import UNKNOWN_MODEL, Metrics, RequestRecord
from ..protocols.common import peek_request
from ..runtime.clock import Clock, SystemClock
from ..runtime.context import EngineContext, StopReason
from ..runtime.watchdog import Watchdog
from .aggregate import Aggregator
from .connection import Connection, Headers, HttpRequest
from .disconnect import (
    DisconnectMonitor,
    SseResponse,
    error_for_stop,
    monitor_for_disconnects,
)
from .exchange import ClientGone, Exchange, Waker
from .openapi import openapi_document
from .sse import SSE_HEADERS, ChunkRenderer

log = logging.getLogger("dynamo_llm.http")

JSON_HEADERS: Headers = [("content-type", "application/json")]
_encode = msgspec.json.encode


@dataclass
class ServedModel:
    """A model the frontend serves, and the engine that serves it."""

    name: str
    engine: Engine
    context_length: int | None = None
    owned_by: str = "dynamo-llm"
    created: int = field(default_factory=lambda: int(time.time()))
    is_ready: Callable[[], bool] = lambda: True
    describe: Callable[[], dict[str, Any]] = lambda: {}
    # The engine times each attempt itself (the router): the HTTP layer's first-token limit is
    # then a safety net at twice the value, like the inactivity window, so the router fires first.
    routed: bool = False


def resolve_request_id(value: str | None) -> str:
    """The client's ``X-Request-Id`` when it is 1-128 printable ASCII characters, else a UUIDv4."""
    if value and len(value) <= 128 and all(0x21 <= ord(c) <= 0x7E for c in value):
        return value
    return str(uuid4())


class App:
    """Routes requests and owns every in-flight request's lifecycle."""

    def __init__(
        self,
        config: Config,
        models: Sequence[ServedModel],
        metrics: Metrics,
        clock: Clock,
        *,
        control_routes: bool = False,
    ) -> None:
        self.config = config
        self.control_routes = control_routes
        self.metrics = metrics
        self.clock = clock
        self.models: dict[str, ServedModel] = {m.name: m for m in models}
        self.shutting_down = False
        self._live: dict[EngineContext, None] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._background: list[asyncio.Task[None]] = []
        self._lifecycle: list[tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]]
        self._lifecycle = []
        self._get_routes: dict[str, Callable[[HttpRequest, Connection], Awaitable[None]]] = {
            "/v1/models": self._list_models,
            "/health": self._health,
            "/live": self._live_probe,
            "/metrics": self._metrics,
            "/openapi.json": self._openapi,
            "/docs": self._docs,
        }
        self._post_routes: dict[str, Callable[[HttpRequest, Connection], Awaitable[None]]] = {
            CHAT.path: lambda request, conn: self._inference(request, conn, CHAT),
            COMPLETIONS.path: lambda request, conn: self._inference(request, conn, COMPLETIONS),
        }
        for model in models:
            metrics.model_ready.labels(model.name).set(1 if model.is_ready() else 0)

    # --- lifecycle ----------------------------------------------------------------------------

    def add_lifecycle(
        self, start: Callable[[], Awaitable[None]], close: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``start`` when the app starts and ``close`` when it closes (before the engines)."""
        self._lifecycle.append((start, close))

    async def astart(self) -> None:
        """Start background work (the event-loop canary) and the lifecycle hooks."""
        if not self._background:
            self._background.append(
                asyncio.create_task(self.metrics.run_event_loop_canary(self.clock))
            )
            for start, _ in self._lifecycle:
                await start()

    async def aclose(self) -> None:
        """Stop background work, run the close hooks (last added first), close the engines."""
        for task in self._background:
            task.cancel()
        if self._background:
            await asyncio.wait(self._background)
            for _, close in reversed(self._lifecycle):
                await close()
        self._background.clear()
        engines = {id(m.engine): m.engine for m in self.models.values()}
        for engine in engines.values():
            await engine.aclose()

    def add_model(self, model: ServedModel) -> None:
        """Serve another model (or replace one with the same name), e.g. found by discovery."""
        self.models[model.name] = model
        self.metrics.model_ready.labels(model.name).set(1 if model.is_ready() else 0)

    def remove_model(self, name: str) -> None:
        """Stop serving a model: new requests for it get 404; requests in flight finish."""
        if self.models.pop(name, None) is not None:
            self.metrics.model_ready.remove(name)

    @property
    def inflight(self) -> int:
        return len(self._live)

    async def shutdown(self, grace: float | None = None, kill_wait: float = 5.0) -> None:
        """Graceful shutdown: ``/live`` turns 503; requests in flight get ``grace`` seconds to
        finish; the rest are killed with reason ``shutdown`` and awaited."""
        self.shutting_down = True
        grace = self.config.graceful_shutdown_timeout_secs if grace is None else grace
        if self._live:
            log.info(
                "shutting down: %d request(s) in flight, waiting up to %gs", len(self._live), grace
            )
            await self._wait_idle(grace)
        if self._live:
            log.warning("shutting down: stopping %d request(s) still in flight", len(self._live))
            for ctx in list(self._live):
                ctx.kill(StopReason.SHUTDOWN)
            await self._wait_idle(kill_wait)

    async def wait_until_idle(self) -> None:
        """Return once no admitted request is in flight (every outcome recorded)."""
        await self._idle.wait()

    async def _wait_idle(self, seconds: float) -> None:
        waiter = asyncio.ensure_future(self._idle.wait())
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        try:
            await asyncio.wait([waiter, sleeper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (waiter, sleeper):
                fut.cancel()
            await asyncio.wait([waiter, sleeper])

    # --- routing ------------------------------------------------------------------------------

    async def handle(self, request: HttpRequest, conn: Connection) -> None:
        path = request.path
        method = request.method
        if self.control_routes and path.startswith(_STOP_PREFIX) and path.endswith("/stop"):
            if method == "POST":
                await self._stop_request(conn, path[len(_STOP_PREFIX) : -len("/stop")])
                return
            await self._error(conn, MethodNotAllowed(f"Method {method} not allowed on {path}"))
            return
        post_route = self._post_routes.get(path)
        if post_route is not None:
            if method == "POST":
                await post_route(request, conn)
                return
            await self._error(conn, MethodNotAllowed(f"Method {method} not allowed on {path}"))
            return
        get_route = self._get_routes.get(path)
        if get_route is None and path.startswith("/v1/models/"):
            get_route = self._get_model
        if get_route is not None:
            if method in ("GET", "HEAD"):
                await get_route(request, conn)
                return
            await self._error(conn, MethodNotAllowed(f"Method {method} not allowed on {path}"))
            return
        await self._error(conn, NotFound(f"No route for {method} {path}", code="route_not_found"))

    async def _error(
        self, conn: Connection, exc: DynamoError, headers: Headers = JSON_HEADERS
    ) -> None:
        if not conn.is_disconnected:
            await conn.respond(exc.status, headers, render_error(exc))

    async def _json(self, conn: Connection, status: int, payload: object) -> None:
        await conn.respond(status, JSON_HEADERS, _encode(payload))

    # --- inference ----------------------------------------------------------------------------

    async def _inference(
        self, request: HttpRequest, conn: Connection, family: EndpointFamily[P]
    ) -> None:
        endpoint = family.endpoint
        record = self.metrics.begin(endpoint, self.clock)
        request_id = resolve_request_id(request.headers.get("x-request-id"))
        headers: Headers = [*JSON_HEADERS, ("x-request-id", request_id)]
        ctx: EngineContext | None = None
        monitor: DisconnectMonitor | None = None
        watchdog: Watchdog | None = None
        try:
            params, body = await self._read_params(request, conn, family, record)
            served = self.models.get(params.model)
            if served is None:
                raise ModelNotFound(f"The model `{params.model}` does not exist.", param="model")
            ctx = EngineContext(request_id)
            record.admit(served.name)
            self._live[ctx] = None
            self._idle.clear()
            waker = Waker()
            monitor = DisconnectMonitor(
                ctx, self.metrics, served.name, endpoint, record.request_type
            )
            config = self.config
            watchdog = Watchdog(
                self.clock,
                ctx,
                inactivity=config.http_inactivity_secs,
                first_token=(
                    config.first_token_timeout_secs * (2 if served.routed else 1)
                    if config.first_token_timeout_secs
                    else None
                ),
                deadline=config.request_timeout_secs,
                on_expire=waker.wake,
            )
            exchange = Exchange(ctx, conn, record, monitor, watchdog, waker, headers)
            conn.on_disconnect(waker.wake)
            ctx.on_stop(waker.wake)
            worker_id = request.headers.get("x-worker-instance-id")
            requests = family.split(
                params,
                request_id=request_id,
                model=served.name,
                raw_body=body,
                routing=RoutingHint(worker_id=worker_id[:256]) if worker_id else NO_ROUTING_HINT,
            )
            watchdog.start()
            if params.stream:
                await self._stream(exchange, served, family, params, requests)
            else:
                await self._unary(exchange, served, family, params, requests)
        except ClientGone:
            record.mark_error("cancelled")
        except DynamoError as exc:
            record.mark_error(exc.error_type)
            if isinstance(exc, AllWorkersBusy):
                self.metrics.model_rejection_total.labels(record.model, endpoint).inc()
            if monitor is not None:
                monitor.connection.disarm()
            await self._error(conn, exc, headers)
        except Exception:
            log.exception("request %s failed", request_id)
            record.mark_error("internal")
            if monitor is not None:
                monitor.connection.disarm()
            await self._error(conn, internal_error(), headers)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if monitor is not None:
                monitor.release_all()
            record.release()
            if ctx is not None:
                self._live.pop(ctx, None)
                if not self._live:
                    self._idle.set()

    async def _read_params(
        self,
        request: HttpRequest,
        conn: Connection,
        family: EndpointFamily[P],
        record: RequestRecord,
    ) -> tuple[P, bytes]:
        body = b""
        try:
            content_type = request.headers.get("content-type")
            if content_type is not None and content_type.split(";", 1)[0].strip().lower() != (
                "application/json"
            ):
                raise UnsupportedMediaType(
                    f"Content-Type must be application/json, got {content_type[:100]!r}"
                )
            body = await conn.read_body(self.config.body_limit_bytes)
            params = family.decode(body)
        except DynamoError:
            # Label the failure with the model when it is one we serve; otherwise the fixed label.
            name, stream = peek_request(body) if body else (None, False)
            record.model = name if name in self.models else UNKNOWN_MODEL
            record.request_type = "stream" if stream else "unary"
            raise
        record.request_type = "stream" if params.stream else "unary"
        if params.model not in self.models:
            record.model = UNKNOWN_MODEL
        return params, body

    def _open(
        self, served: ServedModel, requests: list[EngineRequest], ctx: EngineContext, n: int
    ) -> asyncio.Task[Any]:
        return asyncio.get_running_loop().create_task(
            open_fanout(served.engine, requests, ctx, n=n)
        )

    async def _stream(
        self,
        exchange: Exchange,
        served: ServedModel,
        family: EndpointFamily[P],
        params: P,
        requests: list[EngineRequest],
    ) -> None:
        stream_options = params.stream_options
        renderer = ChunkRenderer(
            family.kind,
            family.response_id(exchange.ctx.id),
            served.name,
            int(time.time()),
            include_usage=bool(stream_options is not None and stream_options.include_usage),
            with_token_ids=params.return_token_ids,
        )
        stream = await exchange.handler_phase(
            self._open(served, requests, exchange.ctx, params.n or 1)
        )
        response = SseResponse(exchange, [*SSE_HEADERS, exchange.response_headers[-1]])
        try:
            await monitor_for_disconnects(exchange, stream, response, renderer)
        finally:
            if response.writer is not None:
                await exchange.conn.end_stream()

    async def _unary(
        self,
        exchange: Exchange,
        served: ServedModel,
        family: EndpointFamily[P],
        params: P,
        requests: list[EngineRequest],
    ) -> None:
        aggregator = Aggregator(
            family.kind,
            family.response_id(exchange.ctx.id),
            served.name,
            int(time.time()),
            choices=len(requests),
            with_token_ids=params.return_token_ids,
        )
        work = asyncio.get_running_loop().create_task(
            self._collect(exchange, served, requests, params.n or 1, aggregator)
        )
        body = await exchange.handler_phase(work)
        exchange.record.mark_ok()
        await exchange.conn.respond(200, exchange.response_headers, body)

    async def _collect(
        self,
        exchange: Exchange,
        served: ServedModel,
        requests: list[EngineRequest],
        n: int,
        aggregator: Aggregator,
    ) -> bytes:
        ctx = exchange.ctx
        stream = await open_fanout(served.engine, requests, ctx, n=n)
        touch = exchange.watchdog.touch
        now = exchange.watchdog.clock.now
        on_tokens = exchange.record.on_tokens
        try:
            async for out in stream:
                t = now()
                touch(t)
                on_tokens(out.num_tokens, out.prompt_tokens, t)
                aggregator.add(out)
        finally:
            await aclose_stream(stream)
        if ctx.is_stopped:
            raise error_for_stop(ctx.reason)
        return aggregator.render()

    # --- other routes -------------------------------------------------------------------------

    async def _stop_request(self, conn: Connection, request_id: str) -> None:
        """Stop generating (gracefully) every request in flight with this id.

        A frontend uses it to pass a graceful stop across the wire to a ``dynamo-llm worker``;
        only workers enable it (it trusts the caller with every request id).
        """
        stopped = 0
        for ctx in list(self._live):
            if ctx.id == request_id and not ctx.is_stopped:
                ctx.stop_generating(StopReason.EXPLICIT)
                stopped += 1
        if stopped == 0:
            await self._error(
                conn,
                NotFound(f"No request `{request_id[:128]}` in flight", code="request_not_found"),
            )
            return
        await self._json(conn, 200, {"id": request_id, "stopped": stopped})

    def _model_card(self, model: ServedModel) -> dict[str, Any]:
        card: dict[str, Any] = {
            "id": model.name,
            "object": "model",
            "created": model.created,
            "owned_by": model.owned_by,
        }
        if model.context_length is not None:
            card["context_window"] = model.context_length
        return card

    async def _list_models(self, request: HttpRequest, conn: Connection) -> None:
        await self._json(
            conn,
            200,
            {"object": "list", "data": [self._model_card(m) for m in self.models.values()]},
        )

    async def _get_model(self, request: HttpRequest, conn: Connection) -> None:
        name = request.path[len("/v1/models/") :].lstrip("/")
        model = self.models.get(name)
        if model is None:
            await self._error(
                conn, ModelNotFound(f"The model `{name[:256]}` does not exist.", param="model")
            )
            return
        await self._json(conn, 200, self._model_card(model))

    async def _health(self, request: HttpRequest, conn: Connection) -> None:
        models = []
        any_ready = False
        for model in self.models.values():
            ready = model.is_ready()
            any_ready = any_ready or ready
            self.metrics.model_ready.labels(model.name).set(1 if ready else 0)
            models.append({"model": model.name, "ready": ready, **model.describe()})
        status = "healthy" if any_ready else "unhealthy"
        await self._json(conn, 200 if any_ready else 503, {"status": status, "models": models})

    async def _live_probe(self, request: HttpRequest, conn: Connection) -> None:
        if self.shutting_down:
            await self._json(
                conn, 503, {"status": "shutting_down", "message": "Service is shutting down"}
            )
        else:
            await self._json(conn, 200, {"status": "live", "message": "Service is live"})

    async def _metrics(self, request: HttpRequest, conn: Connection) -> None:
        await conn.respond(
            200, [("content-type", CONTENT_TYPE_LATEST)], generate_latest(self.metrics.registry)
        )

    async def _openapi(self, request: HttpRequest, conn: Connection) -> None:
        await conn.respond(200, JSON_HEADERS, openapi_document())

    async def _docs(self, request: HttpRequest, conn: Connection) -> None:
        await conn.respond(200, [("content-type", "text/html; charset=utf-8")], _DOCS_HTML)


_STOP_PREFIX = "/v1/requests/"


_DOCS_HTML = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>dynamo-llm API</title></head>
<body><h1>dynamo-llm</h1>
<p>OpenAI-compatible API. The machine-readable description is at
<a href="/openapi.json">/openapi.json</a> (OpenAPI 3.1).</p>
<ul>
<li><code>POST /v1/chat/completions</code></li>
<li><code>POST /v1/completions</code></li>
<li><code>GET /v1/models</code>, <code>GET /v1/models/{id}</code></li>
<li><code>GET /health</code>, <code>GET /live</code>, <code>GET /metrics</code></li>
</ul></body></html>
"""


def create_app(
    config: Config,
    models: Sequence[ServedModel],
    metrics: Metrics | None = None,
    clock: Clock | None = None,
    *,
    control_routes: bool = False,
) -> App:
    """Build the app; a fresh metrics registry and the system clock unless given.

    ``control_routes`` enables ``POST /v1/requests/{id}/stop`` (for ``dynamo-llm worker``).
    """
    return App(
        config,
        models,
        metrics if metrics is not None else Metrics(prefix=config.metrics_prefix),
        clock if clock is not None else SystemClock(),
        control_routes=control_routes,
    )
