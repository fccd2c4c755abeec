"""The HTTP client to OpenAI-compatible workers: admission of an attempt, probes, model lists.

:meth:`WorkerClient.open_stream` runs one routing attempt against one worker (vLLM, SGLang,
llama.cpp's server, TGI, Ollama, or our own ``dynamo-llm worker``). Its ``await`` is the
**admission**: the request goes upstream as a stream (:mod:`.body`) with ``X-Request-Id``, the id
of the context it runs under (the router runs each attempt under a context named by a fresh
UUID, since some engines accept no other id), and ``X-Client-Request-Id``, the request's own id
(the client's, ``<id>-<k>`` for a fan-out sub-request: for a worker's logs, and the same for
every attempt). Everything that can go wrong before the first byte of the body is raised
there, as the error class the router acts on (:mod:`.errors`): connect refused or timed out ->
:class:`WorkerUnreachable`; no response headers within ``first_token_timeout`` ->
:class:`WorkerResponseTimeout`; a 4xx -> the matching 4xx :class:`DynamoError` with the worker's
message, param and code; a 503 saying it is busy -> :class:`AllWorkersBusy`; a 503 saying it is
shutting down -> :class:`WorkerShuttingDown`; another 5xx -> :class:`UpstreamError` with the
worker's message; a 2xx with a JSON body instead of an event stream ->
:class:`UpstreamNoStream` (a failure of this request; the router probes the worker). What it
returns is the attempt's :class:`~.stream.RemoteStream`. :meth:`WorkerClient.open_answer` is its
unary sibling, for a caller that needs no events: a one-choice unary request asked of the
worker as unary, its answer returned whole (:mod:`.answer`).

:meth:`WorkerClient.probe` is the active probe of a quarantined worker (:mod:`.probe`).

The client only bounds the wait for the response headers and the first event with
``first_token_timeout``; the caller (the router) owns the inactivity timer.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator

import aiohttp
import msgspec

from ..engines.base import EngineOutput, EngineRequest
from ..engines.endpoints import family_of
from ..errors import (
    AllWorkersBusy,
    Cancelled,
    UpstreamError,
    WorkerDisconnected,
    WorkerUnreachable,
)
from ..protocols.completions import CompletionRequest
from ..protocols.models import decode_model_list
from ..runtime.context import EngineContext
from .answer import one_output, read_answer, whole_answer
from .auth import WorkerKeys
from .body import upstream_body
from .errors import (
    admission_error,
    describe,
    error_from_worker,
    is_closed_unanswered,
    no_stream_error,
)
from .h1 import Connection, H1Error
from .pool import Pool
from .probe import ProbeResult, probe_worker
from .stream import RemoteStream, StreamMode, post_stop

__all__ = ["WorkerClient", "make_session"]


def make_session(
    connect_timeout: float,
    *,
    keepalive_timeout: float = 4.0,
    api_key: str | None = None,
    worker_keys: WorkerKeys | None = None,
) -> aiohttp.ClientSession:
    """A pooled session for talking to workers; the caller owns it and closes it.

    Call it with a running event loop. The session's own connections (probes, model lists,
    stops, scrapes) are not bounded, so those never queue behind streams; generation requests
    do not use them, their bound is the :class:`WorkerClient`'s ``max_connections``. There is no
    total or read timeout, because streams are long; ``connect_timeout`` bounds the TCP connect.
    ``keepalive_timeout`` is shorter than the idle timeout of the common worker servers (uvicorn
    closes idle connections after 5 s) so that a pooled connection is not reused just as the
    worker closes it. ``api_key`` is sent to every worker as ``Authorization: Bearer``, on every
    request the session makes (probes, model lists, graceful stops, scrapes) and every
    generation request of the :class:`WorkerClient` built on it, except to a worker that
    ``worker_keys`` gives a key of its own (:mod:`.auth`).
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    connector = aiohttp.TCPConnector(
        limit=0,
        limit_per_host=0,
        keepalive_timeout=keepalive_timeout,
        ttl_dns_cache=60,
    )
    timeout = aiohttp.ClientTimeout(
        total=None, connect=None, sock_connect=connect_timeout, sock_read=None
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        trust_env=False,
        raise_for_status=False,
        headers=headers,
        middlewares=(worker_keys.middleware,) if worker_keys is not None else (),
    )


