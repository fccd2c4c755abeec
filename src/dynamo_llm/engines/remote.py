"""The HTTP client to one OpenAI-compatible worker: relay its SSE stream, carry cancellation.

:meth:`WorkerClient.open_stream` runs one routing attempt against one worker (vLLM, SGLang,
llama.cpp's server, TGI, Ollama, or our own ``dynamo-llm worker``):

1. **Admission** (the ``await``). The request always goes upstream as a stream
   (``stream: true``, ``stream_options.include_usage: true``, ``X-Request-Id``), so that a unary
   client is folded by the frontend and usage is always exact. Everything that can go wrong
   before the first byte of the body is raised here, as the error class the router acts on:
   connect refused or timed out -> :class:`WorkerUnreachable`; no response headers within
   ``first_token_timeout`` -> :class:`WorkerResponseTimeout`; a 4xx -> the matching 4xx
   :class:`DynamoError` with the worker's message, param and code; a 503 saying it is busy ->
   :class:`AllWorkersBusy`; a 503 saying it is shutting down -> :class:`WorkerShuttingDown`;
   another 5xx -> :class:`UpstreamError` with the worker's message.
2. **The stream** (a :class:`RemoteStream`). How much it parses depends on what the caller needs:

   ========  ============================================  ================================
   mode      when                                          outputs
   ========  ============================================  ================================
   relay     a streaming client (the hot path)             ``raw`` bytes, ``num_tokens``
   tracked   a streaming client, ``track_tokens``          ``raw`` + ``text``/``token_ids``
   parsed    a unary client; a fan-out sub-request (n>1,   ``text``/``token_ids``, no raw
             batch); ``track_tokens`` when the client      (``prompt_token_ids`` on the
             did not ask for token ids; ``relay=False``    first, when the worker sends them)
   ========  ============================================  ================================

   The relay never parses and re-encodes a chunk to pass it on. It reads whatever buffers the
   socket gives, cuts them at the last ``\\n\\n`` (keeping the tail for the next read), and
   yields the complete events as one ``raw`` output whose ``num_tokens`` is the number of
   events in it (an event is about a token; the exact count comes with the usage at the end).
   Only the first event is parsed, to learn the upstream's response id and model name; later
   buffers get a ``bytes.replace`` so that the client sees ``chatcmpl-<our id>`` and our model
   name (skipped when they already match, as with our own worker and with vLLM, which both take
   the id from our ``X-Request-Id``). Everything that needs a decision (the chunk with a
   ``finish_reason``, the usage-only chunk, ``[DONE]``, an error) comes at the end of a stream,
   so the relay looks only at the last bytes of a buffer's last event: a chunk still in
   progress has ``"finish_reason":null`` there. Any other buffer takes the slow path, where its
   events are parsed one by one. Measured on a loaded 2-core VM over 245-byte vLLM-shaped
   chunks, the relay costs 1.0-1.4 µs for a one-event buffer (0.35 of it building the
   ``EngineOutput``), plus 0.3 µs per id or model replace, and 0.3-0.7 µs per event in
   multi-event buffers; parsing the same events costs 2.2-3.5 µs each.

   The upstream's ``data: [DONE]`` is stripped (the frontend sends its own) and ends the stream.
   The upstream's usage-only chunk is never relayed: its usage rides on the last output
   (``EngineOutput.usage``), and the frontend renders the usage chunk itself when the client
   asked for one, so that a migrated request reports one correct usage. An ``event: error``
   frame or a ``data: {"error": ...}`` event raises the matching :class:`DynamoError`. The body
   ending without ``[DONE]``, or the connection dropping, raises :class:`WorkerDisconnected`,
   unless our context was stopped, in which case the stream ends quietly.
3. **Cancellation crosses the wire.** The stream registers ``ctx.on_stop``. On a kill the
   upstream response is closed at once (``close()``, not ``release()``): the worker sees its
   socket close and aborts the request (vLLM, SGLang and llama.cpp do). On a graceful stop of
   one of our own workers (``is_ours``) the stream posts ``/v1/requests/<id>/stop`` in a task it
   owns and keeps reading until the worker ends the body; for any other worker, or if that post
   fails, it closes. Whatever way the stream ends (exhausted, failed, ``aclose()``, the consuming
   task cancelled, dropped), the connection is released: to the pool when the body was read to
   its end, closed otherwise.

The caller (the router) owns the inactivity timer: it wraps the stream. The client only bounds
the wait for the response headers and the first event with ``first_token_timeout``.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import os
import urllib.parse
from collections.abc import AsyncGenerator, Awaitable
from typing import Any

import aiohttp
import msgspec

from ..errors import (
    AllWorkersBusy,
    AuthenticationFailed,
    Cancelled,
    ContextLengthExceeded,
    DynamoError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    NotImplementedParameter,
    RequestTooLarge,
    TooManyRequests,
    UnsupportedMediaType,
    UpstreamError,
    WorkerDisconnected,
    WorkerResponseTimeout,
    WorkerShuttingDown,
    WorkerUnreachable,
)
from ..protocols.chat import ChatCompletionRequest, max_output_tokens
from ..protocols.common import StreamOptions, UsageInfo
from ..protocols.completions import CompletionRequest
from ..protocols.models import decode_model_list
from ..protocols.stream import StreamChunk
from ..runtime.context import EngineContext
from ..runtime.tasks import cancel_and_wait
from .base import EngineOutput, EngineRequest, Usage

__all__ = ["RemoteStream", "WorkerClient", "error_from_worker", "make_session"]

log = logging.getLogger("dynamo_llm.engines.remote")

# An SSE event larger than this without a blank line is not an event stream.
MAX_EVENT_BYTES = 8 * 1024 * 1024
# How long a graceful-stop post may take before the stream falls back to closing.
STOP_TIMEOUT = 5.0
# After [DONE], how long to wait for the end of the body so the connection can be pooled.
DRAIN_TIMEOUT = 1.0
# How much of a worker's error message is passed on.
MAX_MESSAGE_CHARS = 1000

_SHUTTING_DOWN_CODES = frozenset({"server_shutting_down", "worker_shutting_down"})
_BUSY_CODES = frozenset({"all_workers_busy", "overloaded", "server_overloaded"})


def make_session(
    connect_timeout: float, limit: int = 0, *, keepalive_timeout: float = 4.0
) -> aiohttp.ClientSession:
    """A pooled session for talking to workers; the caller owns it and closes it.

    Call it with a running event loop. ``limit`` bounds the connections open at once (0: no
    bound; each in-flight stream holds one for its whole life, so a bound also bounds concurrent
    streams, and waiting for a free slot is bounded only by the caller's timers). There is no
    total or read timeout, because streams are long; ``connect_timeout`` bounds the TCP connect.
    ``keepalive_timeout`` is shorter than the idle timeout of the common worker servers (uvicorn
    closes idle connections after 5 s) so that a pooled connection is not reused just as the
    worker closes it.
    """
    connector = aiohttp.TCPConnector(
        limit=limit, limit_per_host=0, keepalive_timeout=keepalive_timeout, ttl_dns_cache=60
    )
    timeout = aiohttp.ClientTimeout(
        total=None, connect=None, sock_connect=connect_timeout, sock_read=None
    )
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, trust_env=False, raise_for_status=False
    )


class _Mode(enum.Enum):
    RELAY = "relay"
    TRACKED = "tracked"
    PARSED = "parsed"


class WorkerClient:
    """Talks to OpenAI-compatible workers over a shared, pooled :class:`aiohttp.ClientSession`.

    Stateless apart from the session, so one client serves every worker; each stream owns what
    it starts.
    """

    __slots__ = ("session",)

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def open_stream(
        self,
        url: str,
        request: EngineRequest,
        ctx: EngineContext,
        *,
        model: str | None = None,
        first_token_timeout: float | None = None,
        is_ours: bool = False,
        track_tokens: bool = False,
        response_id: str | None = None,
        relay: bool = True,
    ) -> RemoteStream:
        """Send ``request`` to the worker at ``url`` and return its stream (see the module doc).

        ``model`` replaces the request's model name upstream (the worker's own name for it).
        ``first_token_timeout`` bounds the wait for the response headers and the first event.
        ``is_ours``: the worker is a ``dynamo-llm worker`` and understands a graceful stop.
        ``track_tokens`` asks the worker for token ids (``return_token_ids``) and fills
        ``text``/``token_ids`` of every output, for migration. ``response_id`` is the id the
        client sees, by default ``chatcmpl-<request id>`` or ``cmpl-<request id>``.
        ``relay=False`` forces the parsed mode (no ``raw`` bytes): the frontend renders every
        output itself, as a migration needs, since its replay may go to another endpoint
        (a chat request continued as token ids on ``/v1/completions``).

        Raises, before any output: :class:`WorkerUnreachable`, :class:`WorkerResponseTimeout`,
        :class:`WorkerDisconnected` (the worker closed without answering, twice),
        :class:`Cancelled` (``ctx`` stopped meanwhile), or the worker's own error.
        """
        params = request.params
        chat = isinstance(params, ChatCompletionRequest)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        subrequest = (params.n or 1) > 1 or (
            isinstance(params, CompletionRequest)
            and isinstance(params.prompt, list)
            and _is_batch(params.prompt)
        )
        if not params.stream or subrequest or not relay:
            mode = _Mode.PARSED
        elif track_tokens:
            mode = _Mode.TRACKED if params.return_token_ids else _Mode.PARSED
        else:
            mode = _Mode.RELAY
        body = upstream_body(request, model=model, return_token_ids=track_tokens)
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            "X-Request-Id": request.id,
        }
        loop = asyncio.get_running_loop()
        deadline = None if first_token_timeout is None else loop.time() + first_token_timeout
        resp = await self._post(url.rstrip("/") + path, body, headers, ctx, deadline)
        if resp.status >= 400:
            try:
                error_body = await _read_bounded(resp, deadline)
            finally:
                resp.close()
            raise error_from_worker(resp.status, error_body)
        if response_id is None:
            response_id = ("chatcmpl-" if chat else "cmpl-") + request.id
        return RemoteStream(
            self.session,
            url,
            resp,
            ctx,
            request_id=request.id,
            response_id=response_id,
            model=request.model,
            mode=mode,
            is_ours=is_ours,
            deadline=deadline,
        )

    async def _post(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        ctx: EngineContext,
        deadline: float | None,
    ) -> aiohttp.ClientResponse:
        if ctx.is_stopped:
            raise Cancelled()
        for attempt in (1, 2):
            # One timer bounds the wait for headers; a stop of the context fires it at once, so
            # a request abandoned during admission closes its connection too.
            timer = asyncio.timeout_at(deadline)
            try:
                async with timer:
                    remove = ctx.on_stop(functools.partial(_expire, timer))
                    try:
                        return await self.session.post(url, data=body, headers=headers)
                    finally:
                        remove()
            except (TimeoutError, aiohttp.ClientError) as exc:
                error = _admission_error(exc, timer.expired(), ctx)
                if error is None and attempt == 1:
                    continue  # the worker closed a pooled connection just as we reused it
                raise (error or WorkerDisconnected()) from exc
        raise AssertionError("unreachable")

    async def stop_request(self, url: str, request_id: str) -> bool:
        """Ask one of our workers to stop generating ``request_id`` gracefully."""
        return await _post_stop(self.session, url, request_id)

    async def probe(self, url: str, *, within: float) -> bool:
        """A cheap health check: ``GET /health`` answers 2xx within ``within`` seconds."""
        try:
            async with self.session.get(
                url.rstrip("/") + "/health", timeout=aiohttp.ClientTimeout(total=within)
            ) as resp:
                await resp.read()
                return resp.status < 300
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def fetch_models(self, url: str, *, within: float) -> list[str]:
        """The model ids a worker serves, from its ``/v1/models``.

        Raises :class:`WorkerUnreachable` when it cannot be asked, or the worker's error.
        """
        return (await self.list_models(url, within=within))[0]

    async def list_models(self, url: str, *, within: float) -> tuple[list[str], bool]:
        """The model ids a worker serves, and whether it is a ``dynamo-llm worker``."""
        try:
            async with self.session.get(
                url.rstrip("/") + "/v1/models", timeout=aiohttp.ClientTimeout(total=within)
            ) as resp:
                body = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise WorkerUnreachable(
                f"Could not list the worker's models: {_describe(exc)}"
            ) from exc
        if status >= 400:
            raise error_from_worker(status, body)
        try:
            return decode_model_list(body)
        except msgspec.MsgspecError as exc:
            raise UpstreamError("The worker's /v1/models answer is malformed") from exc


def _is_batch(prompt: list[str | int | list[int]]) -> bool:
    return len(prompt) > 1 and not isinstance(prompt[0], int)


def _expire(timer: asyncio.Timeout, _ctx: EngineContext) -> None:
    if not timer.expired():
        timer.reschedule(-1.0)


async def _post_stop(session: aiohttp.ClientSession, url: str, request_id: str) -> bool:
    # An id may hold any printable character, "/" and "?" included: quote all of them.
    quoted = urllib.parse.quote(request_id, safe="")
    stop_url = f"{url.rstrip('/')}/v1/requests/{quoted}/stop"  # yarl keeps the escapes
    try:
        async with session.post(
            stop_url, timeout=aiohttp.ClientTimeout(total=STOP_TIMEOUT)
        ) as resp:
            return resp.status < 300
    except (TimeoutError, aiohttp.ClientError) as exc:
        log.debug("stop of request %s at %s failed: %s", request_id, url, _describe(exc))
        return False


def _admission_error(
    exc: BaseException, timer_fired: bool, ctx: EngineContext
) -> DynamoError | None:
    """What a failed POST becomes; None for a disconnect worth one retry."""
    if ctx.is_stopped:
        return Cancelled()
    if timer_fired:
        return WorkerResponseTimeout("The worker did not answer within the first-token timeout")
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return WorkerUnreachable("Could not connect to the worker: connect timed out")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return WorkerUnreachable(f"Could not connect to the worker: {_describe(exc)}")
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return WorkerResponseTimeout("The worker did not answer in time")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return None
    if isinstance(exc, aiohttp.InvalidURL):
        return WorkerUnreachable("The worker's URL is invalid")
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamError(f"The worker sent a malformed HTTP response: {_describe(exc)}")
    return WorkerDisconnected(f"The worker's connection failed: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error.errno:
        # "Connection refused", not asyncio's text, which names the worker's address.
        return os.strerror(exc.os_error.errno).lower()
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


async def _read_bounded(resp: aiohttp.ClientResponse, deadline: float | None) -> bytes:
    """An error body, at most 64 KiB, read within the admission deadline."""
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout_at(deadline):
            while size < 65536 and (part := await resp.content.read(65536 - size)):
                parts.append(part)
                size += len(part)
    except (TimeoutError, aiohttp.ClientError):
        pass
    return b"".join(parts)


def upstream_body(
    request: EngineRequest, *, model: str | None = None, return_token_ids: bool = False
) -> bytes:
    """The JSON body sent upstream: the client's request with what the relay needs changed.

    Always ``stream: true`` with ``stream_options.include_usage: true``; ``model`` replaced when
    given; a fan-out sub-request gets its own prompt and ``n`` dropped; a ``max_tokens``
    different from the client's (a migration's remaining budget) replaces it.
    """
    params = request.params
    options = params.stream_options
    changes: dict[str, Any] = {
        "stream": True,
        "stream_options": StreamOptions(
            include_usage=True,
            continuous_usage_stats=options is not None and options.continuous_usage_stats,
        ),
    }
    if model is not None and model != params.model:
        changes["model"] = model
    if (params.n or 1) > 1:
        changes["n"] = None
    if return_token_ids:
        changes["return_token_ids"] = True
    max_tokens = request.max_tokens
    if isinstance(params, ChatCompletionRequest):
        if max_tokens is not None and max_tokens != max_output_tokens(params):
            key = "max_tokens" if params.max_completion_tokens is None else "max_completion_tokens"
            changes[key] = max_tokens
    else:
        prompt = request.prompt
        if prompt is not None and prompt is not params.prompt and prompt != params.prompt:
            changes["prompt"] = prompt
        if max_tokens is not None and max_tokens != params.max_tokens:
            changes["max_tokens"] = max_tokens
    return _encode(msgspec.structs.replace(params, **changes))


_encode = msgspec.json.encode


# --- errors ------------------------------------------------------------------------------------


def error_from_worker(status: int | None, body: bytes) -> DynamoError:
    """The :class:`DynamoError` for a worker's error: an HTTP answer, or an in-stream event.

    ``status`` is the HTTP status (None for an error event in a stream, whose status comes from
    a numeric ``code`` or from the OpenAI ``type``). The worker's message, param and code are
    kept. Understands the OpenAI shape, vLLM's older flat shape, TGI's and FastAPI's.
    """
    message, type_, code, param = _error_fields(body)
    if status is None:
        if isinstance(code, int) and 400 <= code <= 599:
            status = code
        else:
            status = _STATUS_BY_TYPE.get(type_ or "", 500)
    text_code = code if isinstance(code, str) else None
    if status == 499 or type_ == "cancelled":
        return WorkerDisconnected(message or "The worker cancelled the request")
    if 400 <= status < 500:
        cls = _CLIENT_ERRORS.get(status, InvalidRequest)
        if cls is InvalidRequest and text_code == "context_length_exceeded":
            cls = ContextLengthExceeded
        elif cls is NotFound and text_code == "model_not_found":
            cls = ModelNotFound
        return cls(message or None, param=param, code=text_code)
    if status == 503 and text_code in _SHUTTING_DOWN_CODES:
        return WorkerShuttingDown(message or None, code=text_code)
    if status == 503 and (text_code in _BUSY_CODES or type_ == "overloaded_error"):
        return AllWorkersBusy(message or None, code=text_code)
    if status == 504 or type_ == "timeout_error":
        return WorkerResponseTimeout(message or None)
    if status == 501:
        return NotImplementedParameter(message or None, param=param, code=text_code)
    return UpstreamError(message or f"The worker failed with HTTP {status}")


_CLIENT_ERRORS: dict[int, type[DynamoError]] = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    403: AuthenticationFailed,
    404: NotFound,
    405: MethodNotAllowed,
    413: RequestTooLarge,
    415: UnsupportedMediaType,
    422: InvalidRequest,
    429: TooManyRequests,
}

_STATUS_BY_TYPE = {
    "invalid_request_error": 400,
    "BadRequestError": 400,
    "authentication_error": 401,
    "not_found_error": 404,
    "NotFoundError": 404,
    "rate_limit_error": 429,
    "overloaded_error": 503,
    "service_unavailable_error": 503,
    "timeout_error": 504,
    "not_implemented_error": 501,
}


def _error_fields(body: bytes) -> tuple[str, str | None, str | int | None, str | None]:
    """(message, type, code, param) of an error body in any of the shapes workers use."""
    try:
        obj = msgspec.json.decode(body)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return _clean_message(body.decode("utf-8", "replace")), None, None, None
    detail: Any = obj
    if isinstance(obj, dict):
        if "error" in obj:
            detail = obj["error"]
            if isinstance(detail, str):  # TGI: {"error": "...", "error_type": "..."}
                kind = obj.get("error_type")
                return _clean_message(detail), kind if isinstance(kind, str) else None, None, None
        elif "detail" in obj:  # FastAPI
            return _clean_message(str(obj["detail"])), None, None, None
    if not isinstance(detail, dict):
        return _clean_message(str(detail)), None, None, None
    message = detail.get("message")
    kind = detail.get("type")
    code = detail.get("code")
    param = detail.get("param")
    return (
        _clean_message(message if isinstance(message, str) else ""),
        kind if isinstance(kind, str) else None,
        code if isinstance(code, str | int) and not isinstance(code, bool) else None,
        param if isinstance(param, str) else None,
    )


def _clean_message(text: str) -> str:
    """A worker's message as we pass it on: its first line, bounded, no control characters."""
    line = text.strip().split("\n", 1)[0]
    return "".join(ch for ch in line[:MAX_MESSAGE_CHARS] if ch.isprintable())


