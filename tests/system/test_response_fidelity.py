"""What a worker sends reaches the client (issue 9, problems 1, 3, 4 and 8).

The routed frontend on a real socket in front of fake worker processes
(:mod:`dynamo_llm.testing.fidelity_workers`) that use every field real engines send: tool calls
split over several deltas, logprobs, reasoning, keys of their own on the chunk, the choice and
the usage, llama.cpp's ``timings``, several tokens to an event, or no usage at all. Each case
compares what the client gets with what the worker itself says (its own unary answer, asked
directly) through raw JSON where exactness matters and the official ``openai`` client where
that is what users run; and the frontend's ``/metrics`` with what the worker generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx
import openai
import pytest

from dynamo_llm.config import Config
from dynamo_llm.fleet import build_routed_app
from dynamo_llm.http.server import HttpServer
from dynamo_llm.runtime.clock import SystemClock
from dynamo_llm.testing import Frontend
from dynamo_llm.testing.fidelity_workers import (
    ENGINE,
    FINGERPRINT,
    TOOL_ARGUMENTS,
    FidelityWorker,
    spawn_fidelity_worker,
)

MODEL = "fid-model"
SAFETY_NET = 30.0
TOOLS = [
    {"type": "function", "function": {"name": f"fn_{k}", "parameters": {"type": "object"}}}
    for k in range(2)
]
MIGRATION_ON = {"DYN_MIGRATION_LIMIT": "1"}


@contextlib.asynccontextmanager
async def routed(
    *workers: FidelityWorker, env: Mapping[str, str] | None = None
) -> AsyncIterator[Frontend]:
    """The routed frontend on 127.0.0.1 in front of ``workers``, round robin."""
    config = Config.from_env({"DYN_ROUTER_MODE": "round-robin", **(env or {})})
    config = config.replace(upstreams=tuple(w.url for w in workers))
    app = build_routed_app(config, SystemClock())
    server = HttpServer(app, "127.0.0.1", 0)
    await server.start()
    try:
        assert MODEL in app.models  # static discovery asked every worker before the start ended
        yield Frontend(app, server)
    finally:
        await app.shutdown(grace=0, kill_wait=5)
        await server.stop()


@contextlib.asynccontextmanager
async def fronted(
    *, env: Mapping[str, str] | None = None, **options: Any
) -> AsyncIterator[tuple[FidelityWorker, Frontend]]:
    """One fake worker (``options`` as :func:`spawn_fidelity_worker` takes them) behind the
    routed frontend, under the safety net (asserted not to have fired)."""
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        spawn_fidelity_worker(**options) as worker,
        routed(worker, env=env) as fe,
    ):
        yield worker, fe
    assert not net.expired()


@contextlib.asynccontextmanager
async def migrating(**options: Any) -> AsyncIterator[tuple[list[FidelityWorker], Frontend]]:
    """Two fake workers behind the routed frontend with migration on, under the safety net."""
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        spawn_fidelity_worker(**options) as a,
        spawn_fidelity_worker(**options) as b,
        routed(a, b, env=MIGRATION_ON) as fe,
    ):
        yield [a, b], fe
    assert not net.expired()


def survivor(workers: list[FidelityWorker]) -> FidelityWorker:
    """The worker that was not killed."""
    (alive,) = [w for w in workers if w.proc is not None and w.proc.returncode is None]
    return alive


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "plan a trip"}], **extra}


def completion_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "once upon a time", **extra}


RICH_CHAT = {"tools": TOOLS, "logprobs": True, "top_logprobs": 2, "reasoning_effort": "low"}
RICH_COMPLETION = {"logprobs": 2}


def path_of(body: Mapping[str, Any]) -> str:
    return "/v1/chat/completions" if "messages" in body else "/v1/completions"


async def direct(worker: FidelityWorker, body: dict[str, Any]) -> dict[str, Any]:
    """The worker's own unary answer to ``body``."""
    async with httpx.AsyncClient(base_url=worker.url, timeout=SAFETY_NET) as http:
        resp = await http.post(path_of(body), json={**body, "stream": False})
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    return answer


