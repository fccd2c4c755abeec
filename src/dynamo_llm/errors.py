"""One exception hierarchy for every error a request can end with.

Each class carries its HTTP ``status``, the OpenAI error ``type``, the metrics ``error_type``
(``requests_total{error_type}``) and a default ``code``. Requests are classified by these class
attributes, never by message text. :func:`render_error` is the one place an error body is made,
for plain responses and SSE error frames alike.

::

    DynamoError                      500 internal_error              internal
    ├── InvalidRequest               400 invalid_request_error       validation
    │   ├── ContextLengthExceeded    400   code context_length_exceeded
    │   ├── RequestTooLarge          413   code request_too_large
    │   ├── RequestBodyTimeout       408   code request_timeout (the body came too slowly)
    │   └── UnsupportedMediaType     415   code unsupported_media_type
    ├── AuthenticationFailed         401 authentication_error        unauthorized
    ├── NotFound                     404 not_found_error             not_found
    │   └── ModelNotFound            404   code model_not_found
    ├── MethodNotAllowed             405 invalid_request_error       validation
    ├── NotImplementedParameter      501 not_implemented_error       not_implemented
    ├── TooManyRequests              429 overloaded_error            overload
    ├── AllWorkersBusy               503 overloaded_error            overload
    ├── NoWorkersAvailable           503 service_unavailable_error   unavailable
    ├── ResponseTimeout              504 timeout_error               response_timeout
    │   └── WorkerResponseTimeout    504   the worker said it timed out: quarantines, not migratable
    │       └── WorkerSilent         504   the router's own timer: quarantines, migratable
    ├── SlowClient                   408 timeout_error               slow_client (read nothing)
    ├── Cancelled                    499 cancelled                   cancelled
    │   └── ServerShuttingDown       503 service_unavailable_error   cancelled
    ├── ServerDraining               503 service_unavailable_error   unavailable (new work refused)
    ├── EngineError                  500 internal_error              internal
    │   └── UpstreamError            502 upstream_error              internal (a worker's 5xx)
    │       └── UpstreamNoStream     502   a 200 without an event stream: the worker is probed
    └── WorkerFault                  503 service_unavailable_error   unavailable
        ├── WorkerUnreachable        503   connect failed / timed out
        ├── WorkerDisconnected       503   dropped mid-stream, or ended without a terminal item
        └── WorkerShuttingDown       503   the worker said it is going away

Three more class attributes drive the router: ``quarantines`` (the worker that produced the error
is reported down), ``migratable`` (the request may be replayed on another worker, SPEC §9) and
``probes_worker`` (the worker is probed at once and quarantined only if the probe fails: its
answer was broken, but the worker may be fine). Only worker faults set them; a client's
cancellation, a 4xx or an overload never does.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

from .metrics import Outcome


class DynamoError(Exception):
    """Base of every error a request can end with; renders as an OpenAI error body."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    error_type: ClassVar[Outcome] = Outcome.INTERNAL
    default_code: ClassVar[str | int | None] = None
    default_message: ClassVar[str] = "Internal server error"
    quarantines: ClassVar[bool] = False
    migratable: ClassVar[bool] = False
    probes_worker: ClassVar[bool] = False

    def __init__(
        self, message: str | None = None, *, param: str | None = None, code: str | int | None = None
    ) -> None:
        self.message = message if message is not None else self.default_message
        self.param = param
        self.code = code if code is not None else self.default_code
        super().__init__(self.message)


class InvalidRequest(DynamoError):
    status = 400
    type = "invalid_request_error"
    error_type = Outcome.VALIDATION
    default_message = "Invalid request"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"
    default_message = "The prompt is longer than the model's context window"


class RequestTooLarge(InvalidRequest):
    status = 413
    default_code = "request_too_large"
    default_message = "Request body too large"


class RequestBodyTimeout(InvalidRequest):
    status = 408
    default_code = "request_timeout"
    default_message = "The request body did not arrive in time"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    default_code = "unsupported_media_type"
    default_message = "Content-Type must be application/json"


class AuthenticationFailed(DynamoError):
    status = 401
    type = "authentication_error"
    error_type = Outcome.UNAUTHORIZED
    default_code = "invalid_api_key"
    default_message = "Invalid API key"


class NotFound(DynamoError):
    status = 404
    type = "not_found_error"
    error_type = Outcome.NOT_FOUND
    default_message = "Not found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"
    default_message = "Model not found"


class MethodNotAllowed(DynamoError):
    status = 405
    type = "invalid_request_error"
    error_type = Outcome.VALIDATION
    default_code = "method_not_allowed"
    default_message = "Method not allowed"


class NotImplementedParameter(DynamoError):
    status = 501
    type = "not_implemented_error"
    error_type = Outcome.NOT_IMPLEMENTED
    default_code = "deprecated_parameter"
    default_message = "Not implemented"


class TooManyRequests(DynamoError):
    status = 429
    type = "overloaded_error"
    error_type = Outcome.OVERLOAD
    default_code = "too_many_requests"
    default_message = "Too many requests, please retry later"


