"""Issue 9's nine problems, each shown against the real engines.

Every case here failed before issue 9's fixes, and passes since (a case for a problem not fixed
yet would be marked ``xfail(strict=True)``, so that the fix turns the run red until the mark is
removed). Each compares with the engine reached directly, so what "right" means is what the
engine itself does.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time
from typing import Any

import httpx
import openai
import pytest

from tests.engines.clients import (
    FIRST_TOKEN_LIMIT,
    HANGUP_TOKENS,
    PROMPT,
    SILENCE_LIMIT,
    WEATHER_TOOL,
    client,
    completion_stream,
    only,
    read_with,
    stream_chat,
    stream_completion,
    unary_chat,
    unary_completion,
)
from tests.engines.engine_side import served_requests, serving_engine
from tests.engines.harness import (
    LLAMA_CPP_PYTHON_CTX,
    MODEL,
    Engine,
    Pair,
    metric_sum,
    paused,
    wait_until,
)

TOKENS = 30
COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")


# vLLM makes a tool call of a random model by guided decoding into the tool's schema. llama.cpp
# has no such fallback: it parses (and grammar-forces) tool calls only in a syntax it finds in
# the model's chat template, and ignores tool_choice "required" with ours.
TOOLS = {"tools": [WEATHER_TOOL], "tool_choice": "required"}


def _call(tool_call: dict[str, Any]) -> tuple[str, Any]:
    return tool_call["function"]["name"], json.loads(tool_call["function"]["arguments"])


# --- 1. tool_calls and logprobs ------------------------------------------------------------------


def test_unary_chat_keeps_the_engines_logprobs(fleet: Pair) -> None:
    fe = fleet.frontend()
    kw = {"logprobs": True, "top_logprobs": 2}
    want = unary_chat(client(fleet.engines[0].url + "/v1"), TOKENS, **kw)
    got = unary_chat(client(fe.base_url), TOKENS, **kw)
    want_lp = want["choices"][0]["logprobs"]["content"]
    assert len(want_lp) == TOKENS  # the engine gives one entry per token
    got_lp = (got["choices"][0]["logprobs"] or {}).get("content") or []
    assert [e["token"] for e in got_lp] == [e["token"] for e in want_lp]


@only("vllm")
def test_unary_chat_keeps_the_engines_tool_calls(fleet: Pair) -> None:
    fe = fleet.frontend()
    want = unary_chat(client(fleet.engines[0].url + "/v1"), 60, **TOOLS)
    got = unary_chat(client(fe.base_url), 60, **TOOLS)
    want_calls = want["choices"][0]["message"]["tool_calls"]
    assert want_calls, want  # the engine made the call
    assert got["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"]
    got_calls = got["choices"][0]["message"]["tool_calls"] or []
    # The same call; the frontend streams from the engine, whose streamed arguments may be
    # spaced differently from its unary ones.
    assert [_call(c) for c in got_calls] == [_call(c) for c in want_calls]


@only("vllm", "llama-server")
def test_streams_keep_logprobs_and_tool_calls_with_migration_on(fleet: Pair) -> None:
    fe = fleet.frontend(migration_limit=1)
    direct = client(fleet.engines[0].url + "/v1")
    via = client(fe.base_url)
    lp = {"logprobs": True, "top_logprobs": 1}
    want, got = stream_chat(direct, TOKENS, **lp), stream_chat(via, TOKENS, **lp)
    assert len(want.logprobs) == TOKENS
    assert [e["token"] for e in got.logprobs] == [e["token"] for e in want.logprobs]
    if fleet.kind != "vllm":
        return
    want, got = stream_chat(direct, 60, **TOOLS), stream_chat(via, 60, **TOOLS)
    assert want.tool_calls
    strip = [(t["name"], t["arguments"]) for t in want.tool_calls.values()]
    assert [(t["name"], t["arguments"]) for t in got.tool_calls.values()] == strip


# --- 2. engine-specific request fields -----------------------------------------------------------

# A field the engine honours and the frontend does not know, and how it changes the answer.
EXTRA_FIELDS = {
    # llama.cpp's repetition penalty (OpenAI's names are frequency/presence_penalty).
    "llama-server": {"repeat_penalty": 1.8, "cache_prompt": False},
    "llama-cpp-python": {"repeat_penalty": 1.8},
    # vLLM keeps only the last N prompt tokens: the usage and the text show it.
    "vllm": {"truncate_prompt_tokens": 4},
}


def test_engine_specific_fields_reach_the_engine(fleet: Pair) -> None:
    fe = fleet.frontend()
    extra = EXTRA_FIELDS[fleet.kind]
    direct = client(fleet.engines[0].url + "/v1")
    plain = unary_completion(direct, TOKENS)
    want = unary_completion(direct, TOKENS, extra_body=extra)
    assert want["choices"][0]["text"] != plain["choices"][0]["text"]  # the field matters
    got = unary_completion(client(fe.base_url), TOKENS, extra_body=extra)
    assert got["choices"][0]["text"] == want["choices"][0]["text"]


# --- 3. response extras --------------------------------------------------------------------------


@only("llama-server", "vllm")
def test_engine_response_extras_reach_the_client(fleet: Pair) -> None:
    fe = fleet.frontend()
    want = unary_completion(client(fleet.engines[0].url + "/v1"), TOKENS)
    got = unary_completion(client(fe.base_url), TOKENS)
    # llama-server: "timings"; vLLM: "stop_reason" (and "token_ids": null) in each choice.
    extras = {"llama-server": ("timings", None), "vllm": (None, "stop_reason")}[fleet.kind]
    top, in_choice = extras
    if top:
        assert top in want
        assert top in got, sorted(got)
    if in_choice:
        assert in_choice in want["choices"][0]
        assert in_choice in got["choices"][0], sorted(got["choices"][0])


# --- 4. usage ------------------------------------------------------------------------------------


@only("llama-cpp-python")
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "unary"])
def test_usage_is_the_engines_or_absent(fleet: Pair, stream: bool) -> None:
    fe = fleet.frontend()
    want = unary_completion(client(fleet.engines[0].url + "/v1"), TOKENS)["usage"]
    assert want["completion_tokens"] == TOKENS
    if stream:
        got = stream_completion(
            client(fe.base_url), TOKENS, stream_options={"include_usage": True}
        ).usage
        # Exact, or absent when the engine gives no count: never made up.
        assert got is None or {k: got[k] for k in COUNTS} == {k: want[k] for k in COUNTS}, got
    else:
        got = unary_completion(client(fe.base_url), TOKENS)["usage"]
        assert got is None or {k: got[k] for k in COUNTS} == {k: want[k] for k in COUNTS}, got


@only("llama-server")
@pytest.mark.destructive
def test_usage_after_a_text_continuation_migration(fleet: Pair) -> None:
    fe = fleet.frontend(migration_limit=1, fresh="usage-migration")
    tokens = HANGUP_TOKENS[fleet.kind]
    want = unary_completion(client(fleet.engines[0].url + "/v1"), tokens)["usage"]
    marks = [e.log_mark() for e in fleet.engines]
    stream = completion_stream(fe.base_url, tokens, stream_options={"include_usage": True})
    usage = read_with(
        stream, lambda: serving_engine(fleet, marks).signal_group(signal.SIGKILL)
    ).usage
    assert usage is not None
    assert usage["prompt_tokens"] == want["prompt_tokens"], usage
    assert usage["completion_tokens"] == tokens, usage
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    assert cached < want["prompt_tokens"], usage


# --- 5. request ids ------------------------------------------------------------------------------


@only("llama-cpp-python")
@pytest.mark.parametrize("n", [1, 2])
def test_any_client_request_id_is_accepted(fleet: Pair, n: int) -> None:
    fe = fleet.frontend()
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "n": n, "temperature": 0.0}
    # What the engine accepts as a request id: a UUID, not the client's own string.
    engine = fleet.engines[0]
    uuid_id = {"X-Request-Id": "0b8e3f9e-8a4b-4a53-9b1e-6f7f2c1d9a10"}
    assert engine.post("/v1/completions", {**body, "n": 1}, headers=uuid_id).status_code == 200
    mine = {"X-Request-Id": "client-id-1"}
    assert engine.post("/v1/completions", {**body, "n": 1}, headers=mine).status_code == 400
    marks = [e.log_mark() for e in fleet.engines]
    r = httpx.post(fe.base_url + "/completions", timeout=60.0, headers=mine, json=body)
    statuses = [served_requests(e, m) for e, m in zip(fleet.engines, marks, strict=True)]
    assert r.status_code == 200, (r.text, "engine statuses", statuses)
    assert r.headers["x-request-id"] == "client-id-1"
    assert len(r.json()["choices"]) == n


# --- 6. probes -----------------------------------------------------------------------------------


def _quarantined(
    fe_metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], url: str
) -> float:
    return metric_sum(fe_metrics, "dynamo_frontend_worker_quarantined", worker=url)


@only("llama-cpp-python")
@pytest.mark.destructive
def test_a_quarantined_engine_without_health_comes_back(fleet: Pair) -> None:
    fe = fleet.frontend(backend_stream_timeout_secs=SILENCE_LIMIT[fleet.kind], fresh="probe-404")
    c = client(fe.base_url)
    victim = fleet.engines[0]
    assert victim.get("/health").status_code == 404  # what the probe meets
    mark = victim.log_mark()
    with paused(victim):
        # Requests until one lands on the paused instance and times out there.
        for _ in range(4):
            with contextlib.suppress(openai.APIError):
                unary_completion(c, 5)
            if _quarantined(fe.metrics(), victim.url):
                break
        assert _quarantined(fe.metrics(), victim.url) == 1
    # Alive again: after its back-off a probe must bring it back.
    try:
        wait_until(lambda: _quarantined(fe.metrics(), victim.url) == 0, 30.0, 0.5, "re-admitted")
    except TimeoutError:
        probes = victim.log_text(mark).count('"GET /health HTTP/1.1" 404')
        raise AssertionError(
            f"still quarantined; the engine answered {probes} probes 404"
        ) from None


@only("vllm")
@pytest.mark.destructive
def test_a_hung_engine_core_is_not_readmitted(fleet: Pair) -> None:
    fe = fleet.frontend(backend_stream_timeout_secs=SILENCE_LIMIT["vllm"], fresh="probe-hung")
    c = client(fe.base_url, timeout=30.0)
    victim = fleet.engines[0]
    failed_probe = f"probe of worker {victim.url} failed"
    mark = fe.process.log_mark()
    with paused(victim, victim.child_pids()):
        assert victim.get("/health", timeout=5.0).status_code == 200  # the HTTP server lives
        # Requests go on until the victim has failed two probes (each after its back-off): no
        # request may meet it again in between.
        failures, sent = 0, 0
        deadline = time.monotonic() + 120.0
        while sent < 8 or fe.log_text(mark).count(failed_probe) < 2:
            assert time.monotonic() < deadline, ("probes seen", fe.log_text(mark)[-3000:])
            try:
                unary_completion(c, 5)
            except openai.APIError:
                failures += 1
            sent += 1
        # One request may meet the hung engine before it is known; after that, none.
        assert failures <= 1, failures
        assert _quarantined(fe.metrics(), victim.url) == 1


# --- 7. a 200 with an empty body -----------------------------------------------------------------


@only("llama-cpp-python")
def test_an_empty_200_is_an_upstream_error_not_a_dead_worker(fleet: Pair) -> None:
    fe = fleet.frontend()
    long_prompt = "weather " * (2 * LLAMA_CPP_PYTHON_CTX)
    body = {"model": MODEL, "prompt": long_prompt, "max_tokens": 5, "stream": True}
    direct = fleet.engines[0].post("/v1/completions", body)
    assert direct.status_code == 200 and direct.content == b""  # what the engine does
    mark = fe.process.log_mark()
    r = httpx.post(fe.base_url + "/completions", json={**body, "stream": False}, timeout=60.0)
    assert r.status_code == 502, r.text
    # The worker is probed at once; what the probe decided is in the frontend's log.
    verdict = wait_until(
        lambda: re.search(r"(passed|failed) its probe.*", fe.log_text(mark)),
        30.0,
        0.1,
        "the probe of the worker decides",
    )
    assert verdict.group(1) == "passed", fe.log_text(mark)
    metrics = fe.metrics()
    assert all(_quarantined(metrics, e.url) == 0 for e in fleet.engines)


# --- 8. metrics of relayed streams ---------------------------------------------------------------


@only("vllm")
@pytest.mark.parametrize("migration_limit", [0, 1], ids=["relayed", "migratable"])
def test_frontend_token_metrics_agree_with_the_engines(fleet: Pair, migration_limit: int) -> None:
    # Each relayed item counts the tokens its token ids list (asked of vLLM whether or not the
    # request may migrate), not its events: the counts below then agree with the engine's from
    # the first item on, and an overcount would show (a counter cannot be corrected down by the
    # usage). The client, which did not ask for the ids, never sees them.
    fe = fleet.frontend(fresh="metrics", migration_limit=migration_limit)
    marks = [e.log_mark() for e in fleet.engines]

    def engine_tokens() -> tuple[float, float]:
        ms = [e.metrics() for e in fleet.engines]
        return (
            sum(metric_sum(m, "vllm:generation_tokens_total") for m in ms),
            sum(metric_sum(m, "vllm:prompt_tokens_total") for m in ms),
        )

    gen0, prompt0 = engine_tokens()
    c = client(fe.base_url)
    requests, tokens = 4, 320
    for _ in range(requests):
        folded = stream_completion(c, tokens)
        assert folded.token_ids == [] and folded.finish_reason == "length"
        assert all("prompt_token_ids" not in ch for d in folded.chunks for ch in d["choices"])
    gen1, prompt1 = engine_tokens()
    assert gen1 - gen0 == requests * tokens
    m = fe.metrics()
    assert metric_sum(m, "dynamo_frontend_output_tokens_total") == gen1 - gen0
    assert metric_sum(m, "dynamo_frontend_inter_token_latency_seconds_count") == requests * (
        tokens - 1
    )
    assert metric_sum(m, "dynamo_frontend_input_sequence_tokens_count") == requests
    assert metric_sum(m, "dynamo_frontend_input_sequence_tokens_sum") == prompt1 - prompt0
    assert sum(len(served_requests(e, mk)) for e, mk in zip(fleet.engines, marks, strict=True))


# --- 9. silence is not migrated ------------------------------------------------------------------


@only("llama-server", "vllm")
@pytest.mark.destructive
def test_a_silent_worker_is_migrated(fleet: Pair) -> None:
    limit = SILENCE_LIMIT[fleet.kind]
    fe = fleet.frontend(
        migration_limit=1,
        backend_stream_timeout_secs=limit,
        first_token_timeout_secs=FIRST_TOKEN_LIMIT[fleet.kind],
        fresh="silent",
    )
    tokens = HANGUP_TOKENS[fleet.kind]
    want = stream_completion(client(fleet.engines[0].url + "/v1"), tokens)
    marks = [e.log_mark() for e in fleet.engines]
    stream = completion_stream(fe.base_url, tokens)
    victims: list[Engine] = []

    def pause() -> None:
        victims.append(serving_engine(fleet, marks))
        victims[0].signal_group(signal.SIGSTOP)

    try:
        read = read_with(stream, pause)
    finally:
        for v in victims:
            v.signal_group(signal.SIGCONT)
    if fleet.kind == "vllm":  # token ids: the migrated answer is the unmigrated one
        assert read.text == want.text
    else:  # text continuation: no repeat, no gap, but the end may differ
        assert want.text.startswith(read.before) and read.text.startswith(read.before)
        assert len(read.text) > len(read.before)