def normalised(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer without what the frontend rightly changes (its id, model name, time)."""
    return {k: v for k, v in answer.items() if k not in ("id", "model", "created")}


async def post(fe: Frontend, body: dict[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=fe.base_url, timeout=SAFETY_NET) as http:
        resp = await http.post(path_of(body), json=body)
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    return answer


async def stream(fe: Frontend, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every chunk of a streamed answer (raw JSON), checked to end with one [DONE]."""
    chunks: list[dict[str, Any]] = []
    done = 0
    async with (
        httpx.AsyncClient(base_url=fe.base_url, timeout=SAFETY_NET) as http,
        http.stream("POST", path_of(body), json={**body, "stream": True}) as resp,
    ):
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            assert not line.startswith("event: error"), line
            if line == "data: [DONE]":
                done += 1
            elif line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
    assert done == 1
    return chunks


def fold(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """What a client accumulates from chunks, per choice: text, tool calls, logprobs, keys."""
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            acc = choices.setdefault(
                choice["index"],
                {"content": "", "reasoning": "", "calls": {}, "logprobs": [], "keys": {}},
            )
            delta = choice.get("delta") or {}
            acc["content"] += delta.get("content") or choice.get("text") or ""
            acc["reasoning"] += delta.get("reasoning_content") or ""
            for call in delta.get("tool_calls") or ():
                mine = acc["calls"].setdefault(call["index"], {"arguments": ""})
                for key in ("id", "type"):
                    if key in call:
                        mine[key] = call[key]
                function = call.get("function") or {}
                if "name" in function:
                    mine["name"] = function["name"]
                mine["arguments"] += function.get("arguments") or ""
            logprobs = choice.get("logprobs") or {}
            acc["logprobs"] += logprobs.get("content") or logprobs.get("tokens") or []
            acc["keys"].update(
                (k, v) for k, v in choice.items() if k.startswith("x_") or k == "stop_reason"
            )
    return choices


def expected_calls() -> dict[int, dict[str, Any]]:
    arguments = "".join(TOOL_ARGUMENTS)
    return {
        k: {"id": f"call_{k}", "type": "function", "name": f"fn_{k}", "arguments": arguments}
        for k in range(2)
    }


# --- problem 1 and 3: unary answers keep every field ---------------------------------------------


@pytest.mark.parametrize("migration", [False, True], ids=["migration-off", "migration-on"])
@pytest.mark.parametrize(
    "body",
    [chat_body(**RICH_CHAT), completion_body(**RICH_COMPLETION)],
    ids=["chat", "completions"],
)
async def test_a_unary_answer_is_the_workers_own_with_every_field(
    body: dict[str, Any], migration: bool
) -> None:
    async with fronted(env=MIGRATION_ON if migration else None, per_event=3) as (worker, fe):
        ours = await post(fe, body)
        theirs = await direct(worker, body)
    assert normalised(ours) == normalised(theirs)
    assert ours["id"].startswith("chatcmpl-" if "messages" in body else "cmpl-")
    assert ours["model"] == MODEL


async def test_the_openai_client_reads_tool_calls_logprobs_and_extras_from_a_unary_answer() -> None:
    async with fronted(per_event=2) as (_worker, fe):
        client = openai.AsyncOpenAI(base_url=fe.base_url + "/v1", api_key="unused")
        body = chat_body(**RICH_CHAT)
        answer = await client.chat.completions.create(
            model=MODEL,
            messages=body["messages"],
            tools=TOOLS,  # type: ignore[arg-type]
            logprobs=True,
            top_logprobs=2,
            extra_body={"reasoning_effort": "low"},
        )
        await client.close()
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and [c.id for c in calls] == ["call_0", "call_1"]
    assert [c.function.name for c in calls] == ["fn_0", "fn_1"]  # type: ignore[union-attr]
    assert {c.function.arguments for c in calls} == {"".join(TOOL_ARGUMENTS)}  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "days": 3}  # type: ignore[union-attr]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert len(choice.logprobs.content) == 12
    assert answer.system_fingerprint == FINGERPRINT
    extra = answer.model_extra or {}
    assert extra["timings"] == {"prompt_n": 2 + 3, "predicted_n": 2 + 12 + 8}
    assert extra["x_engine"] == ENGINE
    assert (choice.model_extra or {})["stop_reason"] == 7
    assert answer.usage is not None
    assert answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens == 2
    assert answer.usage.completion_tokens_details is not None
    assert answer.usage.completion_tokens_details.reasoning_tokens == 2
    assert (answer.usage.model_extra or {})["x_usage"] == "fidelity"


# --- problem 1 and 3: streams keep every field, on every path -------------------------------------


@pytest.mark.parametrize("migration", [False, True], ids=["migration-off", "migration-on"])
async def test_a_streamed_chat_keeps_every_field_and_the_usage_chunk_the_workers_keys(
    migration: bool,
) -> None:
    body = chat_body(**RICH_CHAT, stream_options={"include_usage": True})
    async with fronted(env=MIGRATION_ON if migration else None, per_event=3) as (worker, fe):
        chunks = await stream(fe, body)
        theirs = await direct(worker, body)
    (choice,) = fold(chunks).values()
    message = theirs["choices"][0]["message"]
    assert choice["content"] == message["content"]
    assert choice["reasoning"] == message["reasoning_content"]
    assert choice["calls"] == expected_calls()
    assert choice["logprobs"] == theirs["choices"][0]["logprobs"]["content"]
    assert choice["keys"] == {"x_choice": "end", "stop_reason": 7}
    assert all(c["system_fingerprint"] == FINGERPRINT for c in chunks)
    assert all(c["x_engine"] == ENGINE for c in chunks)
    roles = [c for chunk in chunks for c in chunk["choices"] if "role" in c.get("delta", {})]
    assert len(roles) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == theirs["usage"]
    assert usage_chunk["timings"] == theirs["timings"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "tool_calls"


async def test_the_openai_client_accumulates_a_streamed_tool_call_through_the_frontend() -> None:
    async with fronted(per_event=2) as (_worker, fe):
        client = openai.AsyncOpenAI(base_url=fe.base_url + "/v1", api_key="unused")
        async with client.chat.completions.stream(
            model=MODEL,
            messages=[{"role": "user", "content": "plan a trip"}],
            tools=TOOLS,  # type: ignore[arg-type]
            logprobs=True,
            stream_options={"include_usage": True},
        ) as events:
            completion = await events.get_final_completion()
        await client.close()
    calls = completion.choices[0].message.tool_calls
    assert calls is not None
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        (f"call_{k}", f"fn_{k}", "".join(TOOL_ARGUMENTS)) for k in range(2)
    ]
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None and len(logprobs.content) == 12
    assert completion.usage is not None and completion.usage.completion_tokens == 12 + 8


async def test_without_include_usage_the_usage_chunks_keys_ride_on_the_finishing_chunk() -> None:
    # llama.cpp puts `timings` on the last chunk: the finishing one when no usage is asked for.
    async with fronted() as (_worker, fe):
        relayed = await stream(fe, chat_body())
        rendered = await stream(fe, chat_body(n=2))  # a fan-out: rendered by the frontend
    for chunks in (relayed, rendered):
        assert all(chunk["choices"] for chunk in chunks), "no usage chunk was asked for"
        finishing = [c for c in chunks if c["choices"][0]["finish_reason"] is not None]
        assert finishing and all(c["timings"]["predicted_n"] == 12 for c in finishing)
        assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize("kind", ["chat", "completions"])
async def test_a_fan_out_keeps_every_field_of_each_choice_and_counts_the_prompt_once(
    kind: str,
) -> None:
    extra: dict[str, Any] = dict(RICH_CHAT if kind == "chat" else RICH_COMPLETION, n=2)
    body = chat_body(**extra) if kind == "chat" else completion_body(**extra)
    async with fronted(per_event=3) as (worker, fe):
        unary = await post(fe, body)
        chunks = await stream(fe, {**body, "stream_options": {"include_usage": True}})
        one = await direct(worker, {**body, "n": None})
    assert [c["index"] for c in unary["choices"]] == [0, 1]
    for choice in unary["choices"]:
        assert {**choice, "index": 0} == one["choices"][0]
    folded = fold(chunks)
    assert sorted(folded) == [0, 1]
    field = "content" if kind == "chat" else "tokens"
    for choice in folded.values():
        assert len(choice["logprobs"]) == len(one["choices"][0]["logprobs"][field])
        if kind == "chat":
            assert choice["calls"] == expected_calls()
    usage = one["usage"]
    for total in (unary["usage"], chunks[-1]["usage"]):
        assert total["prompt_tokens"] == usage["prompt_tokens"]
        assert total["completion_tokens"] == 2 * usage["completion_tokens"]
        assert total["prompt_tokens_details"] == usage["prompt_tokens_details"]
        assert total["completion_tokens_details"] == {
            "reasoning_tokens": 2 * usage["completion_tokens_details"]["reasoning_tokens"]
        }


# --- problem 4: usage is the engine's own, or none ------------------------------------------------


async def test_a_worker_that_reports_no_usage_gets_none_reported_not_zeros() -> None:
    async with fronted(usage=False, token_ids=False) as (_worker, fe):
        unary = await post(fe, chat_body())
        chunks = await stream(fe, chat_body(stream_options={"include_usage": True}))
        client = openai.AsyncOpenAI(base_url=fe.base_url + "/v1", api_key="unused")
        sdk = await client.completions.create(model=MODEL, prompt="hello there")
        sdk_chunks = [
            c
            async for c in await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        ]
        await client.close()
    assert "usage" not in unary
    assert all("usage" not in chunk for chunk in chunks), "no usage chunk, not a chunk of zeros"
    assert all(chunk["choices"] for chunk in chunks)
    assert sdk.usage is None and sdk.choices[0].text == "".join(f"t{i} " for i in range(12))
    assert all(c.usage is None for c in sdk_chunks)


async def test_without_a_usage_chunk_the_counts_come_from_the_token_ids_the_worker_reported() -> (
    None
):
    async with fronted(usage=False, per_event=4) as (_worker, fe):
        unary = await post(fe, completion_body(return_token_ids=True))
    assert unary["usage"] == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16}


