"""The HTTP API through a real socket: every route, every error body, every validation row.

SPEC §7: each error is answered with the exact status and the OpenAI body
``{"error": {"message", "type", "param", "code"}}`` (never plain text), and an error changes
nothing: afterwards no request is in flight or queued, the request was counted once, and no
metric series carries a model name the client made up.

Most tests share one frontend per server interface (module scope: a server start and stop per
test would dominate the runtime); tests that need their own configuration start their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from dynamo_llm.config import Config
from dynamo_llm.engines.echo import EchoEngine
from dynamo_llm.errors import AllWorkersBusy, DynamoError, render_error
from dynamo_llm.http.app import ServedModel
from dynamo_llm.protocols import decode_chat_request, decode_completion_request
from dynamo_llm.runtime.clock import SystemClock
from dynamo_llm.testing import FakeEngine, Frontend, running_frontend
from tests.system.raw_http import raw_exchange, raw_post, status_of

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "test-model"
INTERFACES = ["rsgi", "asgi"]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = {"role": "user", "content": "Hello there"}


# --- helpers -------------------------------------------------------------------------------------


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [USER], **fields}


def completion_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Hello there", **fields}


def error_body(
    message: str, param: str | None, code: str | None, type: str = "invalid_request_error"
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, param: str | None, code: str = "invalid_value") -> dict[str, Any]:
    return error_body(f"Validation: {message}", param, code)


def assert_json_error(response: httpx.Response, status: int, body: dict[str, Any]) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == body


# Every server here is plain HTTP; sharing one TLS context saves httpx ~25 ms per client.
_TLS = ssl.create_default_context()


def client_for(fe: Frontend) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=fe.base_url, timeout=5, verify=_TLS)


async def request(fe: Frontend, method: str, path: str, **kwargs: Any) -> httpx.Response:
    # A client per request: a fresh connection keeps one test's failure from leaking into the
    # next through a half-read keep-alive connection.
    async with client_for(fe) as client:
        return await client.request(method, path, **kwargs)


async def wait_idle(fe: Frontend) -> None:
    """Wait until no admitted request is in flight (a response can reach the client a moment
    before the handler's ``finally`` has recorded its outcome)."""
    async with asyncio.timeout(5):
        await fe.app.wait_until_idle()


def model_labels(fe: Frontend) -> set[str]:
    return {
        sample.labels["model"]
        for family in text_string_to_metric_families(fe.metrics_text())
        for sample in family.samples
        if "model" in sample.labels
    }


async def assert_nothing_changed(fe: Frontend, *made_up: str) -> None:
    """No request in flight or queued, and no series for a name the client made up."""
    await wait_idle(fe)
    prefix = fe.metrics.prefix
    for gauge in ("inflight_requests", "queued_requests"):
        for labels, value in fe.samples(f"{prefix}_{gauge}"):
            assert value == 0, (gauge, labels)
    text = fe.metrics_text()
    for name in made_up:
        assert name not in text
    served = set(fe.app.models)
    assert model_labels(fe) <= served | {"unknown_model"}


@contextmanager
def counted_once(fe: Frontend, **labels: str) -> Iterator[None]:
    """The block sends one inference request, counted once in ``requests_total`` with
    ``labels``."""
    total = fe.value("requests_total")
    matching = fe.value("requests_total", **labels)
    yield
    assert fe.value("requests_total") == total + 1
    assert fe.value("requests_total", **labels) == matching + 1


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=INTERFACES)
async def shared(request: pytest.FixtureRequest) -> AsyncIterator[Frontend]:
    engine = EchoEngine(SystemClock(), delay_ms=0)
    async with running_frontend(engine, interface=request.param) as fe:
        yield fe


