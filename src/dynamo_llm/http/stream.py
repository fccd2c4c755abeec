"""The stream phase of a streaming request: the SSE response, the pump and what ends it.

:func:`monitor_for_disconnects` is the stream phase (the handles and the monitor are
:mod:`~dynamo_llm.http.disconnect`). It arms the stream handle, pre-marks the
outcome ``cancelled`` (a stream abandoned by its client is a cancellation, not an internal
error), runs the *pump* (source -> client) in its own task and sleeps on the exchange's waker,
then acts on the first thing that happened, checked in this order:

=================================  ====================================  ====================
event                              action                                client sees
=================================  ====================================  ====================
source ended (context live)        mark ok, disarm, usage chunk, [DONE]   ``data: [DONE]``
source raised an error             mark its type, disarm, kill context    error frame
source ended, context stopped      outcome from the stop reason, disarm   body ends
client gone (future or write)      release armed -> monitor kills         nothing
time limit (watchdog)              mark response_timeout, disarm, kill    error frame
context stopped from elsewhere     stop the pump between items            per stop reason
=================================  ====================================  ====================

The pump forwards an item it has already received before a cancellation is acted on: a stop
from elsewhere interrupts it only while it is waiting on the source. A kill that happened before
the source ended makes the request a cancellation, never a success. The error frame is
``event: error`` followed by ``data: {"error": {...}}``, which every SSE client dispatches and the
OpenAI SDKs raise as ``APIError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from ..engines.base import EngineOutput, aclose_stream
from ..errors import DynamoError, SlowClient, internal_error, render_error
from ..metrics import Outcome
from ..runtime.coalesce import next_or_flush
from ..runtime.context import StopReason
from ..runtime.tasks import cancel_and_wait
from .connection import Headers, StreamWriter
from .disconnect import error_for_stop
from .exchange import Exchange
from .responses import JSON_HEADERS, with_request_id
from .sse import DONE, ChunkRenderer, error_frame
from .unread import UnreadMeter

__all__ = ["BUFFER_LIMIT", "SseResponse", "monitor_for_disconnects"]

log = logging.getLogger("dynamo_llm.http.stream")


BUFFER_LIMIT = 128 * 1024
"""Bytes a stream's client may leave unread before its engine is no longer pulled."""
CHECK_EVERY = 32 * 1024
"""Bytes written between two looks at how much the client has read."""
POLL_SECONDS = 0.05
"""While a stream is held, how often the client's progress is looked at."""


@runtime_checkable
class Metered(Protocol):
    """A stream writer that can say how much its client has not read (granian's)."""

    def meter(self, sent: int) -> UnreadMeter | None: ...