# --- migration: every field, and the request's own usage ------------------------------------------


class Seen:
    """What a client saw of one stream: its chunks, its error frames, its [DONE]s."""

    def __init__(self) -> None:
        self.chunks: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.done = 0


async def kill_mid_stream(
    fe: Frontend,
    workers: list[FidelityWorker],
    body: dict[str, Any],
    when: Callable[[list[dict[str, Any]]], bool],
) -> Seen:
    """Stream ``body``; once ``when(chunks so far)``, SIGKILL the worker holding it."""
    seen = Seen()
    event = None
    killed = False
    async with (
        httpx.AsyncClient(base_url=fe.base_url, timeout=SAFETY_NET) as http,
        http.stream("POST", path_of(body), json={**body, "stream": True}) as resp,
    ):
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line == "data: [DONE]":
                seen.done += 1
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "error":
                    seen.errors.append(data["error"])
                else:
                    seen.chunks.append(data)
                event = None
            if not killed and when(seen.chunks):
                await (await holding(workers)).kill()  # SIGKILL: no goodbye on the wire
                killed = True
    assert killed
    return seen


async def first_events_then_kill(
    fe: Frontend, workers: list[FidelityWorker], body: dict[str, Any], after: int
) -> list[dict[str, Any]]:
    """Stream ``body``; once ``after`` content chunks came, SIGKILL the worker holding it; the
    client must not notice."""

    def enough(chunks: list[dict[str, Any]]) -> bool:
        return sum(1 for c in chunks if c["choices"] and fold([c])[0]["content"]) >= after

    seen = await kill_mid_stream(fe, workers, body, enough)
    assert seen.errors == [] and seen.done == 1
    return seen.chunks


