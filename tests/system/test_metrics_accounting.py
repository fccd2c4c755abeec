"""Request outcome accounting (SPEC §5) and the metric set (SPEC §6), read back as Prometheus
parses them.

One frontend takes a mixed run — successes of every kind, validation errors, unknown models, an
overloaded engine, engine failures — and afterwards every series must add up: each request
counted exactly once under the right labels, the gauges back to 0, the token and latency
histograms fed by exactly the requests that produced tokens, and no model label but the served
name and ``unknown_model``.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_llm.engines.base import EngineOutput, EngineRequest
from dynamo_llm.engines.echo import EchoEngine, prompt_tokens_of
from dynamo_llm.errors import AllWorkersBusy, EngineError
from dynamo_llm.runtime.clock import SystemClock
from dynamo_llm.runtime.context import EngineContext
from dynamo_llm.testing import FakeEngine, Frontend, running_frontend

MODEL = "test-model"
UNKNOWN = "unknown_model"
FAKE_PROMPT_TOKENS = 3  # FakeEngine's default prompt_tokens

_TLS = ssl.create_default_context()


class ScriptedEngine:
    """Echoes, except that a prompt starting with ``overload`` is refused at admission and one
    starting with ``explode`` fails after two tokens ("Hello", ",")."""

    def __init__(self) -> None:
        self.echo = EchoEngine(SystemClock(), delay_ms=0)
        self.overloaded = FakeEngine(admission_error=AllWorkersBusy())
        self.exploding = FakeEngine(fail_after=2, error=EngineError("backend exploded"))

    async def generate(
        self, request: EngineRequest, ctx: EngineContext
    ) -> AsyncIterator[EngineOutput]:
        tokens, _ = prompt_tokens_of(request)
        text = "".join(tokens).lstrip()
        if text.startswith("overload"):
            return await self.overloaded.generate(request, ctx)
        if text.startswith("explode"):
            return await self.exploding.generate(request, ctx)
        return await self.echo.generate(request, ctx)

    async def aclose(self) -> None:
        return None


@dataclass(frozen=True)
class Sent:
    """One request of the run and what it must leave in the metrics."""

    endpoint: str  # chat_completions | completions
    body: dict[str, Any] | bytes
    status: int
    model: str  # the expected `model` label
    error_type: str = ""
    stream: bool = False
    admitted: bool = False
    tokens: int = 0  # tokens the engine produced
    prompt_tokens: int = 0  # prompt tokens the engine reported with its first item

    @property
    def labels(self) -> tuple[str, str, str, str, str]:
        return (
            self.model,
            self.endpoint,
            "stream" if self.stream else "unary",
            "error" if self.error_type else "success",
            self.error_type,
        )


def chat(text: str, model: str = MODEL, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **fields}


def completion(text: str, model: str = MODEL, **fields: Any) -> dict[str, Any]:
    return {"model": model, "prompt": text, "max_tokens": 64, **fields}


def success(endpoint: str, text: str, *, stream: bool) -> Sent:
    make = chat if endpoint == "chat_completions" else completion
    words = len(text.split())
    return Sent(
        endpoint,
        make(text, stream=stream),
        200,
        MODEL,
        stream=stream,
        admitted=True,
        tokens=words,
        prompt_tokens=words,
    )


RUN: list[Sent] = [
    # Successes: both endpoints, unary and streaming.
    success("chat_completions", "one two three", stream=False),
    success("chat_completions", "four five", stream=False),
    success("chat_completions", "six seven eight nine", stream=True),
    success("chat_completions", "ten", stream=True),
    success("completions", "a b c d e", stream=False),
    success("completions", "f g", stream=True),
    success("completions", "h i j", stream=True),
    # Validation errors: labelled with the model when it is served, else unknown_model.
    Sent("chat_completions", chat("x", temperature=5), 400, MODEL, "validation"),
    Sent("completions", completion(""), 400, MODEL, "validation"),
    Sent("chat_completions", b'{"model": "test-model", ', 400, UNKNOWN, "validation"),
    Sent("chat_completions", chat("x", model="ghost-invalid", top_p=3), 400, UNKNOWN, "validation"),
    Sent("completions", completion("x", bogus_field=1), 400, MODEL, "validation"),
    Sent("chat_completions", chat("x", functions=[{"name": "f"}]), 501, MODEL, "not_implemented"),
    # Unknown models.
    Sent("chat_completions", chat("x", model="ghost-1"), 404, UNKNOWN, "not_found"),
    Sent(
        "completions",
        completion("x", model="ghost-2", stream=True),
        404,
        UNKNOWN,
        "not_found",
        stream=True,
    ),
    # The engine refuses at admission: the request was admitted by the frontend first.
    Sent("chat_completions", chat("overload"), 503, MODEL, "overload", admitted=True),
    Sent(
        "completions",
        completion("overload", stream=True),
        503,
        MODEL,
        "overload",
        stream=True,
        admitted=True,
    ),
    # The engine fails after two tokens: mid-stream (an error frame) and unary (a 500).
    Sent(
        "chat_completions",
        chat("explode", stream=True),
        200,
        MODEL,
        "internal",
        stream=True,
        admitted=True,
        tokens=2,
        prompt_tokens=FAKE_PROMPT_TOKENS,
    ),
    Sent(
        "chat_completions",
        chat("explode"),
        500,
        MODEL,
        "internal",
        admitted=True,
        tokens=2,
        prompt_tokens=FAKE_PROMPT_TOKENS,
    ),
]

BOGUS_NAMES = ["ghost-invalid", "ghost-1", "ghost-2", "bogus_field"]

# SPEC §6: 0, then count-1 log-spaced points from min to max, 2 significant figures.
# fmt: off
BUCKETS: dict[str, list[float]] = {
    "request_duration_seconds": [0, 2, 4, 8, 16, 32, 64, 130, 260, 510],
    "input_sequence_tokens": [0, 100, 210, 430, 870, 1800, 3600, 7400, 15000, 31000, 63000, 130000],
    "output_sequence_tokens": [0, 100, 210, 430, 880, 1800, 3700, 7600, 16000, 32000],
    "time_to_first_token_seconds": [
        0, .0022, .0047, .01, .022, .047, .1, .22, .47, 1, 2.2, 4.7, 10, 22, 48, 100, 220, 480
    ],
    "inter_token_latency_seconds": [
        0, .0019, .0035, .0067, .013, .024, .045, .084, .16, .3, .56, 1.1, 2
    ],
}
# fmt: on


async def send(fe: Frontend, sent: Sent) -> None:
    path = "/v1/chat/completions" if sent.endpoint == "chat_completions" else "/v1/completions"
    raw = sent.body if isinstance(sent.body, bytes) else json.dumps(sent.body).encode()
    headers = {"content-type": "application/json"}
    # A fresh connection per request: one request's outcome cannot leak into the next.
    async with (
        httpx.AsyncClient(base_url=fe.base_url, timeout=5, verify=_TLS) as client,
        client.stream("POST", path, content=raw, headers=headers) as response,
    ):
        assert response.status_code == sent.status, await response.aread()
        if sent.status != 200 or not sent.stream:
            await response.aread()
            return
        text = ""
        async for chunk in response.aiter_text():
            text += chunk
            if "event: error" in text and text.endswith("\n\n"):
                break  # the error frame is the last thing the server writes
        if sent.error_type:
            assert "event: error" in text
            assert "[DONE]" not in text
        else:
            assert text.endswith("data: [DONE]\n\n")


async def wait_idle(fe: Frontend) -> None:
    """Wait until every admitted request has recorded its outcome (the client can see the end
    of a response a moment before the handler's ``finally`` runs)."""
    async with asyncio.timeout(5):
        await fe.app.wait_until_idle()


@pytest.mark.parametrize("interface", ["rsgi", "asgi"])
async def test_a_mixed_run_is_accounted_exactly(interface: str) -> None:
    async with running_frontend(ScriptedEngine(), interface=interface) as fe:
        async with asyncio.timeout(10):
            for sent in RUN:
                await send(fe, sent)
            await wait_idle(fe)
        prefix = fe.metrics.prefix

        # Every request counted once, under exactly the labels it earned.
        counted = {
            (
                labels["model"],
                labels["endpoint"],
                labels["request_type"],
                labels["status"],
                labels["error_type"],
            ): value
            for labels, value in fe.samples(f"{prefix}_requests_total")
        }
        expected = Counter(sent.labels for sent in RUN)
        assert counted == dict(expected)
        assert fe.value("requests_total") == len(RUN)

        # Nothing in flight, nothing queued.
        for gauge in ("inflight_requests", "queued_requests"):
            series = fe.samples(f"{prefix}_{gauge}")
            assert series, gauge
            assert all(value == 0 for _, value in series), (gauge, series)

        # Only the served model and the fixed label; none of the names the client made up.
        models = {
            sample.labels["model"]
            for family in text_string_to_metric_families(fe.metrics_text())
            for sample in family.samples
            if "model" in sample.labels
        }
        assert models == {MODEL, UNKNOWN}
        text = fe.metrics_text()
        for name in BOGUS_NAMES:
            assert name not in text

        # Admission, rejection, and no disconnects.
        admitted = [sent for sent in RUN if sent.admitted]
        assert fe.value("requests_started_total") == len(admitted)
        assert fe.value("request_duration_seconds_count", model=MODEL) == len(admitted)
        assert fe.value("request_duration_seconds_count", model=UNKNOWN) == 0
        for endpoint in ("chat_completions", "completions"):
            overloads = sum(1 for s in RUN if s.error_type == "overload" and s.endpoint == endpoint)
            assert fe.value("model_rejection_total", model=MODEL, endpoint=endpoint) == overloads
        assert fe.value("disconnected_clients") == 0
        assert fe.value("model_cancellation_total") == 0

        # Tokens: the successes' plus the two each failing engine produced before it failed.
        producing = [sent for sent in RUN if sent.tokens]
        assert sum(s.tokens for s in producing if not s.error_type) == 20
        total_tokens = sum(sent.tokens for sent in producing)
        assert fe.value("output_tokens_total", model=MODEL) == total_tokens
        assert fe.value("time_to_first_token_seconds_count", model=MODEL) == len(producing)
        assert fe.value("output_sequence_tokens_count", model=MODEL) == len(producing)
        assert fe.value("output_sequence_tokens_sum", model=MODEL) == total_tokens
        assert fe.value("input_sequence_tokens_count", model=MODEL) == len(producing)
        assert fe.value("input_sequence_tokens_sum", model=MODEL) == sum(
            sent.prompt_tokens for sent in producing
        )
        assert fe.value("inter_token_latency_seconds_count", model=MODEL) == sum(
            sent.tokens - 1 for sent in producing
        )
        for name in BUCKETS:
            assert fe.value(f"{name}_count", model=UNKNOWN) == 0, name


async def test_histogram_buckets_are_the_spec_table() -> None:
    async with running_frontend(EchoEngine(SystemClock(), delay_ms=0)) as fe:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "two words"}]}
        async with httpx.AsyncClient(base_url=fe.base_url, timeout=5, verify=_TLS) as client:
            response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200
        await wait_idle(fe)
        prefix = fe.metrics.prefix
        for name, bounds in BUCKETS.items():
            buckets = fe.samples(f"{prefix}_{name}_bucket")
            les = [labels["le"] for labels, _ in buckets if labels["model"] == MODEL]
            assert les[-1] == "+Inf", name
            assert [float(le) for le in les[:-1]] == [float(b) for b in bounds], name
            # Cumulative, ending at the count.
            values = [value for labels, value in buckets if labels["model"] == MODEL]
            assert values == sorted(values), name
            assert values[-1] == fe.value(f"{name}_count", model=MODEL) >= 1, name