@pytest.fixture(params=INTERFACES)
def interface(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- §7.2 validation, both endpoints -----------------------------------------------------------

COMMON_ROWS = [
    pytest.param(
        {"model": "  "}, invalid("The 'model' field cannot be empty.", "model"), id="model-blank"
    ),
    pytest.param(
        {"temperature": 2.5},
        invalid("temperature must be between 0 and 2, got 2.5", "temperature"),
        id="temperature-high",
    ),
    pytest.param(
        {"temperature": -0.1},
        invalid("temperature must be between 0 and 2, got -0.1", "temperature"),
        id="temperature-negative",
    ),
    pytest.param(
        {"top_p": 1.5}, invalid("top_p must be between 0 and 1, got 1.5", "top_p"), id="top_p"
    ),
    pytest.param(
        {"frequency_penalty": -2.5},
        invalid("frequency_penalty must be between -2 and 2, got -2.5", "frequency_penalty"),
        id="frequency_penalty",
    ),
    pytest.param(
        {"presence_penalty": 2.1},
        invalid("presence_penalty must be between -2 and 2, got 2.1", "presence_penalty"),
        id="presence_penalty",
    ),
    pytest.param(
        {"logit_bias": {"50256": -101}},
        invalid("logit_bias values must be between -100 and 100, got -101", "logit_bias"),
        id="logit_bias",
    ),
    pytest.param({"n": 0}, invalid("n must be between 1 and 128, got 0", "n"), id="n-zero"),
    pytest.param({"n": 129}, invalid("n must be between 1 and 128, got 129", "n"), id="n-129"),
    pytest.param(
        {"max_tokens": 0},
        invalid("max_tokens must be greater than 0, got 0", "max_tokens"),
        id="max_tokens",
    ),
    pytest.param(
        {"stop": [f"s{i}" for i in range(33)]},
        invalid("stop must have at most 32 entries", "stop"),
        id="stop-33",
    ),
    pytest.param(
        {"stop": ["a", ""]}, invalid("stop entries must not be empty", "stop"), id="stop-empty"
    ),
    pytest.param(
        {"stream_options": {"include_usage": True}},
        invalid(
            "The 'stream_options' field is only allowed when 'stream' is set to true.",
            "stream_options",
        ),
        id="stream_options-without-stream",
    ),
    pytest.param(
        {"stream": False, "stream_options": {"include_usage": True}},
        invalid(
            "The 'stream_options' field is only allowed when 'stream' is set to true.",
            "stream_options",
        ),
        id="stream_options-with-stream-false",
    ),
    pytest.param(
        {"foo": 1, "bar": 2},
        invalid("Unsupported parameter(s): `bar`, `foo`", "bar", "unsupported_parameter"),
        id="unknown-fields",
    ),
    pytest.param(
        {"temperature": "hot"},
        invalid(
            "Invalid type for `temperature`: expected float, got str", "temperature", "invalid_type"
        ),
        id="wrong-type-temperature",
    ),
    pytest.param(
        {"stream": "yes"},
        invalid("Invalid type for `stream`: expected bool, got str", "stream", "invalid_type"),
        id="wrong-type-stream",
    ),
    pytest.param(
        {"model": 5},
        invalid("Invalid type for `model`: expected str, got int", "model", "invalid_type"),
        id="wrong-type-model",
    ),
]

CHAT_ROWS = [
    pytest.param(
        {"messages": []},
        invalid(
            "The 'messages' field cannot be empty. At least one message is required.", "messages"
        ),
        id="messages-empty",
    ),
    pytest.param(
        {"messages": "hi"},
        invalid("Invalid type for `messages`: expected array, got str", "messages", "invalid_type"),
        id="wrong-type-messages",
    ),
    pytest.param(
        {"logprobs": True, "top_logprobs": 21},
        invalid("top_logprobs must be between 0 and 20, got 21", "top_logprobs"),
        id="top_logprobs",
    ),
    pytest.param(
        {"max_completion_tokens": 0},
        invalid("max_completion_tokens must be greater than 0, got 0", "max_completion_tokens"),
        id="max_completion_tokens",
    ),
    *COMMON_ROWS,
]

COMPLETION_ROWS = [
    pytest.param(
        {"prompt": ""}, invalid("The 'prompt' field cannot be empty.", "prompt"), id="prompt-empty"
    ),
    pytest.param(
        {"prompt": []},
        invalid("The 'prompt' field cannot be empty.", "prompt"),
        id="prompt-empty-list",
    ),
    pytest.param(
        {"prompt": ["a", ""]},
        invalid("The 'prompt' field cannot be empty.", "prompt"),
        id="prompt-empty-element",
    ),
    pytest.param(
        {"prompt": ["a", 1]},
        invalid(
            "Invalid type for `prompt`: expected a string, an array of strings, an array of "
            "token ids or an array of token id arrays, got a mixed array",
            "prompt",
            "invalid_type",
        ),
        id="prompt-mixed",
    ),
    pytest.param(
        {"logprobs": 6},
        invalid("logprobs must be between 0 and 5, got 6", "logprobs"),
        id="logprobs",
    ),
    *COMMON_ROWS,
]


def protocols_error(decode: Callable[[bytes], object], body: bytes) -> dict[str, Any]:
    """The error body the protocols module itself produces for ``body``."""
    with pytest.raises(DynamoError) as info:
        decode(body)
    parsed: dict[str, Any] = json.loads(render_error(info.value))
    return parsed


async def check_rejected(
    fe: Frontend,
    path: str,
    body: dict[str, Any],
    *,
    status: int,
    expected: dict[str, Any],
    decode: Callable[[bytes], object],
) -> None:
    raw = json.dumps(body).encode()
    # A body that names a served model is labelled with it; anything else is unknown_model.
    model = str(body["model"]) if body.get("model") in fe.app.models else "unknown_model"
    endpoint = "chat_completions" if path == CHAT else "completions"
    labels = {"model": model, "endpoint": endpoint, "status": "error"}
    error_type = "not_implemented" if status == 501 else "validation"
    with counted_once(fe, **labels, error_type=error_type):
        response = await request(
            fe, "POST", path, content=raw, headers={"content-type": "application/json"}
        )
    assert_json_error(response, status, expected)
    assert response.json() == protocols_error(decode, raw)
    await assert_nothing_changed(fe)


@pytest.mark.parametrize(("fields", "expected"), CHAT_ROWS)
async def test_chat_validation_error_is_the_exact_openai_body(
    shared: Frontend, fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    await check_rejected(
        shared, CHAT, chat_body(**fields), status=400, expected=expected, decode=decode_chat_request
    )


@pytest.mark.parametrize(("fields", "expected"), COMPLETION_ROWS)
async def test_completion_validation_error_is_the_exact_openai_body(
    shared: Frontend, fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    await check_rejected(
        shared,
        COMPLETIONS,
        completion_body(**fields),
        status=400,
        expected=expected,
        decode=decode_completion_request,
    )


async def test_missing_messages_is_named(shared: Frontend) -> None:
    await check_rejected(
        shared,
        CHAT,
        {"model": MODEL},
        status=400,
        expected=invalid(
            "Missing required parameter: `messages`", "messages", "missing_required_parameter"
        ),
        decode=decode_chat_request,
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param(
            {"functions": [{"name": "f", "parameters": {}}]},
            error_body(
                "Validation: `functions` is deprecated. Please migrate to use `tools` instead.",
                "functions",
                "deprecated_parameter",
                "not_implemented_error",
            ),
            id="functions",
        ),
        pytest.param(
            {"function_call": "auto"},
            error_body(
                "Validation: `function_call` is deprecated. Please migrate to use `tool_choice` "
                "instead.",
                "function_call",
                "deprecated_parameter",
                "not_implemented_error",
            ),
            id="function_call",
        ),
    ],
)
async def test_deprecated_function_fields_are_501_pointing_to_tools(
    shared: Frontend, fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    await check_rejected(
        shared, CHAT, chat_body(**fields), status=501, expected=expected, decode=decode_chat_request
    )


async def test_a_validation_error_on_a_streaming_request_is_a_plain_json_error(
    shared: Frontend,
) -> None:
    await check_rejected(
        shared,
        CHAT,
        chat_body(stream=True, temperature=9),
        status=400,
        expected=invalid("temperature must be between 0 and 2, got 9", "temperature"),
        decode=decode_chat_request,
    )


async def test_a_streaming_request_rejected_by_a_value_check_is_counted_as_stream(
    shared: Frontend,
) -> None:
    with counted_once(shared, request_type="stream", error_type="validation"):
        response = await request(shared, "POST", CHAT, json=chat_body(stream=True, top_p=2))
    assert response.status_code == 400


# --- bodies the decoder cannot read ------------------------------------------------------------


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            b'{"model": "x", ',
            invalid("Invalid JSON body: Input data was truncated", None, "invalid_json"),
            id="truncated",
        ),
        pytest.param(
            b"{bad json}",
            invalid(
                "Invalid JSON body: JSON is malformed: object keys must be strings (byte 1)",
                None,
                "invalid_json",
            ),
            id="malformed",
        ),
        pytest.param(
            b"",
            invalid("Invalid JSON body: Input data was truncated", None, "invalid_json"),
            id="empty",
        ),
        pytest.param(
            b'[{"model": "test-model"}]',
            invalid("The request body must be a JSON object", None, "invalid_json"),
            id="array",
        ),
        pytest.param(
            b'"a string"',
            invalid("The request body must be a JSON object", None, "invalid_json"),
            id="string",
        ),
        pytest.param(
            b"\xff\xfe{}",
            invalid(
                "Invalid JSON body: JSON is malformed: invalid character (byte 0)",
                None,
                "invalid_json",
            ),
            id="not-utf8",
        ),
    ],
)
async def test_an_unreadable_body_is_a_json_400(
    shared: Frontend, path: str, raw: bytes, expected: dict[str, Any]
) -> None:
    endpoint = "chat_completions" if path == CHAT else "completions"
    with counted_once(
        shared, model="unknown_model", endpoint=endpoint, status="error", error_type="validation"
    ):
        response = await request(
            shared, "POST", path, content=raw, headers={"content-type": "application/json"}
        )
    assert_json_error(response, 400, expected)
    await assert_nothing_changed(shared)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/jsonx"]
)
async def test_a_wrong_content_type_is_a_json_415(shared: Frontend, content_type: str) -> None:
    with counted_once(shared, model="unknown_model", status="error", error_type="validation"):
        response = await request(
            shared,
            "POST",
            CHAT,
            content=json.dumps(chat_body()).encode(),
            headers={"content-type": content_type},
        )
    assert_json_error(
        response,
        415,
        error_body(
            f"Content-Type must be application/json, got {content_type!r}",
            None,
            "unsupported_media_type",
        ),
    )
    await assert_nothing_changed(shared)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