async def streamed_requests(worker: FidelityWorker) -> list[dict[str, Any]]:
    """What ``worker`` was asked to stream (the tests' own direct questions are unary)."""
    async with httpx.AsyncClient(base_url=worker.url, timeout=SAFETY_NET) as http:
        seen = (await http.get("/_record")).json()["requests"]
    return [r for r in seen if r["body"].get("stream")]


async def holding(workers: list[FidelityWorker]) -> FidelityWorker:
    """The worker holding the request (the others get nothing before the migration)."""
    busy = [w for w in workers if await streamed_requests(w)]
    assert len(busy) == 1, busy
    return busy[0]


@pytest.mark.parametrize("kind", ["chat", "completions"])
async def test_a_token_exact_migration_keeps_logprobs_and_reports_the_original_prompt(
    kind: str,
) -> None:
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}}
    if kind == "chat":
        body = chat_body(logprobs=True, top_logprobs=2, **extra)
    else:
        body = completion_body(logprobs=2, **extra)
    async with migrating(hold_after=2, per_event=2) as (workers, fe):
        chunks = await first_events_then_kill(fe, workers, body, after=2)
        replays = await streamed_requests(survivor(workers))
        theirs = await direct(survivor(workers), body)
        assert fe.value("model_migration_total", migration_type="ongoing_request") == 1
    # The replay was token-exact: ids on /v1/completions, whose chunks came back in our shape.
    assert [r["path"] for r in replays] == ["/v1/completions"]
    assert replays[0]["body"]["prompt"][-4:] == [1000, 1001, 1002, 1003]
    assert {c["object"] for c in chunks} == {
        "chat.completion.chunk" if kind == "chat" else "text_completion"
    }
    (choice,) = fold(chunks).values()
    mine = theirs["choices"][0]
    assert choice["content"] == (mine["message"]["content"] if kind == "chat" else mine["text"])
    if kind == "chat":
        assert choice["logprobs"] == mine["logprobs"]["content"]
    else:
        assert choice["logprobs"] == mine["logprobs"]["tokens"]
        logprobs = [ch["logprobs"] for c in chunks for ch in c["choices"] if ch["logprobs"]]
        offsets = [o for entry in logprobs for o in entry["text_offset"]]
        assert offsets == mine["logprobs"]["text_offset"], "offsets count from the answer's start"
    assert all("token_ids" not in ch for c in chunks for ch in c["choices"]), "not asked for"
    usage = chunks[-1]["usage"]
    # The original prompt (known from the first attempt's ids), every token, and no cached
    # count: only the first attempt's engine could say it, and it died first.
    assert usage == {
        "prompt_tokens": theirs["usage"]["prompt_tokens"],
        "completion_tokens": 12,
        "total_tokens": theirs["usage"]["prompt_tokens"] + 12,
    }