class SseResponse:
    """The SSE response of one request, started lazily with its first item.

    Holding the status line back until the engine has produced something means that anything
    going wrong before the first token (a failure, a first-token timeout, a shutdown) still
    reaches the client as a proper HTTP status with a JSON body, not as a 200 carrying an error
    frame.

    Chunks are collected in ``pending`` and written together by ``flush()``, which the pump calls
    when the engine has to wait for its next item (see :mod:`~dynamo_llm.runtime.coalesce`): a
    burst of chunks costs one write, and nothing is held back while the engine is busy.

    **Backpressure.** Every :data:`CHECK_EVERY` bytes written, ``flush()`` looks at how much the
    client has not read (:mod:`.unread` under granian; under uvicorn a write itself waits once
    its buffer is full). Past :data:`BUFFER_LIMIT`, ``flush()`` does not return until the client
    has read it down to half, so the engine is not pulled meanwhile: an in-process engine pauses,
    a worker's connection is not read and the worker feels TCP backpressure. While it waits, the
    request's silence timers (its own and its worker attempt's) are told the pause is ours. A
    client that reads nothing for ``slow_client_timeout`` seconds ends the request with
    :class:`~dynamo_llm.errors.SlowClient`.
    """

    __slots__ = (
        "_exchange",
        "_headers",
        "_meter",
        "_next_check",
        "_sent",
        "_slow_client_timeout",
        "abandoned",
        "pending",
        "pending_size",
        "writer",
    )

    def __init__(
        self, exchange: Exchange, headers: Headers, slow_client_timeout: float | None = None
    ) -> None:
        self._exchange = exchange
        self._headers = headers
        self._slow_client_timeout = slow_client_timeout
        self.pending: list[bytes] = []
        self.pending_size = 0  # of the relayed bytes in pending (what the pump counts)
        self.writer: StreamWriter | None = None
        self._sent = 0
        self._next_check = CHECK_EVERY
        self._meter: UnreadMeter | None = None
        self.abandoned = False

    async def start(self) -> StreamWriter:
        if self.writer is None:
            self.writer = await self._exchange.conn.start_stream(200, self._headers)
        return self.writer

    def _take(self, extra: bytes = b"") -> bytes:
        pending = self.pending
        if extra:
            pending.append(extra)
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self.pending_size = 0
        return data

    async def flush(self) -> None:
        """Write the pending chunks (raises the writer's closed error if the client is gone);
        past the buffer limit, wait for the client to read first (see above)."""
        pending = self.pending
        if pending:
            writer = self.writer
            assert writer is not None
            data = b"".join(pending)  # _take(), inlined: one piece is joined as is
            pending.clear()
            self.pending_size = 0
            size = len(data)
            if self._sent + size >= self._next_check:
                self._next_check = self._sent + size + CHECK_EVERY
                await self._hold_while_unread(writer, size)
            if self._sent < CHECK_EVERY or self._meter is not None:
                await writer.send(data)
            else:
                await self._send_within_timeout(writer, data)
            self._sent += size

    async def _send_within_timeout(self, writer: StreamWriter, data: bytes) -> None:
        # A writer that waits while its client does not read (uvicorn's): bound that wait.
        try:
            async with asyncio.timeout(self._slow_client_timeout):
                await writer.send(data)
        except TimeoutError:
            raise SlowClient() from None

    async def _hold_while_unread(self, writer: StreamWriter, size: int) -> None:
        """Before ``size`` more bytes go out: wait while the client leaves too much unread."""
        meter = self._meter
        if meter is None:
            if isinstance(writer, Metered):
                self._meter = writer.meter(self._sent)  # None until its socket is found
            return
        unread = meter.unread(self._sent)
        if unread + size <= BUFFER_LIMIT:
            return
        clock = self._exchange.watchdog.clock
        ctx = self._exchange.ctx
        timeout = self._slow_client_timeout
        since = clock.now()
        while unread > BUFFER_LIMIT // 2:
            ctx.hold()
            await clock.sleep(POLL_SECONDS)
            if ctx.is_stopped:
                return  # stopped from elsewhere: the pump ends between items
            now_unread = meter.unread(self._sent)
            now = clock.now()
            if now_unread < unread:
                since = now  # the client read something
            elif timeout is not None and now - since >= timeout:
                raise SlowClient()
            unread = now_unread

    async def end(self) -> None:
        """End the body, if it was started; for a client that stopped reading, without waiting
        for it (a server whose writes wait, uvicorn, then closes the connection)."""
        if self.writer is None:
            return
        if not self.abandoned:
            await self._exchange.conn.end_stream()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0):
                await self._exchange.conn.end_stream()

    def close(self) -> None:
        """Let go of the socket the stream watched, if any."""
        if self._meter is not None:
            self._meter.close()
            self._meter = None

    async def finish(self, data: bytes) -> None:
        """Write what is pending and the last bytes; a client that left changes nothing."""
        writer = await self.start()
        data = self._take(data)
        if data:
            with contextlib.suppress(*writer.closed_errors):
                await writer.send(data)

    async def fail(self, error: DynamoError) -> None:
        """End with ``error``: an HTTP error before the first item, an error frame after it."""
        if self.writer is None:
            conn = self._exchange.conn
            if not conn.is_disconnected:
                headers = with_request_id(JSON_HEADERS, self._exchange.request_id)
                await conn.respond(error.status, headers, render_error(error))
            return
        await self.finish(error_frame(error))


class _PumpState:
    __slots__ = ("_response", "in_source")

    def __init__(self, response: SseResponse) -> None:
        self._response = response
        self.in_source = False

    async def flush(self) -> None:
        # While writing, the pump is not waiting on the source: a stop from elsewhere must not
        # interrupt the write of items already received.
        self.in_source = False
        try:
            await self._response.flush()
        finally:
            self.in_source = True


_MAX_PENDING = 64  # chunks held back at most during a burst
_ENDED = "ended"
_STOPPED = "stopped"
_GONE = "gone"