async def test_json_content_types_with_parameters_or_case_are_accepted(
    shared: Frontend, content_type: str
) -> None:
    response = await request(
        shared,
        "POST",
        CHAT,
        content=json.dumps(chat_body()).encode(),
        headers={"content-type": content_type},
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello there"


async def test_a_body_over_the_limit_is_a_json_413_and_the_server_carries_on(
    interface: str,
) -> None:
    config = Config.from_env({"DYN_HTTP_BODY_LIMIT_MB": "1"})
    engine = EchoEngine(SystemClock(), delay_ms=0)
    huge = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * (2 * 1024 * 1024)}]))
    async with (
        running_frontend(engine, config=config, interface=interface) as fe,
        client_for(fe) as client,
    ):
        response = await client.post(
            CHAT, content=huge.encode(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413, response.text
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "request_too_large"
        assert error["param"] is None
        assert "1048576" in error["message"]
        assert fe.value("requests_total", status="error", error_type="validation") == 1
        await assert_nothing_changed(fe)
        # The same client (and, where the server kept it, the same connection) still works.
        ok = await client.post(CHAT, json=chat_body())
        assert ok.status_code == 200


async def test_a_chunked_body_over_the_limit_is_a_json_413(interface: str) -> None:
    config = Config.from_env({"DYN_HTTP_BODY_LIMIT_MB": "1"})
    engine = EchoEngine(SystemClock(), delay_ms=0)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(32):
            yield b" " * 65536  # 2 MiB of JSON whitespace, no Content-Length

    async with running_frontend(engine, config=config, interface=interface) as fe:
        response = await request(
            fe, "POST", CHAT, content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "request_too_large"
        await assert_nothing_changed(fe)


# --- unknown models -----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
async def test_an_unknown_model_is_404_and_creates_no_series(
    shared: Frontend, path: str, stream: bool
) -> None:
    name = f"no-such-model-{path.rsplit('/', 1)[-1]}-{stream}"
    body = chat_body(model=name) if path == CHAT else completion_body(model=name)
    body["stream"] = stream
    with counted_once(
        shared,
        model="unknown_model",
        status="error",
        error_type="not_found",
        request_type="stream" if stream else "unary",
    ):
        response = await request(shared, "POST", path, json=body)
    assert_json_error(
        response,
        404,
        error_body(
            f"The model `{name}` does not exist.", "model", "model_not_found", "not_found_error"
        ),
    )
    await assert_nothing_changed(shared, name)


async def test_a_hostile_model_name_never_reaches_the_metrics(shared: Frontend) -> None:
    name = 'evil"} 1\n# TYPE injected counter\ninjected_total{a="'
    with counted_once(shared, model="unknown_model", error_type="not_found"):
        response = await request(shared, "POST", CHAT, json=chat_body(model=name))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    await assert_nothing_changed(shared, name, "injected")


async def test_an_invalid_body_naming_an_unknown_model_is_labelled_unknown_model(
    shared: Frontend,
) -> None:
    name = "no-such-model-with-bad-temperature"
    with counted_once(shared, model="unknown_model", error_type="validation"):
        response = await request(shared, "POST", CHAT, json=chat_body(model=name, temperature=5))
    assert response.status_code == 400
    await assert_nothing_changed(shared, name)


# --- engine admission errors ---------------------------------------------------------------------


CHAT_CONTEXT_ERROR = error_body(
    "This model's maximum context length is 8 tokens. However, you requested 10 tokens (10 in "
    "the messages, 0 in the completion). Please reduce the length of the messages or completion.",
    "messages",
    "context_length_exceeded",
)
COMPLETION_CONTEXT_ERROR = error_body(
    "This model's maximum context length is 8 tokens, however you requested 12 tokens (10 in "
    "your prompt; 2 for the completion). Please reduce your prompt; or completion length.",
    "prompt",
    "context_length_exceeded",
)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_a_prompt_over_the_context_window_is_400_even_when_streaming(
    interface: str, stream: bool
) -> None:
    engine = EchoEngine(SystemClock(), delay_ms=0, context_length=8)
    ten_words = "a b c d e f g h i j"
    async with running_frontend(engine, interface=interface) as fe:
        chat = chat_body(messages=[{"role": "user", "content": ten_words}], stream=stream)
        completion = completion_body(prompt=ten_words, max_tokens=2, stream=stream)
        request_type = "stream" if stream else "unary"
        for path, body, expected in [
            (CHAT, chat, CHAT_CONTEXT_ERROR),
            (COMPLETIONS, completion, COMPLETION_CONTEXT_ERROR),
        ]:
            with counted_once(
                fe,
                model=MODEL,
                status="error",
                error_type="validation",
                request_type=request_type,
            ):
                response = await request(fe, "POST", path, json=body)
            assert_json_error(response, 400, expected)
        await assert_nothing_changed(fe)
        # Within the window it answers.
        ok = await request(
            fe, "POST", COMPLETIONS, json=completion_body(prompt="a b", max_tokens=2)
        )
        assert ok.json()["choices"][0]["text"] == "a b"


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_all_workers_busy_is_503_overloaded_and_counts_a_rejection(
    interface: str, stream: bool
) -> None:
    engine = FakeEngine(admission_error=AllWorkersBusy())
    async with running_frontend(engine, interface=interface) as fe:
        with counted_once(
            fe,
            model=MODEL,
            endpoint="chat_completions",
            request_type="stream" if stream else "unary",
            status="error",
            error_type="overload",
        ):
            response = await request(fe, "POST", CHAT, json=chat_body(stream=stream))
        assert_json_error(
            response,
            503,
            error_body(
                "All workers are busy, please retry later",
                None,
                "all_workers_busy",
                "overloaded_error",
            ),
        )
        assert fe.value("model_rejection_total", model=MODEL, endpoint="chat_completions") == 1
        assert fe.value("disconnected_clients") == 0
        assert fe.value("model_cancellation_total") == 0
        assert len(engine.calls) == 1
        await assert_nothing_changed(fe)


# --- routes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nope"),
        ("POST", "/v1/embeddings-typo"),
        ("GET", "/v1/chat/completions/"),
        ("POST", "/v2/chat/completions"),
    ],
)
async def test_an_unknown_route_is_a_json_404(shared: Frontend, method: str, path: str) -> None:
    total = shared.value("requests_total")
    response = await request(shared, method, path)
    assert_json_error(
        response,
        404,
        error_body(f"No route for {method} {path}", None, "route_not_found", "not_found_error"),
    )
    assert shared.value("requests_total") == total  # no handler was reached
    await assert_nothing_changed(shared)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", CHAT),
        ("PUT", COMPLETIONS),
        ("OPTIONS", CHAT),
        ("DELETE", "/v1/models"),
        ("POST", "/v1/models/test-model"),
        ("POST", "/health"),
        ("POST", "/metrics"),
    ],
)
async def test_a_wrong_method_is_a_json_405(shared: Frontend, method: str, path: str) -> None:
    response = await request(shared, method, path)
    assert_json_error(
        response,
        405,
        error_body(f"Method {method} not allowed on {path}", None, "method_not_allowed"),
    )
    await assert_nothing_changed(shared)


