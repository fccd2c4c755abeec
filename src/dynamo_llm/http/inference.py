"""The inference routes (``POST /v1/chat/completions``, ``POST /v1/completions``): one handler
per endpoint family, generic over the family's descriptor.

A request goes: read and validate the body (errors are plain JSON responses, counted with the
fixed ``unknown_model`` label when the model is not served), admit it (in-flight and queued
gauges, tracked in the app state), build its engine requests through the family's descriptor
(the client's routing hint included), then the handler phase (admission by the engine, in the
handler's own task, under the armed connection handle: :meth:`~dynamo_llm.http.exchange.Exchange.
handler_phase`) and, for a streaming request, the stream phase
(:func:`~dynamo_llm.http.stream.monitor_for_disconnects`); a unary request is folded into one
response by the :class:`~dynamo_llm.http.aggregate.Aggregator` (or, from a router that asked its
worker for a unary answer, is that answer as it came). The outcome record is released
in exactly one place, the ``finally`` of :meth:`InferenceHandler.__call__`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Generic

from ..engines.base import (
    NO_ROUTING_HINT,
    EngineOutput,
    EngineRequest,
    RoutingHint,
    aclose_stream,
)
from ..engines.endpoints import CHAT, COMPLETIONS, EndpointFamily, P
from ..engines.fanout import open_fanout
from ..errors import (
    AllWorkersBusy,
    DynamoError,
    ModelNotFound,
    RequestBodyTimeout,
    ServerDraining,
    UnsupportedMediaType,
    clip,
    internal_error,
)
from ..metrics import UNKNOWN_MODEL, Outcome, RequestRecord
from ..protocols.common import peek_request
from ..runtime.context import EngineContext
from ..runtime.ids import new_request_id
from ..runtime.watchdog import Watchdog
from .aggregate import Aggregator
from .connection import Connection, Headers, HttpRequest
from .disconnect import DisconnectMonitor, error_for_stop
from .exchange import ClientGone, Exchange, Waker
from .responses import JSON_HEADERS, respond_error, with_request_id
from .routes import POST, Route
from .sse import SSE_HEADERS, ChunkRenderer
from .state import AppState, ServedModel
from .stream import SseResponse, monitor_for_disconnects

__all__ = ["InferenceHandler", "read_body_within", "resolve_request_id", "routes"]

log = logging.getLogger("dynamo_llm.http")


def routes(state: AppState) -> list[Route]:
    """The inference routes over ``state``, one per endpoint family."""
    return [_route(InferenceHandler(state, CHAT)), _route(InferenceHandler(state, COMPLETIONS))]


def _route(handler: InferenceHandler[Any]) -> Route:
    return Route(POST, handler.path, handler, on_unauthorised=handler.count_unauthorised)


def resolve_request_id(value: str | None) -> str:
    """The client's ``X-Request-Id`` when it is 1-128 printable ASCII characters, else a UUIDv4."""
    if value and len(value) <= 128 and all(0x21 <= ord(c) <= 0x7E for c in value):
        return value
    return new_request_id()


async def read_body_within(conn: Connection, limit: int, seconds: float) -> bytes:
    """The request body, or :class:`RequestBodyTimeout` when it takes over ``seconds`` to arrive.

    A client that trickles its body (slow loris) is answered 408 and its connection closed. Both
    servers run the handler in a cancellable asyncio task (granian with its asyncio task
    implementation, the default), so the read is cancelled in place: no task of its own. The
    timer is ``asyncio.timeout``'s, without its context manager (``loop.call_later``, then
    ``Task.uncancel`` to tell its cancellation from any other): ~0.8 against ~3.3 µs per request.
    """
    task = asyncio.current_task()
    assert task is not None
    cancelling = task.cancelling()
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        body = await conn.read_body(limit)
    except asyncio.CancelledError:
        if expired and task.uncancel() <= cancelling:
            raise RequestBodyTimeout(
                f"The request body did not arrive within {seconds:g}s"
            ) from None
        raise
    finally:
        timer.cancel()
    if expired:  # the read ended although it was cancelled: the body stands
        task.uncancel()
    return body