SPEC_FAMILIES = {
    "requests",
    "inflight_requests",
    "queued_requests",
    "disconnected_clients",
    "model_cancellation",
    "request_duration_seconds",
    "time_to_first_token_seconds",
    "inter_token_latency_seconds",
    "input_sequence_tokens",
    "output_sequence_tokens",
    "output_tokens",
    "model_migration",
    "model_rejection",
    "worker_inflight_requests",
    "worker_quarantined",
    "requests_started",
    "model_ready",
    "event_loop_delay_seconds",
    "event_loop_stall",
}


async def test_the_metrics_prefix_is_sanitised_and_applied_to_every_metric() -> None:
    environ = {"DYN_METRICS_PREFIX": "nv-llm/http service"}
    engine = EchoEngine(SystemClock(), delay_ms=0)
    async with running_frontend(engine, environ=environ) as fe:
        async with httpx.AsyncClient(base_url=fe.base_url, timeout=5, verify=_TLS) as client:
            ok = await client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "a b", "max_tokens": 4}
            )
            assert ok.status_code == 200
            scrape = await client.get("/metrics")
        await wait_idle(fe)
    assert fe.metrics.prefix == "nv_llm_http_service"
    families = list(text_string_to_metric_families(scrape.text))
    names = {family.name for family in families}
    assert {f"nv_llm_http_service_{name}" for name in SPEC_FAMILIES} <= names
    for family in families:
        assert family.name.startswith("nv_llm_http_service_"), family.name
        for sample in family.samples:
            assert sample.name.startswith("nv_llm_http_service_"), sample.name
    assert "dynamo_frontend" not in scrape.text
    counted = [s for s in fe.samples("nv_llm_http_service_requests_total") if s[1]]
    assert counted == [
        (
            {
                "model": MODEL,
                "endpoint": "completions",
                "request_type": "unary",
                "status": "success",
                "error_type": "",
            },
            1.0,
        )
    ]


async def test_the_default_prefix_is_dynamo_frontend() -> None:
    async with running_frontend(FakeEngine()) as fe:
        names = {family.name for family in text_string_to_metric_families(fe.metrics_text())}
    assert {f"dynamo_frontend_{name}" for name in SPEC_FAMILIES} <= names