async def test_models_lists_ids_containing_a_slash(interface: str) -> None:
    models = [
        ServedModel("org/model-a", EchoEngine(SystemClock(), delay_ms=0), context_length=4096),
        ServedModel("plain", FakeEngine()),
    ]
    async with running_frontend(models=models, interface=interface) as fe:
        listing = await request(fe, "GET", "/v1/models")
        assert listing.status_code == 200
        assert listing.headers["content-type"] == "application/json"
        body = listing.json()
        assert body["object"] == "list"
        assert [card["id"] for card in body["data"]] == ["org/model-a", "plain"]
        for card in body["data"]:
            assert card["object"] == "model"
            assert isinstance(card["created"], int)
            assert card["owned_by"] == "dynamo-llm"
        assert body["data"][0]["context_window"] == 4096

        for path in ("/v1/models/org/model-a", "/v1/models/org%2Fmodel-a"):
            one = await request(fe, "GET", path)
            assert one.status_code == 200, path
            assert one.json() == body["data"][0]

        missing = await request(fe, "GET", "/v1/models/org/model-b")
        assert_json_error(
            missing,
            404,
            error_body(
                "The model `org/model-b` does not exist.",
                "model",
                "model_not_found",
                "not_found_error",
            ),
        )

        # The slashed name is a model like any other.
        chat = await request(fe, "POST", CHAT, json=chat_body(model="org/model-a"))
        assert chat.status_code == 200
        assert chat.json()["model"] == "org/model-a"
        assert fe.value("requests_total", model="org/model-a", status="success") == 1
        await assert_nothing_changed(fe, "org/model-b")


