"""One attempt's stream from a worker: what it parses, and how it ends and is released.

A :class:`RemoteStream` is made by :meth:`~.client.WorkerClient.open_stream` once the worker
answered with its headers. How much it parses depends on what the caller needs:

========  ============================================  ================================
mode      when                                          outputs
========  ============================================  ================================
relay     a streaming client (the hot path), with       ``raw`` bytes, ``num_tokens``
          migration on too (``track_tokens``: the
          worker also sends token ids, kept in the
          bytes for the migration state to parse)
tracked   a streaming client, ``track_tokens``, that    ``raw`` + ``text``/``token_ids``
          asked for token ids itself
parsed    a unary client; a fan-out sub-request (n>1,   ``text``/``token_ids``, no raw
          batch); ``relay=False`` (a replay)            (``prompt_token_ids`` on the
                                                        first, when the worker sends them)
========  ============================================  ================================

The stream reads whatever buffers the socket gives and cuts them at the last ``\\n\\n``; the
complete events go to the raw relay (:mod:`.relay`) in the relay mode, and to the slow path
(:mod:`.events`) otherwise or when the relay passes a buffer over. The body ending without
``[DONE]`` after its first event, or the connection dropping, raises
:class:`WorkerDisconnected`, unless our context was stopped, in which case the stream ends
quietly. A body that ends cleanly before any event (an empty 200, or text that is no event
stream) raises :class:`UpstreamNoStream` instead: the worker answered, badly, and is probed
rather than quarantined.

**Cancellation crosses the wire.** The stream registers ``ctx.on_stop``. On a kill the upstream
response is closed at once (``close()``, not ``release()``): the worker sees its socket close and
aborts the request (vLLM, SGLang and llama.cpp do). On a graceful stop of one of our own workers
(``is_ours``) the stream posts ``/v1/requests/<id>/stop`` in a task it owns (``<id>`` is the
id the worker knows: the attempt's upstream id, or the one the worker says it used) and keeps
reading until the worker ends the body; for any other worker, or if that post fails, it closes.
Whatever way the stream ends (exhausted, failed, ``aclose()``, the consuming task cancelled,
dropped), the connection is released: to the pool when the body was read to its end, closed
otherwise.

The caller (the router) owns the inactivity timer: it wraps the stream. The stream only bounds
the wait for the first event with the admission's ``first_token_timeout`` deadline.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable

import aiohttp

from ..engines.base import EngineOutput
from ..errors import UpstreamError, WorkerDisconnected, WorkerResponseTimeout
from ..runtime.context import ContextState, EngineContext
from ..runtime.tasks import cancel_and_wait
from ..runtime.urls import redact_url
from .errors import describe, no_stream_error
from .events import EventParser
from .h1 import Connection, H1Error
from .relay import RawRelay

__all__ = ["RemoteStream", "StreamMode", "post_stop"]

log = logging.getLogger("dynamo_llm.transport")

# An SSE event larger than this without a blank line is not an event stream.
MAX_EVENT_BYTES = 8 * 1024 * 1024
# How long a graceful-stop post may take before the stream falls back to closing.
STOP_TIMEOUT = 5.0
# After [DONE], how long to wait for the end of the body so the connection can be pooled.
DRAIN_TIMEOUT = 1.0
_KILLED = ContextState.KILLED


class StreamMode(enum.Enum):
    """How much of the worker's stream is parsed (the table in the module doc)."""

    RELAY = "relay"
    TRACKED = "tracked"
    PARSED = "parsed"