async def _pump(
    stream: AsyncIterator[EngineOutput],
    response: SseResponse,
    renderer: ChunkRenderer,
    exchange: Exchange,
    state: _PumpState,
) -> str | DynamoError:
    """Forward items from the engine to the client until the source ends or something stops it.

    The per-token path: one engine step, one timestamp, one render, and a write only when the
    engine has to wait (or after a long burst), through :func:`next_or_flush`.
    """
    ctx = exchange.ctx
    watchdog = exchange.watchdog
    now = watchdog.clock.now
    on_tokens = exchange.record.on_tokens
    render = renderer.render
    add_usage = renderer.add_usage
    next_item = aiter(stream).__anext__  # an OwnedStream's generator: one call fewer per item
    pending = response.pending
    append = pending.append
    flush = state.flush
    try:
        state.in_source = True
        try:
            out = await next_item()
        except StopAsyncIteration:
            return _ENDED
        finally:
            state.in_source = False
        closed_errors = (await response.start()).closed_errors
        next_ready = next_or_flush(next_item, flush)  # reusable: one per stream, not per token
        try:
            while True:
                t = now()
                watchdog.last_item = t  # Watchdog.touch, inlined on the per-token path
                on_tokens(out.num_tokens, out.prompt_tokens, t)
                raw = out.raw
                if raw is None:
                    append(render(out))
                else:
                    # Relayed bytes: the usage rides on the output; the frontend renders its chunk.
                    if out.usage is not None:
                        add_usage(out.usage)
                        for chunk in out.chunks or ():
                            renderer.add_tail(chunk)
                    if raw:
                        append(raw)
                        response.pending_size += len(raw)
                        if response.pending_size >= CHECK_EVERY:
                            # A fast worker's big reads: written now, so that what the
                            # client has not read is looked at often enough.
                            await response.flush()
                if ctx.state:  # not LIVE (ContextState.LIVE == 0): stopped or killed
                    await response.flush()
                    return _STOPPED
                if len(pending) >= _MAX_PENDING:
                    await response.flush()
                state.in_source = True
                try:
                    out = await next_ready
                except StopAsyncIteration:
                    return _ENDED  # what is pending goes out with the last frame
                finally:
                    state.in_source = False
        except closed_errors:
            return _GONE
    except DynamoError as exc:
        # The traceback holds this frame, and the frame holds the server's transport: under
        # granian a streamed body only ends when its transport is freed, so an error object that
        # outlives the request (an engine may reuse one) must not keep it alive.
        return exc.with_traceback(None)
    except Exception:
        log.exception("engine stream for request %s failed", ctx.id)
        return internal_error()
    finally:
        await aclose_stream(stream)


async def monitor_for_disconnects(
    exchange: Exchange,
    stream: AsyncIterator[EngineOutput],
    response: SseResponse,
    renderer: ChunkRenderer,
) -> None:
    """Stream ``stream`` to the client as SSE, settling the outcome exactly once (see above)."""
    handle = exchange.monitor.stream
    record = exchange.record
    ctx = exchange.ctx
    waker = exchange.waker
    handle.arm()
    record.mark_error(Outcome.CANCELLED)
    state = _PumpState(response)
    pump = asyncio.get_running_loop().create_task(
        _pump(stream, response, renderer, exchange, state)
    )
    pump.add_done_callback(waker.wake)
    try:
        while not pump.done():
            if exchange.conn.is_disconnected:
                handle.release()  # armed: the monitor counts the disconnect and kills the context
                await cancel_and_wait(pump)
                return
            expired = exchange.watchdog.expired
            if expired is not None:
                record.mark_error(expired.error_type)
                handle.disarm()
                await cancel_and_wait(pump)
                await response.fail(expired)
                return
            if ctx.is_stopped and state.in_source:
                await cancel_and_wait(pump)
                break
            await waker.wait()
    finally:
        pump.remove_done_callback(waker.wake)
        if not pump.done():
            await cancel_and_wait(pump)
        # The pump closes the stream when it ends; one cancelled before its first step never
        # ran, and the engine must still get back what it holds for this request.
        response.close()
        await aclose_stream(stream)

    result = pump.result() if not pump.cancelled() else _STOPPED
    if result == _GONE:
        handle.release()  # armed: a failed write is the client going away
        return
    if isinstance(result, DynamoError):
        record.mark_error(result.error_type)
        handle.disarm()
        ctx.kill()
        if isinstance(result, SlowClient):
            response.abandoned = True  # it reads nothing: no error frame, no waiting on it
            return
        await response.fail(result)
        return
    if result == _ENDED and not ctx.is_stopped:
        record.mark_ok()
        if renderer.usage is not None:
            record.on_usage(renderer.usage)
        handle.disarm()
        await response.finish(renderer.finish() + DONE)
        return
    # Stopped or killed before the source ended: never a success.
    reason = ctx.reason
    if reason is StopReason.CLIENT_DISCONNECT:
        handle.release()
        return
    handle.disarm()
    error = exchange.watchdog.expired or error_for_stop(reason)
    record.mark_error(error.error_type)
    if reason is not StopReason.EXPLICIT:
        await response.fail(error)