async def test_health_lists_the_models_and_is_200(shared: Frontend) -> None:
    response = await request(shared, "GET", "/health")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status": "healthy", "models": [{"model": MODEL, "ready": True}]}


async def test_health_is_503_when_no_model_can_take_a_request(interface: str) -> None:
    models = [ServedModel(MODEL, FakeEngine(), is_ready=lambda: False)]
    async with running_frontend(models=models, interface=interface) as fe:
        response = await request(fe, "GET", "/health")
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/json"
        assert response.json() == {
            "status": "unhealthy",
            "models": [{"model": MODEL, "ready": False}],
        }
        assert fe.value("model_ready", model=MODEL) == 0


async def test_live_is_200_while_serving_and_503_while_shutting_down(interface: str) -> None:
    async with running_frontend(FakeEngine(), interface=interface) as fe:
        live = await request(fe, "GET", "/live")
        assert live.status_code == 200
        assert live.json() == {"status": "live", "message": "Service is live"}
        fe.app.shutting_down = True
        draining = await request(fe, "GET", "/live")
        assert draining.status_code == 503
        assert draining.headers["content-type"] == "application/json"
        assert draining.json()["status"] == "shutting_down"


async def test_openapi_describes_every_route(shared: Frontend) -> None:
    response = await request(shared, "GET", "/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    doc = response.json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) >= {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/models/{model}",
        "/health",
        "/live",
        "/metrics",
    }
    assert "post" in doc["paths"]["/v1/chat/completions"]
    assert "get" in doc["paths"]["/v1/models/{model}"]
    docs = await request(shared, "GET", "/docs")
    assert docs.status_code == 200
    assert docs.headers["content-type"].startswith("text/html")