class WorkerClient:
    """Talks to OpenAI-compatible workers: generation requests over its own pool of HTTP/1.1
    connections (:mod:`.pool`, :mod:`.h1`), everything else (probes, model lists, graceful
    stops, scrapes) over a shared, pooled :class:`aiohttp.ClientSession`.

    Stateless apart from the two pools, so one client serves every worker; each stream owns
    what it starts. The connection pool is built from the session's settings (connect timeout,
    ``Authorization``), ``worker_keys`` and ``max_connections``: at most that many generation
    connections open at once over every worker (0: no bound; ``--worker-max-connections``).
    Each in-flight request holds one for its whole life, so the bound also bounds concurrent
    upstream requests; one past it waits for a free connection, bounded only by the caller's
    timers. Close it with :meth:`aclose` (the session is the caller's).
    """

    __slots__ = ("pool", "session")

    def __init__(
        self,
        session: aiohttp.ClientSession,
        worker_keys: WorkerKeys | None = None,
        *,
        max_connections: int = 0,
    ) -> None:
        self.session = session
        self.pool = Pool(
            session.timeout.sock_connect,
            max_connections,
            authorization=session.headers.get(aiohttp.hdrs.AUTHORIZATION),
            worker_keys=worker_keys,
        )

    async def aclose(self) -> None:
        """Close the generation connections that are idle (those in use close as they end)."""
        await self.pool.aclose()

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
        ``track_tokens`` asks the worker for token ids (``return_token_ids``), for migration:
        relayed, they stay in the ``raw`` bytes (the migration state parses them only for a
        replay); for a client that asked for them too, every output also carries its
        ``text``/``token_ids``. ``response_id`` is the id the
        client sees, by default ``chatcmpl-<request id>`` or ``cmpl-<request id>``.
        ``relay=False`` forces the parsed mode (no ``raw`` bytes): the frontend renders every
        output itself, as a migration needs, since its replay may go to another endpoint
        (a chat request continued as token ids on ``/v1/completions``).
        The worker knows the request by ``ctx.id`` (``X-Request-Id``), and a graceful stop
        names it so (unless the worker says it used another id).

        Raises, before any output: :class:`WorkerUnreachable`, :class:`WorkerResponseTimeout`,
        :class:`WorkerDisconnected` (the worker closed without answering, twice),
        :class:`Cancelled` (``ctx`` stopped meanwhile), or the worker's own error.
        """
        params = request.params
        if not params.stream or _is_subrequest(request) or not relay:
            mode = StreamMode.PARSED
        elif track_tokens:
            # The worker sends token ids; the migration state keeps the relayed bytes and parses
            # them only if the request migrates (and strips the ids the client did not ask for).
            mode = StreamMode.TRACKED if params.return_token_ids else StreamMode.RELAY
        else:
            mode = StreamMode.RELAY
        body = upstream_body(request, model=model, return_token_ids=track_tokens)
        loop = asyncio.get_running_loop()
        deadline = None if first_token_timeout is None else loop.time() + first_token_timeout
        conn = await self._admit(url, request, ctx, body, whole=False, deadline=deadline)
        content_type = conn.content_type
        if _is_json(content_type):
            # A JSON answer to a streamed request (an error, llama_cpp.server's way): not an
            # event stream, a failure of this request only.
            status = conn.status
            try:
                answer = await _read_bounded(conn, deadline)
            finally:
                conn.release()
            raise no_stream_error(status, content_type, answer)
        return self._remote_stream(
            url,
            request,
            ctx,
            conn,
            mode=mode,
            is_ours=is_ours,
            deadline=deadline,
            response_id=response_id,
        )

    async def open_answer(
        self,
        url: str,
        request: EngineRequest,
        ctx: EngineContext,
        *,
        model: str | None = None,
        is_ours: bool = False,
    ) -> AsyncIterator[EngineOutput]:
        """Ask the worker at ``url`` for a unary answer to ``request`` and return it whole, as
        a stream of one output (:mod:`.answer`), for a caller that needs none of its events.

        Nothing bounds the wait but ``ctx`` (a stop closes the connection): the answer comes
        whole, so no first-token or silence limit can time it. A request of several choices (a
        fan-out sub-request) or a streaming one gets :meth:`open_stream` instead, and a worker
        that streams anyway is read as a parsed stream. Raises as :meth:`open_stream` does, and
        :class:`WorkerDisconnected` when the connection drops before the answer's end.
        """
        if request.params.stream or _is_subrequest(request):
            return await self.open_stream(url, request, ctx, model=model, is_ours=is_ours)
        body = upstream_body(request, model=model, stream=False)
        conn = await self._admit(url, request, ctx, body, whole=True, deadline=None)
        response_id = family_of(request).response_id(request.id)
        if conn.content_type == _EVENT_STREAM:
            return self._remote_stream(
                url,
                request,
                ctx,
                conn,
                mode=StreamMode.PARSED,
                is_ours=is_ours,
                deadline=None,
                response_id=response_id,
            )
        status = conn.status  # read before the connection is released (which resets it)
        answer = await read_answer(conn, ctx)
        return one_output(
            whole_answer(status, answer, response_id=response_id, model=request.model)
        )

    async def _admit(
        self,
        url: str,
        request: EngineRequest,
        ctx: EngineContext,
        body: bytes,
        *,
        whole: bool,
        deadline: float | None,
    ) -> Connection:
        """POST ``body`` for ``request``; the connection holding the worker's 2xx answer.

        ``whole``: a unary answer is asked for (its head comes at its end). An error status is
        read (bounded by ``deadline``) and raised as the worker's error.
        """
        headers = b"".join((
            _ANSWER_HEADERS if whole else _STREAM_HEADERS,
            b"X-Request-Id: ", _header_value(ctx.id),
            b"\r\nX-Client-Request-Id: ", _header_value(request.id), b"\r\n",
        ))  # fmt: skip
        path = family_of(request).path
        conn = await self._post(url, path, body, headers, ctx, deadline=deadline, whole=whole)
        status = conn.status
        if status >= 400:
            try:
                error_body = await _read_bounded(conn, deadline)
            finally:
                conn.release()
            raise error_from_worker(status, error_body)
        return conn

    def _remote_stream(
        self,
        url: str,
        request: EngineRequest,
        ctx: EngineContext,
        conn: Connection,
        *,
        mode: StreamMode,
        is_ours: bool,
        deadline: float | None,
        response_id: str | None,
    ) -> RemoteStream:
        params = request.params
        if response_id is None:
            response_id = family_of(request).response_id(request.id)
        options = params.stream_options
        return RemoteStream(
            self.session,
            url,
            conn,
            ctx,
            request_id=ctx.id,
            response_id=response_id,
            model=request.model,
            mode=mode,
            is_ours=is_ours,
            deadline=deadline,
            usage_chunk=not params.stream or (options is not None and options.include_usage),
        )

    async def _post(
        self,
        url: str,
        path: str,
        body: bytes,
        headers: bytes,
        ctx: EngineContext,
        *,
        deadline: float | None,
        whole: bool = False,
    ) -> Connection:
        """The connection holding the worker's answer head (a first try closed unanswered is
        retried once, on a new connection if need be).

        ``whole``: the head comes with a whole answer, after the generation. A worker that
        closed the connection unanswered and then refuses the retry's has dropped the request
        it was generating (:class:`WorkerDisconnected`), rather than being unreachable.
        """
        if ctx.is_stopped:
            raise Cancelled()
        pool = self.pool
        try:
            endpoint = pool.endpoint(url)
        except ValueError as exc:  # a port out of range or not a number, a broken IPv6 host
            raise WorkerUnreachable("The worker's URL is invalid") from exc
        data = pool.request_head(endpoint, path, headers, len(body)) + body
        for attempt in (1, 2):
            # One timer bounds the wait for headers; a stop of the context fires it at once, so
            # a request abandoned during admission closes its connection too.
            timer = asyncio.timeout_at(deadline)
            queued = False
            try:
                async with timer:
                    remove = ctx.on_stop(functools.partial(_expire, timer))
                    try:
                        queued = pool.must_wait(endpoint)  # at --worker-max-connections
                        conn = await pool.acquire(endpoint)
                        queued = False
                        await conn.request(data)  # closes the connection if it fails
                        return conn
                    finally:
                        remove()
            except (TimeoutError, H1Error) as exc:
                if queued and isinstance(exc, TimeoutError):
                    # Ended while waiting for one of the frontend's own connections: the
                    # worker was never asked, so nothing here is held against it.
                    raise AllWorkersBusy(
                        "Every connection the frontend may open to the workers is in use "
                        "(--worker-max-connections); retry later",
                        code="worker_connections_busy",
                    ) from None
                error = admission_error(exc, timer.expired(), ctx)
                if error is None and attempt == 1:
                    continue  # the worker closed a pooled connection just as we reused it
                if whole and attempt == 2 and isinstance(error, WorkerUnreachable):
                    error = WorkerDisconnected("The worker's connection dropped before it answered")
                raise (error or WorkerDisconnected()) from exc
        raise AssertionError("unreachable")

    async def stop_request(self, url: str, request_id: str) -> bool:
        """Ask one of our workers to stop generating ``request_id`` gracefully."""
        return await post_stop(self.session, url, request_id)

    async def probe(
        self, url: str, *, within: float, model: str | None = None, first: str | None = None
    ) -> ProbeResult:
        """Whether the worker at ``url`` generates: a 1-token completion of ``model`` (the
        worker's own name for it), falling back to what the engine offers (:mod:`.probe`).

        Truthy when it passed; ``first`` is the probe that decided last time (its ``path``).
        """
        return await probe_worker(self.session, url, within=within, model=model, first=first)

    async def check_reachable(self, url: str, *, within: float) -> WorkerUnreachable | None:
        """Whether the worker at ``url`` still accepts connections: a ``GET /v1/models``.

        The error when no connection could be made (refused, connect timed out), else None:
        any answer at all, even an error status or one slower than ``within``, proves the
        process is there (whether its engine generates is the quarantine probe's question).
        A pooled connection the worker closed meanwhile is retried once on a new one.
        """
        timeout = aiohttp.ClientTimeout(total=within)
        for attempt in (1, 2):
            try:
                async with self.session.get(url.rstrip("/") + "/v1/models", timeout=timeout) as r:
                    await r.read()
                return None
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                return WorkerUnreachable(f"Could not connect to the worker: {describe(exc)}")
            except (TimeoutError, aiohttp.ClientError) as exc:
                if attempt == 2 or not is_closed_unanswered(exc):
                    return None
        return None

    async def fetch_models(self, url: str, *, within: float) -> list[str]:
        """The model ids a worker serves, from its ``/v1/models``.

        Raises :class:`WorkerUnreachable` when it cannot be asked, or the worker's error.
        """
        return (await self.list_models(url, within=within))[0]

    async def list_models(self, url: str, *, within: float) -> tuple[list[str], str]:
        """The model ids a worker serves, and who serves them: the ``owned_by`` its cards
        agree on (``dynamo-llm`` for a ``dynamo-llm worker``), ``""`` when unknown."""
        try:
            async with self.session.get(
                url.rstrip("/") + "/v1/models", timeout=aiohttp.ClientTimeout(total=within)
            ) as resp:
                body = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise WorkerUnreachable(f"Could not list the worker's models: {describe(exc)}") from exc
        if status >= 400:
            raise error_from_worker(status, body)
        try:
            return decode_model_list(body)
        except msgspec.MsgspecError as exc:
            raise UpstreamError("The worker's /v1/models answer is malformed") from exc


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def _is_batch(prompt: list[str | int | list[int]]) -> bool:
    return len(prompt) > 1 and not isinstance(prompt[0], int)


def _is_subrequest(request: EngineRequest) -> bool:
    """Whether ``request`` is one choice of a fan-out (``n > 1``, or a batch of prompts)."""
    params = request.params
    return (params.n or 1) > 1 or (
        isinstance(params, CompletionRequest)
        and isinstance(params.prompt, list)
        and _is_batch(params.prompt)
    )


_EVENT_STREAM = "text/event-stream"


def _expire(timer: asyncio.Timeout, _ctx: EngineContext) -> None:
    if not timer.expired():
        timer.reschedule(-1.0)


async def _read_bounded(resp: Connection, deadline: float | None) -> bytes:
    """An error body, at most 64 KiB, read within the admission deadline."""
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout_at(deadline):
            while size < 65536 and (part := await resp.read_any(65536 - size)):
                parts.append(part)
                size += len(part)
    except (TimeoutError, H1Error):
        pass
    return b"".join(parts)[:65536]


_STREAM_HEADERS = b"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
_ANSWER_HEADERS = b"Content-Type: application/json\r\nAccept: application/json\r\n"


def _header_value(value: str) -> bytes:
    """A header value as sent: Latin-1, and never a line break (no header can be injected)."""
    data = value.encode("latin-1", "replace")
    if b"\r" in data or b"\n" in data:
        data = data.replace(b"\r", b"").replace(b"\n", b"")
    return data
