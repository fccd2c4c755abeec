"""The error tables: what a worker's failure becomes in our :mod:`dynamo_llm.errors` classes.

Two kinds of failure reach the transport, and the router acts on the class each becomes:

- **A worker's answer** (:func:`error_from_worker`): an HTTP error status with a body, or an
  error event inside a stream. A 4xx becomes the matching 4xx :class:`DynamoError` with the
  worker's message, param and code; a 503 saying it is busy becomes :class:`AllWorkersBusy`,
  one saying it is shutting down :class:`WorkerShuttingDown`; a 504 or a timeout type
  :class:`WorkerResponseTimeout`; another 5xx :class:`UpstreamError`. The body may be in the
  OpenAI shape, vLLM's older flat shape, TGI's or FastAPI's.
- **A failed POST** (:func:`admission_error`): the exceptions of :mod:`.h1` before the response
  headers (probes, model lists and stops go through aiohttp, whose failures :func:`describe`
  and :func:`is_closed_unanswered` also know).
  A refused or timed-out connect is :class:`WorkerUnreachable`; no headers in time is
  :class:`WorkerResponseTimeout`; a pooled connection the worker closed as we reused it is
  worth one retry.

Classification is by status, code, type and exception class, never by message text.
"""

from __future__ import annotations

import logging
import os
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
    UpstreamNoStream,
    WorkerDisconnected,
    WorkerResponseTimeout,
    WorkerShuttingDown,
    WorkerUnreachable,
)
from ..runtime.context import EngineContext
from .h1 import BadResponse, ClosedUnanswered, ConnectFailed, ConnectionDropped, H1Error

__all__ = [
    "admission_error",
    "describe",
    "error_from_worker",
    "is_closed_unanswered",
    "no_stream_error",
    "summarize_body",
]

# How much of a worker's error message is passed on.
MAX_MESSAGE_CHARS = 1000
# How much of a body that is not an answer is quoted in an error message or a log line.
MAX_SUMMARY_CHARS = 200

_SHUTTING_DOWN_CODES = frozenset({"server_shutting_down", "worker_shutting_down"})
_BUSY_CODES = frozenset({"all_workers_busy", "overloaded", "server_overloaded"})

log = logging.getLogger("dynamo_llm.transport")


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


def summarize_body(body: bytes) -> str:
    """What a worker's body says, in a few words: the message of an error body in any of the
    shapes workers use, else its first line; bounded, printable, "" for an empty body."""
    if not body.strip():
        return ""
    # An answer that is no error (a unary completion, say) is quoted as it is.
    message = _error_fields(body)[0] or _clean_message(body.decode("utf-8", "replace"))
    if len(message) > MAX_SUMMARY_CHARS:
        message = message[: MAX_SUMMARY_CHARS - 3] + "..."
    return message


def no_stream_error(status: int, content_type: str, body: bytes) -> UpstreamNoStream:
    """The error for a 2xx answer that carries no event stream (an empty body, a JSON body)."""
    summary = summarize_body(body)
    if not summary:
        return UpstreamNoStream(f"The worker answered HTTP {status} with an empty body")
    kind = f" ({content_type})" if content_type else ""
    return UpstreamNoStream(
        f"The worker answered HTTP {status}{kind} with a body that is not an event stream: "
        + summary
    )


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


def admission_error(
    exc: TimeoutError | H1Error, timer_fired: bool, ctx: EngineContext
) -> DynamoError | None:
    """What a failed POST becomes (``exc`` from :mod:`.h1` or the admission timer); None for
    a pooled connection the worker closed unanswered, worth one retry."""
    if ctx.is_stopped:
        return Cancelled()
    if timer_fired:
        return WorkerResponseTimeout("The worker did not answer within the first-token timeout")
    if isinstance(exc, ConnectFailed):
        return WorkerUnreachable(f"Could not connect to the worker: {exc.reason}")
    if isinstance(exc, BadResponse):
        return UpstreamError(f"The worker sent a malformed HTTP response: {describe(exc)}")
    if isinstance(exc, ClosedUnanswered):
        return None
    return WorkerDisconnected(f"The worker's connection failed: {describe(exc)}")


def is_closed_unanswered(exc: BaseException) -> bool:
    """Whether the worker closed (or reset) a connection it had accepted before answering: most
    likely a pooled connection it closed just as a request went out on it, worth one more try on
    a fresh one. A failed connect is not such a case."""
    if isinstance(exc, ClosedUnanswered):
        return True
    return isinstance(
        exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError
    ) and not isinstance(exc, aiohttp.ClientConnectorError)


def describe(exc: BaseException) -> str:
    """An aiohttp failure in our own few words, for a message a client may see.

    Never the library's text or class (``<TransferEncodingError: 400, message='Not enough data
    to satisfy transfer length header.'>`` told a client nothing and named our HTTP client); the
    full detail goes to the debug log.
    """
    log.debug("worker connection failure: %r", exc)
    if isinstance(exc, ConnectFailed):
        return exc.reason
    if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error.errno:
        # "Connection refused", not asyncio's text, which names the worker's address.
        return os.strerror(exc.os_error.errno).lower()
    for kind, words in _FAILURE_WORDS:
        if isinstance(exc, kind):
            return words
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return "the connection failed"


_FAILURE_WORDS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    ((aiohttp.ClientPayloadError, ConnectionDropped), "the response body was cut short"),
    ((aiohttp.ServerDisconnectedError, ClosedUnanswered), "the worker closed the connection"),
    ((aiohttp.ConnectionTimeoutError, aiohttp.ServerTimeoutError, TimeoutError), "timed out"),
    (aiohttp.InvalidURL, "the worker's URL is invalid"),
    ((aiohttp.ClientResponseError, BadResponse), "the response was not valid HTTP"),
)