async def test_metrics_is_prometheus_text(shared: Frontend) -> None:
    await request(shared, "POST", CHAT, json=chat_body())
    response = await request(shared, "GET", "/metrics")
    assert response.status_code == 200
    content_type = response.headers["content-type"]
    assert content_type.startswith("text/plain")
    assert "version=" in content_type
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"dynamo_frontend_requests", "dynamo_frontend_inflight_requests"} <= names


# --- X-Request-Id ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(
    "request_id",
    ["my-request-42", "r" * 128, "a.b:c/d_e~!#"],
    ids=["simple", "128-chars", "punctuation"],
)
async def test_a_valid_request_id_is_echoed_and_names_the_response(
    shared: Frontend, request_id: str, stream: bool
) -> None:
    for path, body, prefix in [
        (CHAT, chat_body(stream=stream), "chatcmpl-"),
        (COMPLETIONS, completion_body(stream=stream), "cmpl-"),
    ]:
        response = await request(
            shared, "POST", path, json=body, headers={"x-request-id": request_id}
        )
        assert response.status_code == 200
        assert response.headers["x-request-id"] == request_id
        if stream:
            first = response.text.split("\n\n")[0].removeprefix("data: ")
            assert json.loads(first)["id"] == prefix + request_id
            assert response.text.endswith("data: [DONE]\n\n")
        else:
            assert response.json()["id"] == prefix + request_id