def _routing_hint(request: HttpRequest) -> RoutingHint:
    worker_id = request.headers.get("x-worker-instance-id")
    return RoutingHint(worker_id=worker_id[:256]) if worker_id else NO_ROUTING_HINT


class InferenceHandler(Generic[P]):
    """Serves one endpoint family's requests, each from its body to its outcome."""

    __slots__ = ("_family", "_state")

    def __init__(self, state: AppState, family: EndpointFamily[P]) -> None:
        self._state = state
        self._family: EndpointFamily[P] = family

    @property
    def path(self) -> str:
        return self._family.path

    def count_unauthorised(self) -> None:
        """Count a request refused for its API key (401) once, as ``error_type="unauthorized"``.

        Its body is never read, so nothing the stranger wrote labels it: the model is the fixed
        ``unknown_model`` and the request type ``unary``.
        """
        state = self._state
        record = state.metrics.begin(self._family.endpoint, state.clock)
        record.mark_error(Outcome.UNAUTHORIZED)
        record.release()

    async def __call__(self, request: HttpRequest, conn: Connection, args: dict[str, str]) -> None:
        state = self._state
        family = self._family
        endpoint = family.endpoint
        record = state.metrics.begin(endpoint, state.clock)
        request_id = resolve_request_id(request.headers.get("x-request-id"))
        headers: Headers = with_request_id(JSON_HEADERS, request_id)
        ctx: EngineContext | None = None
        monitor: DisconnectMonitor | None = None
        watchdog: Watchdog | None = None
        try:
            params, body = await self._read_params(request, conn, record)
            served = state.models.get(params.model)
            if served is None:
                raise ModelNotFound(
                    f"The model `{clip(params.model)}` does not exist.", param="model"
                )
            record.model = served.name  # a served model's name is a safe label
            if state.shutting_down:
                # New work is refused at once during the grace period (which is for the
                # requests already in flight), and the connection is not kept.
                headers = [*headers, ("connection", "close")]
                raise ServerDraining()
            ctx = EngineContext(request_id)
            record.admit(served.name)
            state.track(ctx)
            waker = Waker()
            monitor = DisconnectMonitor(
                ctx, state.metrics, served.name, endpoint, record.request_type
            )
            watchdog = self._watchdog(ctx, served, waker)
            exchange = Exchange(
                ctx=ctx, conn=conn, record=record, monitor=monitor, watchdog=watchdog, waker=waker
            )
            conn.on_disconnect(waker.wake)
            ctx.on_stop(waker.wake)
            requests = family.split(
                params,
                request_id=request_id,
                model=served.name,
                raw_body=body,
                routing=_routing_hint(request),
            )
            watchdog.start()
            if params.stream:
                await self._stream(exchange, served, params, requests)
            else:
                await self._unary(exchange, served, params, requests)
        except ClientGone:
            record.mark_error("cancelled")
        except DynamoError as exc:
            record.mark_error(exc.error_type)
            if isinstance(exc, RequestBodyTimeout):
                headers = [*headers, ("connection", "close")]
            if isinstance(exc, AllWorkersBusy):
                state.metrics.model_rejection_total.labels(record.model, endpoint).inc()
            if monitor is not None:
                monitor.connection.disarm()
            await respond_error(conn, exc, headers)
        except Exception:
            log.exception("request %s failed", request_id)
            record.mark_error("internal")
            if monitor is not None:
                monitor.connection.disarm()
            await respond_error(conn, internal_error(), headers)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if monitor is not None:
                monitor.release_all()
            record.release()
            if ctx is not None:
                state.untrack(ctx)

    async def _read_params(
        self, request: HttpRequest, conn: Connection, record: RequestRecord
    ) -> tuple[P, bytes]:
        models = self._state.models
        body = b""
        try:
            content_type = request.headers.get("content-type")
            if content_type is not None and content_type.split(";", 1)[0].strip().lower() != (
                "application/json"
            ):
                raise UnsupportedMediaType(
                    f"Content-Type must be application/json, got {content_type[:100]!r}"
                )
            config = self._state.config
            body = await read_body_within(
                conn, config.body_limit_bytes, config.http_read_timeout_secs
            )
            params = self._family.decode(body, self._state.accepts_unknown_fields)
        except DynamoError:
            # Label the failure with the model when it is one we serve; otherwise the fixed label.
            name, stream = peek_request(body) if body else (None, False)
            record.model = name if name in models else UNKNOWN_MODEL
            record.request_type = "stream" if stream else "unary"
            raise
        record.request_type = "stream" if params.stream else "unary"
        if params.model not in models:
            record.model = UNKNOWN_MODEL
        return params, body

    def _watchdog(self, ctx: EngineContext, served: ServedModel, waker: Waker) -> Watchdog:
        config = self._state.config
        first_token = config.first_token_timeout_secs
        if first_token and served.engine_enforces_first_token:
            first_token *= 2
        return Watchdog(
            self._state.clock,
            ctx,
            inactivity=config.http_inactivity_secs,
            first_token=first_token or None,
            deadline=config.request_timeout_secs,
            on_expire=waker.wake,
        )

    def _naming(self, exchange: Exchange, served: ServedModel) -> tuple[str, str, str, int]:
        """The response's kind, id, model and creation time, for the renderer or aggregator."""
        family = self._family
        return family.kind, family.response_id(exchange.request_id), served.name, int(time.time())

    async def _stream(
        self, exchange: Exchange, served: ServedModel, params: P, requests: list[EngineRequest]
    ) -> None:
        stream_options = params.stream_options
        renderer = ChunkRenderer(
            *self._naming(exchange, served),
            include_usage=bool(stream_options is not None and stream_options.include_usage),
            with_token_ids=params.return_token_ids,
        )
        stream = await exchange.handler_phase(
            open_fanout(served.engine, requests, exchange.ctx, n=params.n or 1)
        )
        response = SseResponse(
            exchange,
            with_request_id(SSE_HEADERS, exchange.request_id),
            self._state.config.slow_client_timeout_secs,
        )
        try:
            await monitor_for_disconnects(exchange, stream, response, renderer)
        finally:
            await response.end()

    async def _unary(
        self, exchange: Exchange, served: ServedModel, params: P, requests: list[EngineRequest]
    ) -> None:
        aggregator = Aggregator(
            *self._naming(exchange, served),
            choices=len(requests),
            with_token_ids=params.return_token_ids,
        )
        body = await exchange.handler_phase(
            _collect(exchange, served, requests, params.n or 1, aggregator)
        )
        exchange.record.mark_ok()
        await exchange.conn.respond(200, with_request_id(JSON_HEADERS, exchange.request_id), body)


