"""The error tables: what a worker answers, in any shape servers use, maps to our classes."""

import pytest

from dynamo_llm.errors import (
    ContextLengthExceeded,
    DynamoError,
    InvalidRequest,
    ModelNotFound,
    TooManyRequests,
    UpstreamError,
    WorkerResponseTimeout,
    WorkerShuttingDown,
)
from dynamo_llm.transport import (
    error_from_worker,
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