def assert_uuid4(value: str) -> None:
    assert uuid.UUID(value).version == 4
    assert str(uuid.UUID(value)) == value


@pytest.mark.parametrize(
    "request_id",
    ["r" * 129, "has space", "tab\there", "x" * 10_000, "caf\u00e9"],
    ids=["129-chars", "space", "tab", "10k", "non-ascii"],
)
async def test_an_invalid_request_id_is_replaced_by_a_uuid4(
    shared: Frontend, request_id: str
) -> None:
    response = await request(
        shared,
        "POST",
        CHAT,
        json=chat_body(),
        headers={"x-request-id": request_id.encode()},
    )
    assert response.status_code == 200
    minted = response.headers["x-request-id"]
    assert_uuid4(minted)
    assert response.json()["id"] == f"chatcmpl-{minted}"


async def test_without_a_request_id_one_is_minted(shared: Frontend) -> None:
    first = await request(shared, "POST", CHAT, json=chat_body())
    second = await request(shared, "POST", CHAT, json=chat_body())
    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    for minted in ids:
        assert_uuid4(minted)
    assert ids[0] != ids[1]


async def test_error_responses_carry_the_request_id(shared: Frontend) -> None:
    response = await request(
        shared, "POST", CHAT, json=chat_body(model="nope"), headers={"x-request-id": "err-1"}
    )
    assert response.status_code == 404
    assert response.headers["x-request-id"] == "err-1"