class AllWorkersBusy(DynamoError):
    status = 503
    type = "overloaded_error"
    error_type = Outcome.OVERLOAD
    default_code = "all_workers_busy"
    default_message = "All workers are busy, please retry later"


class NoWorkersAvailable(DynamoError):
    status = 503
    type = "service_unavailable_error"
    error_type = Outcome.UNAVAILABLE
    default_code = "no_workers_available"
    default_message = "Model temporarily unavailable: no worker can serve it"


class ResponseTimeout(DynamoError):
    status = 504
    type = "timeout_error"
    error_type = Outcome.RESPONSE_TIMEOUT
    default_code = "response_timeout"
    default_message = "The engine stopped responding"


class SlowClient(DynamoError):
    """The client read nothing of its stream for too long (``DYN_HTTP_SLOW_CLIENT_TIMEOUT_SECS``)
    while the frontend held a full buffer for it: the request is stopped."""

    status = 408
    type = "timeout_error"
    error_type = Outcome.SLOW_CLIENT
    default_code = "slow_client"
    default_message = "The client stopped reading its stream; the request was stopped"


class Cancelled(DynamoError):
    status = 499
    type = "cancelled"
    error_type = Outcome.CANCELLED
    default_code = "cancelled"
    default_message = "Client closed request"


class ServerShuttingDown(Cancelled):
    """The server is shutting down and stopped the request (not the client's doing)."""

    status = 503
    type = "service_unavailable_error"
    default_code = "server_shutting_down"
    default_message = "The server is shutting down; please retry"


class ServerDraining(DynamoError):
    """A new request arrived after shutdown began: refused, so a load balancer moves on."""

    status = 503
    type = "service_unavailable_error"
    error_type = Outcome.UNAVAILABLE
    default_code = "server_shutting_down"
    default_message = "The server is shutting down and takes no new requests; please retry"


class EngineError(DynamoError):
    """The engine failed while generating. The message must be safe to show a client."""

    default_message = "The engine failed while generating"


class WorkerResponseTimeout(ResponseTimeout):
    """A worker timed out: it said so (a 504, a ``timeout_error``), or it sent no headers or no
    first event within the first-token limit the transport was given."""

    quarantines = True
    default_message = "The worker stopped responding"


class WorkerSilent(WorkerResponseTimeout):
    """The router's per-attempt timer found the worker silent (inactivity or first token).

    The worker is quarantined and, with migration on, the request moves to another worker like
    a dropped stream's (SPEC §9): another worker may well finish it. With migration off the
    client gets the 504 (or the error frame) as for any response timeout.
    """

    migratable = True


class UpstreamError(EngineError):
    """A worker answered with a 5xx; its message is passed on."""

    status = 502
    type = "upstream_error"
    default_message = "The worker failed"


class UpstreamNoStream(UpstreamError):
    """A worker answered 200 but sent no event stream: an empty body, or a JSON body.

    llama_cpp.server does this for a prompt longer than its context. The request fails with a
    502 naming the worker's status and what its body said; the worker itself is not quarantined
    on this alone, but probed at once (and quarantined if the probe fails).
    """

    default_code = "no_event_stream"
    default_message = "The worker answered without an event stream"
    probes_worker = True


class WorkerFault(DynamoError):
    """The worker (not the request) is at fault: report it down; the request may migrate."""

    status = 503
    type = "service_unavailable_error"
    error_type = Outcome.UNAVAILABLE
    default_code = "worker_unavailable"
    default_message = "The worker is unavailable"
    quarantines = True
    migratable = True


class WorkerUnreachable(WorkerFault):
    default_code = "worker_unreachable"
    default_message = "Could not connect to the worker"


class WorkerDisconnected(WorkerFault):
    default_code = "worker_disconnected"
    default_message = "The worker's stream ended before generation completed"


class WorkerShuttingDown(WorkerFault):
    default_code = "worker_shutting_down"
    default_message = "The worker is shutting down"


class _ErrorDetail(msgspec.Struct, omit_defaults=False):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorBody(msgspec.Struct):
    error: _ErrorDetail


_encode = msgspec.json.Encoder().encode

# An error body stays a few KiB whatever the client sent: messages that quote client input clip
# it themselves (:func:`clip`), and these caps hold for every message and param in any case.
MAX_MESSAGE_CHARS = 2048
MAX_PARAM_CHARS = 256
MAX_CODE_CHARS = 128


def clip(text: str, limit: int = 128) -> str:
    """``text`` as an error message may quote it: at most ``limit`` characters, marked if cut."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def render_error(exc: DynamoError) -> bytes:
    """The OpenAI error body for ``exc``: ``{"error": {message, type, param, code}}``."""
    param = exc.param if exc.param is None else clip(exc.param, MAX_PARAM_CHARS)
    code = exc.code if not isinstance(exc.code, str) else clip(exc.code, MAX_CODE_CHARS)
    message = clip(exc.message, MAX_MESSAGE_CHARS)
    return _encode(ErrorBody(_ErrorDetail(message, exc.type, param, code)))


def internal_error() -> DynamoError:
    """What an unexpected exception becomes: no traceback, no object addresses."""
    return DynamoError("Internal server error")