async def test_a_text_migration_counts_the_original_prompt_with_a_one_token_request() -> None:
    body = chat_body(stream_options={"include_usage": True})
    async with migrating(hold_after=3, token_ids=False) as (workers, fe):
        chunks = await first_events_then_kill(fe, workers, body, after=3)
        asked = await streamed_requests(survivor(workers))
        theirs = await direct(survivor(workers), body)
    (choice,) = fold(chunks).values()
    assert choice["content"] == "".join(f"t{i} " for i in range(12))
    # The first worker died before its usage, and the replay's prompt holds the continued
    # text: its count is not the client's prompt. The request itself, for one token, says it.
    replay, count = asked
    assert replay["body"]["messages"][-1]["role"] == "assistant"
    assert count["body"]["messages"] == body["messages"]
    assert count["body"]["max_tokens"] == 1
    prompt = theirs["usage"]["prompt_tokens"]
    assert chunks[-1]["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 12,
        "total_tokens": prompt + 12,
    }


async def test_a_migrated_stream_that_asked_for_token_ids_gets_the_workers_bytes_then_ours() -> (
    None
):
    body = chat_body(return_token_ids=True, logprobs=True, stream_options={"include_usage": True})
    async with migrating(hold_after=2, per_event=2) as (workers, fe):
        chunks = await first_events_then_kill(fe, workers, body, after=2)
        theirs = await direct(survivor(workers), body)
    choices = [ch for c in chunks for ch in c["choices"]]
    assert [i for ch in choices for i in ch.get("token_ids") or ()] == list(range(1000, 1012))
    # The fake's prompt ids (the template's two and the message's three words), from the first
    # attempt's own first chunk: never the replay's.
    assert [c["prompt_token_ids"] for c in chunks if "prompt_token_ids" in c] == [[1, 2, 3, 4, 5]]
    assert sum("role" in (ch.get("delta") or {}) for ch in choices) == 1
    (choice,) = fold(chunks).values()
    assert choice["content"] == theirs["choices"][0]["message"]["content"]
    assert choice["logprobs"] == theirs["choices"][0]["logprobs"]["content"]
    assert chunks[-1]["usage"]["prompt_tokens"] == theirs["usage"]["prompt_tokens"]
    assert chunks[-1]["usage"]["completion_tokens"] == 12