# --- parsing -----------------------------------------------------------------------------------


_chunk_decoder = msgspec.json.Decoder(StreamChunk)


def _usage(usage: UsageInfo) -> Usage:
    details = usage.prompt_tokens_details
    return Usage(
        usage.prompt_tokens or 0,
        usage.completion_tokens or 0,
        (details.cached_tokens or 0) if details is not None else 0,
    )


def _malformed(what: bytes) -> UpstreamError:
    return UpstreamError(f"The worker sent a malformed event: {what[:80]!r}")


# --- the stream --------------------------------------------------------------------------------


class RemoteStream:
    """One attempt's stream from a worker: ``AsyncIterator[EngineOutput]`` plus ``aclose()``.

    Made by :meth:`WorkerClient.open_stream` once the worker answered with its headers. It owns
    the upstream response from then on and releases it exactly once, however it ends.
    """

    __slots__ = (
        "_aborted",
        "_ctx",
        "_deadline",
        "_done",
        "_failure",
        "_finish_reason",
        "_finished",
        "_gen",
        "_is_ours",
        "_mode",
        "_model",
        "_null_finish",
        "_null_finish_window",
        "_remove_callback",
        "_request_id",
        "_resp",
        "_response_id",
        "_rewrites",
        "_seen_first",
        "_session",
        "_stop_task",
        "_url",
        "_usage",
        "upstream_id",
    )

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        resp: aiohttp.ClientResponse,
        ctx: EngineContext,
        *,
        request_id: str,
        response_id: str,
        model: str,
        mode: _Mode,
        is_ours: bool,
        deadline: float | None,
    ) -> None:
        self._session = session
        self._url = url
        self._resp = resp
        self._ctx = ctx
        # Our worker may have replaced an id it does not accept; it echoes the one it used.
        self._request_id = resp.headers.get("X-Request-Id", request_id)
        self._response_id = response_id
        self._model = model
        self._mode = mode
        self._is_ours = is_ours
        self._deadline = deadline
        self._aborted = False
        self._done = False
        self._finished = False
        self._seen_first = False
        self._rewrites: list[tuple[bytes, bytes]] = []
        self._null_finish = b""
        self._null_finish_window = 0
        self._usage: Usage | None = None
        self._failure: DynamoError | None = None
        self._finish_reason: str | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self.upstream_id: str | None = None
        self._gen = self._run()
        self._remove_callback = ctx.on_stop(self._on_stop)

    def __aiter__(self) -> RemoteStream:
        return self

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
        if not await _post_stop(self._session, self._url, self._request_id):
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
            if not self._aborted and self._resp.content.is_eof():
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
                return await self._resp.content.readany()
        except TimeoutError as exc:
            if not timer.expired() or isinstance(exc, aiohttp.ClientError):
                raise
            raise WorkerResponseTimeout(
                "The worker sent no event within the first-token timeout"
            ) from None

    async def _run(self) -> AsyncGenerator[EngineOutput, None]:
        read = self._resp.content.readany
        ctx = self._ctx
        relay = self._mode is _Mode.RELAY
        tail = b""
        crlf: bool | None = None
        try:
            while True:
                try:
                    chunk = await (read() if self._seen_first else self._read_first())
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                    if self._ended_quietly():
                        return
                    raise WorkerDisconnected(
                        f"The worker's connection dropped mid-stream: {_describe(exc)}"
                    ) from exc
                except WorkerResponseTimeout:
                    if self._ended_quietly():
                        return
                    raise
                if ctx.is_killed or self._aborted:
                    return  # killed: do not drain what was already buffered
                if not chunk:
                    if self._ended_quietly():
                        return
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
                part = data[:end] if end < len(data) else data
                tail = data[end:]
                out = self._relay_fast(part) if relay else None
                if out is None:
                    out = self._parse(part)
                if out is not None:
                    yield out
                if self._failure is not None:
                    if self._ended_quietly():
                        return  # a worker told to stop may say so with an error
                    raise self._failure
                if self._done:
                    await self._drain()
                    return
        finally:
            await self._finish()

    async def _drain(self) -> None:
        """Read past [DONE] to the end of the body, so the connection can go back to the pool."""
        content = self._resp.content
        if content.is_eof():
            return
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                while await content.readany():
                    pass
        except (TimeoutError, aiohttp.ClientError):
            self._abort()

    # --- the relay's fast path ------------------------------------------------------------

    def _relay_fast(self, part: bytes) -> EngineOutput | None:
        """Complete events passed on as bytes; None when the buffer needs the slow path.

        Everything that needs a decision comes at the end of a stream, after the last content
        chunk: the chunk with a ``finish_reason``, the usage-only chunk, ``[DONE]``, and an
        error (a worker ends the stream after it). So only the buffer's last event is checked,
        and only its last few bytes: an in-progress chunk has ``"finish_reason":null`` there,
        and none of the others has. A leading comment also goes the slow way, to be dropped.
        """
        window = self._null_finish_window
        if not window or part[0] == 58:  # 58 is ":", a comment line
            return None
        size = len(part)
        start = size - window
        at = part.find(self._null_finish, start if start > 0 else 0)
        if at < 0:
            return None
        # The last boundary before the final one: it must come before that finish_reason.
        last = part.rfind(b"\n\n", 0, size - 2)
        if last > at:
            return None
        # One event is about one token (the exact count comes with the usage at the end).
        num_tokens = 1 if last < 0 else part.count(b"\n\n")
        for old, new in self._rewrites:
            part = part.replace(old, new)
        return EngineOutput(raw=part, num_tokens=num_tokens)

    def _learn(self, event: bytes, chunk: StreamChunk) -> None:
        """From the first event: the upstream's id, model name and JSON spacing."""
        self._seen_first = True
        self._deadline = None
        sep = b": " if b'": ' in event and b'":"' not in event else b":"
        null_finish = b'"finish_reason"' + sep + b"null"
        at = event.rfind(null_finish)
        if self._mode is _Mode.RELAY and at >= 0:
            self._null_finish = null_finish
            # How far from the end of a chunk its finish_reason may sit (room for a longer
            # stop_reason or token_ids after it than in this chunk).
            self._null_finish_window = len(event) - at + 2 + 96
        if chunk.id is not None:
            self.upstream_id = chunk.id
            if chunk.id != self._response_id:
                self._rewrites.append((_encode(chunk.id), _encode(self._response_id)))
        if chunk.model is not None and chunk.model != self._model:
            self._rewrites.append(
                (b'"model"' + sep + _encode(chunk.model), b'"model"' + sep + _encode(self._model))
            )

    # --- the slow path: event by event ----------------------------------------------------

    def _parse(self, part: bytes) -> EngineOutput | None:
        mode = self._mode
        keep_raw = mode is not _Mode.PARSED
        kept: list[bytes] = []
        texts: list[str] = []
        token_ids: list[int] | None = None
        prompt_ids: list[int] | None = None
        finish_reason: str | None = None
        num_tokens = 0
        for event in part.split(b"\n\n"):
            if not event:
                continue
            try:
                name, data = _split_event(event)
                chunk = _decode_chunk(name, data)
            except DynamoError as exc:
                # What came before the failure is still delivered; the stream raises after it.
                self._failure = exc
                break
            if chunk is None:
                if data == b"[DONE]":
                    self._done = True
                    break
                continue
            if not self._seen_first:
                self._learn(event, chunk)
            if chunk.usage is not None:
                self._usage = _usage(chunk.usage)
            if chunk.prompt_token_ids is not None:
                prompt_ids = chunk.prompt_token_ids  # vLLM's chat puts them on the chunk
            choices = chunk.choices
            if not choices:
                continue  # the usage-only chunk: its usage rides on the last output
            if keep_raw:
                kept.append(event)
            for choice in choices:
                text = choice.delta.content if choice.delta is not None else choice.text
                if text:
                    texts.append(text)
                if choice.prompt_token_ids is not None:
                    prompt_ids = choice.prompt_token_ids
                ids = choice.token_ids
                if ids:
                    token_ids = ids if token_ids is None else token_ids + ids
                    num_tokens += len(ids)
                elif text:
                    num_tokens += 1
                if choice.finish_reason is not None:
                    finish_reason = self._finish_reason = choice.finish_reason
        usage = None
        if self._done:
            # The last output carries the usage and (again, if it came earlier) the finish reason.
            usage = self._usage
            finish_reason = self._finish_reason
        raw: bytes | None = None
        if keep_raw:
            raw = b"\n\n".join(kept) + b"\n\n" if kept else b""
            for old, new in self._rewrites:
                raw = raw.replace(old, new)
            if not kept and usage is None:
                return None
        elif (
            not texts
            and token_ids is None
            and finish_reason is None
            and usage is None
            and prompt_ids is None
        ):
            return None
        return EngineOutput(
            "".join(texts),
            num_tokens,
            token_ids=token_ids,
            finish_reason=finish_reason,
            usage=usage,
            raw=raw,
            prompt_token_ids=prompt_ids,
        )


def _decode_chunk(name: bytes | None, data: bytes | None) -> StreamChunk | None:
    """The chunk an event carries; None for [DONE], comments and events we ignore."""
    if data is None or data == b"[DONE]":
        return None
    if name is not None and name != b"message":
        if name == b"error":
            raise error_from_worker(None, data)
        return None
    try:
        chunk = _chunk_decoder.decode(data)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        raise _malformed(data) from None
    if chunk.error is not None or chunk.object == "error":
        raise error_from_worker(None, data)
    return chunk


def _split_event(event: bytes) -> tuple[bytes | None, bytes | None]:
    """(event name, data) of one SSE event; data None when it has no data line."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return None, event[6:]  # the usual one-line event
    name: bytes | None = None
    data: list[bytes] = []
    for line in event.split(b"\n"):
        if not line or line[0] == 58:  # ":" starts a comment
            continue
        field, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value
        elif field not in (b"id", b"retry"):
            raise _malformed(line)
    return name, b"\n".join(data) if data else None
