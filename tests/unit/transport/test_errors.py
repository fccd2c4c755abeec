"""The error tables: what a worker answers, in any shape servers use, and how a POST failed,
map to our classes."""

import socket

import pytest

from dynamo_llm.errors import (
    Cancelled,
    ContextLengthExceeded,
    DynamoError,
    InvalidRequest,
    ModelNotFound,
    TooManyRequests,
    UpstreamError,
    WorkerDisconnected,
    WorkerResponseTimeout,
    WorkerShuttingDown,
    WorkerUnreachable,
)
from dynamo_llm.runtime.context import EngineContext
from dynamo_llm.transport import (
    error_from_worker,
)
from dynamo_llm.transport.errors import admission_error
from dynamo_llm.transport.h1 import (
    BadResponse,
    ClosedUnanswered,
    ConnectFailed,
    ConnectionDropped,
    H1Error,
)


@pytest.mark.parametrize(
    ("status", "body", "cls", "message"),
    [
        (
            400,
            b'{"error":{"message":"too long","type":"invalid_request_error",'
            b'"code":"context_length_exceeded","param":"messages"}}',
            ContextLengthExceeded,
            "too long",
        ),
        (
            400,
            b'{"object":"error","message":"bad temp","type":"BadRequestError","code":400}',
            InvalidRequest,
            "bad temp",
        ),
        (422, b'{"detail":"field required"}', InvalidRequest, "field required"),
        (
            404,
            b'{"error":{"message":"no such model","type":"not_found_error",'
            b'"code":"model_not_found"}}',
            ModelNotFound,
            "no such model",
        ),
        (429, b'{"error":"slow down","error_type":"overloaded"}', TooManyRequests, "slow down"),
        (
            503,
            b'{"error":{"message":"bye","type":"service_unavailable_error",'
            b'"code":"server_shutting_down"}}',
            WorkerShuttingDown,
            "bye",
        ),
        (500, b"Internal Server Error\nTraceback...", UpstreamError, "Internal Server Error"),
        (
            None,
            b'{"error":{"message":"oops","type":"BadRequestError","code":400}}',
            InvalidRequest,
            "oops",
        ),
        (
            None,
            b'{"error":{"message":"stalled","type":"timeout_error"}}',
            WorkerResponseTimeout,
            "stalled",
        ),
    ],
)
def test_worker_errors_map_to_our_classes(
    status: int | None, body: bytes, cls: type[DynamoError], message: str
) -> None:
    error = error_from_worker(status, body)
    assert type(error) is cls
    assert error.message == message


@pytest.mark.parametrize(
    ("exc", "cls", "message"),
    [
        (
            ConnectFailed(ConnectionRefusedError(111, "refused")),
            WorkerUnreachable,
            "Could not connect to the worker: connection refused",
        ),
        (
            ConnectFailed(timed_out=True),
            WorkerUnreachable,
            "Could not connect to the worker: connect timed out",
        ),
        (
            ConnectFailed(host="a..b"),
            WorkerUnreachable,
            "Could not connect to the worker: the worker's host `a..b` is not a valid host name",
        ),
        (
            ConnectFailed(socket.gaierror(-2, "Name or service not known"), host="w.invalid"),
            WorkerUnreachable,
            "Could not connect to the worker: the worker's host `w.invalid` could not be resolved",
        ),
        (
            BadResponse("x"),
            UpstreamError,
            "The worker sent a malformed HTTP response: the response was not valid HTTP",
        ),
        (
            ConnectionDropped("x"),
            WorkerDisconnected,
            "The worker's connection failed: the response body was cut short",
        ),
        (ClosedUnanswered("x"), None, None),
    ],
)
def test_a_failed_post_maps_by_the_class_of_its_failure(
    exc: H1Error, cls: type[DynamoError] | None, message: str | None
) -> None:
    error = admission_error(exc, False, EngineContext())
    assert (None if error is None else type(error)) is cls
    assert (None if error is None else error.message) == message


def test_a_stop_or_the_timer_wins_over_the_failure_it_caused() -> None:
    ctx = EngineContext()
    timed_out = admission_error(TimeoutError(), True, ctx)
    assert type(timed_out) is WorkerResponseTimeout
    ctx.stop()
    assert type(admission_error(ClosedUnanswered("x"), True, ctx)) is Cancelled