# --- hostile headers ------------------------------------------------------------------------------


def raw_chat(extra_header: bytes) -> bytes:
    return raw_post(CHAT, json.dumps(chat_body()).encode(), extra_header, close=True)


def header_of(response: bytes, name: bytes) -> bytes | None:
    head = response.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


async def test_a_10kb_header_value_is_served_or_refused_never_500(shared: Frontend) -> None:
    response = await request(
        shared, "POST", CHAT, json=chat_body(), headers={"x-padding": "a" * 10_240}
    )
    assert response.status_code < 500
    if response.status_code == 200:
        assert response.json()["choices"][0]["message"]["content"] == "Hello there"
    ok = await request(shared, "POST", CHAT, json=chat_body())
    assert ok.status_code == 200
    await assert_nothing_changed(shared)


@pytest.mark.parametrize(
    "header",
    [
        b"X-Odd: a\x01b",
        b"X-Odd: a\x7fb",
        b"X-Odd: a\x00b",
        b"X-Odd: a\rb",
        b"X-Request-Id: a\x01b",
        b"X-Request-Id: a\x7fb",
        b"X-Request-Id: caf\xc3\xa9",
    ],
    ids=["soh", "del", "nul", "bare-cr", "request-id-soh", "request-id-del", "request-id-utf8"],
)
async def test_a_control_character_in_a_header_is_refused_or_ignored_never_500(
    shared: Frontend, header: bytes
) -> None:
    response = await raw_exchange(shared, raw_chat(header))
    status = status_of(response)
    assert 200 <= status < 500, response[:300]
    if status == 200:
        # Accepted: the odd value was not echoed, a fresh id was minted instead.
        minted = header_of(response, b"x-request-id")
        assert minted is not None
        assert_uuid4(minted.decode())
    ok = await request(shared, "POST", CHAT, json=chat_body())
    assert ok.status_code == 200
    await assert_nothing_changed(shared)


# --- server behaviour ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "server",
    [
        "rsgi",
        "asgi",
    ],
)
async def test_responses_on_a_keep_alive_connection_are_not_delayed(server: str) -> None:
    # Nagle's algorithm holds a small write back until the previous one is acknowledged, and the
    # client's delayed ACK makes that 40 ms per response on a keep-alive connection: the server
    # side of every connection must have TCP_NODELAY. Checked on the sockets themselves (the
    # server runs in this process), not by timing the answers.
    async with (
        running_frontend(FakeEngine(), interface=server) as fe,
        client_for(fe) as client,
    ):
        for _ in range(3):
            response = await client.get("/live")
            assert response.status_code == 200
        accepted = accepted_sockets(fe.server.port)
        try:
            assert accepted, "the keep-alive connection is open"
            assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in accepted)
        finally:
            for sock in accepted:
                sock.close()


def accepted_sockets(port: int) -> list[socket.socket]:
    """Duplicates of this process's TCP sockets that accepted a connection on ``port``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = os.dup(int(name))
        except OSError:
            continue  # the listing's own descriptor, closed since
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)  # not a socket
            continue
        try:
            if (
                sock.family in (socket.AF_INET, socket.AF_INET6)
                and sock.type == socket.SOCK_STREAM
                and sock.getsockname()[1] == port
                and sock.getpeername()  # not the listening socket
            ):
                found.append(sock)
                continue
        except OSError:
            pass  # the listening socket has no peer
        sock.close()
    return found