async def _collect(
    exchange: Exchange,
    served: ServedModel,
    requests: list[EngineRequest],
    n: int,
    aggregator: Aggregator,
) -> bytes:
    """The unary work: admit the sub-requests, then fold their outputs into the response.

    A relaying engine's whole answer (``EngineOutput.response``: one choice, asked of its worker
    as unary) is the response as it is; its tokens all reach the client path at once, at its
    end (the first token's time is the answer's, the others' latency 0).
    """
    ctx = exchange.ctx
    stream = await open_fanout(served.engine, requests, ctx, n=n)
    touch = exchange.watchdog.touch
    now = exchange.watchdog.clock.now
    on_tokens = exchange.record.on_tokens
    whole: EngineOutput | None = None
    try:
        async for out in stream:
            t = now()
            touch(t)
            on_tokens(out.num_tokens, out.prompt_tokens, t)
            if out.response is not None:
                whole = out
            else:
                aggregator.add(out)
    finally:
        await aclose_stream(stream)
    if ctx.is_stopped:
        raise error_for_stop(ctx.reason)
    if whole is not None:
        assert whole.response is not None and len(requests) == 1
        if whole.usage is not None:
            exchange.record.on_usage(whole.usage)
        return whole.response
    if aggregator.usage is not None:
        exchange.record.on_usage(aggregator.usage)
    return aggregator.render()