async def test_a_chat_with_tools_migrates_as_chat_text_until_a_tool_call_begins() -> None:
    body = chat_body(tools=TOOLS, stream_options={"include_usage": True})
    # Before any tool call: continued as text on the chat endpoint, where the tool parser is.
    async with migrating(hold_after=3) as (workers, fe):
        chunks = await first_events_then_kill(fe, workers, body, after=3)
        replays = await streamed_requests(survivor(workers))
    assert [r["path"] for r in replays] == ["/v1/chat/completions"]
    assert replays[0]["body"]["messages"][-1] == {"role": "assistant", "content": "t0 t1 t2 "}
    assert fold(chunks)[0]["calls"] == expected_calls()

    # Once a call has begun streaming, the worker's parser holds its state: no migration.
    def in_a_call(chunks: list[dict[str, Any]]) -> bool:
        return bool(fold(chunks).get(0, {}).get("calls"))

    async with migrating(hold_after=14) as (workers, fe):
        seen = await kill_mid_stream(fe, workers, body, in_a_call)
        assert fe.value("model_migration_total") == 0
    assert [e["code"] for e in seen.errors] == ["worker_disconnected"]
    assert seen.done == 0


# --- problem 8: metrics count tokens, not events --------------------------------------------------


def itl_count(fe: Frontend) -> float:
    return fe.value("inter_token_latency_seconds_count")


@pytest.mark.parametrize(
    "body",
    [
        chat_body(stream=True),
        chat_body(stream=True, return_token_ids=True),
        chat_body(stream=False),
        completion_body(stream=True, n=2),
    ],
    ids=["relayed", "relayed-with-token-ids", "unary", "fan-out"],
)
async def test_the_metrics_count_the_tokens_the_worker_generated_not_its_events(
    body: dict[str, Any],
) -> None:
    async with fronted(per_event=3) as (worker, fe):
        if body["stream"]:
            await stream(fe, body)
        else:
            await post(fe, body)
        theirs = await direct(worker, {k: v for k, v in body.items() if k != "n"})
        tokens = theirs["usage"]["completion_tokens"] * body.get("n", 1)
        assert fe.value("output_tokens_total") == tokens == 12 * body.get("n", 1)
        assert fe.value("output_sequence_tokens_sum") == tokens
        # Every token but the first is one inter-token latency observation.
        assert itl_count(fe) == tokens - 1
        assert fe.value("input_sequence_tokens_count") == 1
        assert fe.value("input_sequence_tokens_sum") == theirs["usage"]["prompt_tokens"]


@pytest.mark.parametrize("kind", ["chat", "completions"])
@pytest.mark.parametrize(
    ("owner", "ids"),
    [("vllm", False), ("vllm", True), ("fidelity", False)],
    ids=["vllm", "vllm-client-asked-ids", "another-engine"],
)
async def test_a_vllm_workers_packed_tokens_are_counted_as_they_come_not_at_the_end(
    owner: str, ids: bool, kind: str
) -> None:
    # Two events of three tokens each, then the worker holds the stream: what the frontend
    # counted by then is all it will have counted before the usage could correct it. A
    # completion's first event holds tokens (and the prompt's ids), a chat's is the role alone.
    extra = {"return_token_ids": True} if ids else {}
    body = (chat_body if kind == "chat" else completion_body)(stream=True, **extra)
    async with (
        fronted(per_event=3, hold_after=2, owned_by=owner) as (worker, fe),
        httpx.AsyncClient(base_url=fe.base_url, timeout=SAFETY_NET) as http,
        http.stream("POST", path_of(body), json=body) as resp,
    ):
        assert resp.status_code == 200
        chunks: list[dict[str, Any]] = []
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
                if sum(1 for c in chunks if fold([c])[0]["content"]) == 2:
                    break
        (asked,) = await streamed_requests(worker)
        counted, itl = fe.value("output_tokens_total"), itl_count(fe)
    assert fold(chunks)[0]["content"] == "t0 t1 t2 t3 t4 t5 "
    client_ids = [i for c in chunks for ch in c["choices"] for i in ch.get("token_ids") or ()]
    prompt_ids = [c for c in chunks if "prompt_token_ids" in json.dumps(c)]
    if owner == "vllm":
        # Asked for the ids it packs and counted them; the client sees them only if it asked.
        assert asked["body"]["return_token_ids"] is True
        assert (counted, itl) == (6, 5)
        assert client_ids == (list(range(1000, 1006)) if ids else [])
        assert len(prompt_ids) == (1 if ids else 0)
    else:
        # Another engine's request is passed on as the client sent it, and its events
        # counted one token each until its usage says more.
        assert "return_token_ids" not in asked["body"]
        assert (counted, itl) == (2, 1)