class RemoteStream:
    """One attempt's stream from a worker: ``AsyncIterator[EngineOutput]`` plus ``aclose()``.

    Made by :meth:`~.client.WorkerClient.open_stream` once the worker answered with its headers.
    It owns the upstream response from then on and releases it exactly once, however it ends.
    """

    __slots__ = (
        "_aborted",
        "_ctx",
        "_deadline",
        "_finished",
        "_gen",
        "_is_ours",
        "_mode",
        "_parser",
        "_relay",
        "_remove_callback",
        "_request_id",
        "_resp",
        "_session",
        "_stop_task",
        "_url",
    )

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        resp: Connection,
        ctx: EngineContext,
        *,
        request_id: str,
        response_id: str,
        model: str,
        mode: StreamMode,
        is_ours: bool,
        deadline: float | None,
        usage_chunk: bool = True,
    ) -> None:
        self._session = session
        self._url = url
        self._resp = resp
        self._ctx = ctx
        # Our worker may have replaced an id it does not accept; it echoes the one it used.
        self._request_id = resp.headers.get("x-request-id", request_id)
        self._mode = mode
        self._is_ours = is_ours
        self._deadline = deadline
        self._aborted = False
        self._finished = False
        self._relay = RawRelay(response_id=response_id, model=model, fast=mode is StreamMode.RELAY)
        self._parser = EventParser(
            self._relay,
            keep_raw=mode is not StreamMode.PARSED,
            sees_all=mode is not StreamMode.RELAY,
            usage_chunk=usage_chunk,
        )
        self._stop_task: asyncio.Task[None] | None = None
        self._gen = self._run()
        self._remove_callback = ctx.on_stop(self._on_stop)

    @property
    def upstream_id(self) -> str | None:
        """The response id the worker used in its first chunk (None before it, or if it sent
        none)."""
        return self._relay.upstream_id

    @property
    def rewrites(self) -> tuple[tuple[bytes, bytes], ...]:
        """The ``(old, new)`` replacements the relay applies to the worker's events, learnt from
        its first chunk: none when the worker used our response id and model name."""
        return tuple(self._relay.rewrites)

    def __aiter__(self) -> AsyncIterator[EngineOutput]:
        # The generator itself, as OwnedStream does: one Python call fewer per item.
        return self._gen

    def __anext__(self) -> Awaitable[EngineOutput]:
        return self._gen.__anext__()

    async def aclose(self) -> None:
        """Abandon the stream: the upstream connection is closed unless the body was complete.

        Safe to call while another task is waiting in ``__anext__``: that wait then ends quietly.
        """
        try:
            await self._gen.aclose()
        except RuntimeError:
            if not getattr(self._gen, "ag_running", False):
                raise
            self._abort()  # "already running": the other task's read fails and it returns
        finally:
            await self._finish()

    def __del__(self) -> None:
        if not getattr(self, "_finished", True):  # True: __init__ did not get that far
            self._finished = True
            self._remove_callback()
            self._resp.close()
            if self._stop_task is not None:
                self._stop_task.cancel()

    # --- cancellation ---------------------------------------------------------------------

    def _on_stop(self, ctx: EngineContext) -> None:
        if self._finished:
            return
        if ctx.is_killed or not self._is_ours:
            self._abort()
        elif self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self._send_stop())

    def _abort(self) -> None:
        """Close the upstream connection now: a pending read fails, the worker sees the close."""
        if not self._aborted:
            self._aborted = True
            self._resp.close()

    async def _send_stop(self) -> None:
        if not await post_stop(self._session, self._url, self._request_id):
            self._abort()

    async def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._remove_callback()
        try:
            if self._stop_task is not None:
                await cancel_and_wait(self._stop_task)
        finally:
            if not self._aborted and self._resp.is_eof():
                self._resp.release()
            else:
                self._aborted = True
                self._resp.close()

    # --- reading --------------------------------------------------------------------------

    def _ended_quietly(self) -> bool:
        return self._ctx.is_stopped or self._aborted

    async def _read_first(self) -> bytes:
        try:
            async with asyncio.timeout_at(self._deadline) as timer:
                return await self._resp.read_any()
        except TimeoutError:
            if not timer.expired():
                raise
            raise WorkerResponseTimeout(
                "The worker sent no event within the first-token timeout"
            ) from None

    async def _run(self) -> AsyncGenerator[EngineOutput, None]:
        read_any = self._resp.read_any
        ctx = self._ctx
        parser = self._parser
        parse = parser.parse
        fast = self._relay.pass_on if self._mode is StreamMode.RELAY else None
        tail = b""
        crlf: bool | None = None
        try:
            while True:
                try:
                    chunk = await (read_any() if parser.seen_first else self._read_first())
                except H1Error as exc:
                    if self._ended_quietly():
                        return
                    if (held := parser.take_held()) is not None:
                        yield held
                    raise WorkerDisconnected(
                        f"The worker's connection dropped mid-stream: {describe(exc)}"
                    ) from exc
                except WorkerResponseTimeout:
                    if self._ended_quietly():
                        return
                    raise
                if ctx.state is _KILLED or self._aborted:  # ctx.is_killed without the call
                    return  # killed: do not drain what was already buffered
                if not chunk:
                    if self._ended_quietly():
                        return
                    if not parser.seen_first:
                        # A clean end before any event: the worker answered, but not with a
                        # stream (an empty 200). A failure of this request, not a dead worker.
                        resp = self._resp
                        raise no_stream_error(resp.status, resp.content_type, tail)
                    if (held := parser.take_held()) is not None:
                        yield held
                    raise WorkerDisconnected(
                        "The worker's stream ended without a terminal [DONE] event"
                    )
                if crlf is None:
                    crlf = b"\r" in chunk
                data = tail + chunk if tail else chunk
                if crlf:
                    data = data.replace(b"\r\n", b"\n")
                end = data.rfind(b"\n\n")
                if end < 0:
                    if len(data) > MAX_EVENT_BYTES:
                        raise UpstreamError("The worker sent an event larger than 8 MiB")
                    tail = data
                    continue
                end += 2
                tail = data[end:]
                part = data[:end] if tail else data
                if fast is None:
                    out = parse(part)
                    if out is not None:
                        yield out
                else:
                    if not parser.seen_first:
                        # The first event teaches the relay the upstream's id and spacing.
                        first = part.find(b"\n\n") + 2
                        out = parse(part[:first])
                        if out is not None:
                            yield out
                        part = part[first:]
                        if not part or parser.failure is not None or parser.done:
                            part = b""
                    if part:
                        out, part = fast(part)
                        if out is not None:
                            yield out
                        if part and (out := parse(part)) is not None:
                            yield out
                if parser.failure is not None:
                    if self._ended_quietly():
                        return  # a worker told to stop may say so with an error
                    if (held := parser.take_held()) is not None:
                        yield held
                    raise parser.failure
                if parser.done:
                    await self._drain()
                    return
        finally:
            await self._finish()

    async def _drain(self) -> None:
        """Read past [DONE] to the end of the body, so the connection can go back to the pool."""
        resp = self._resp
        if resp.is_eof():
            return
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                while await resp.read_any():
                    pass
        except (TimeoutError, H1Error):
            self._abort()


async def post_stop(session: aiohttp.ClientSession, url: str, request_id: str) -> bool:
    """Ask one of our workers to stop generating ``request_id`` gracefully; True if it agreed."""
    # An id may hold any printable character, "/" and "?" included: quote all of them.
    quoted = urllib.parse.quote(request_id, safe="")
    stop_url = f"{url.rstrip('/')}/v1/requests/{quoted}/stop"  # yarl keeps the escapes
    try:
        async with session.post(
            stop_url, timeout=aiohttp.ClientTimeout(total=STOP_TIMEOUT)
        ) as resp:
            return resp.status < 300
    except (TimeoutError, aiohttp.ClientError) as exc:
        log.debug("stop of request %s at %s failed: %s", request_id, redact_url(url), describe(exc))
        return False
