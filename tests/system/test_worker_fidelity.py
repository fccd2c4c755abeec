"""What reaches a worker: every field the client sent, and an id any engine accepts.

Black-box over real sockets: the routed frontend (``build_routed_app`` on granian, as
``dynamo-llm serve --upstream`` runs it) in front of :mod:`dynamo_llm.testing.recording_worker`
workers, which record the raw body and the headers of every request (a worker not of ours: asked
for a stream, a unary request too); in-process engines behind the worker app; our own
``dynamo-llm worker`` app for the graceful stop and the unary answer asked of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest

from dynamo_llm.config import Config
from dynamo_llm.engines.base import EngineOutput, EngineRequest, aclose_stream
from dynamo_llm.engines.echo import EchoEngine
from dynamo_llm.engines.endpoints import CHAT
from dynamo_llm.fleet import build_routed_app
from dynamo_llm.http.app import App, ServedModel, create_app
from dynamo_llm.runtime import EngineContext, StopReason
from dynamo_llm.runtime.clock import SystemClock
from dynamo_llm.testing import Frontend, serving
from dynamo_llm.testing.recording_worker import Received, Script, recording_worker
from dynamo_llm.worker import build_app

SAFETY_NET = 20.0
MODEL = "rec-model"

# Fields engines take through the OpenAI SDK's ``extra_body`` (vLLM, llama.cpp, SGLang).
SAMPLING_EXTRAS: dict[str, Any] = {
    "cache_prompt": True,
    "repeat_penalty": 1.1,
    "priority": 3,
    "skip_special_tokens": False,
    "include_stop_str_in_output": True,
    "truncate_prompt_tokens": 512,
    "n_probs": 2,
    "mirostat": 0,
}
# Grammar constraints: forwarded too, but they make a request impossible to migrate.
EXTRAS: dict[str, Any] = {
    **SAMPLING_EXTRAS,
    "structured_outputs": {"choice": ["yes", "no"]},
    "guided_json": {"type": "object", "properties": {"a": {"type": "integer"}}},
}


def rich_chat(*, stream: bool, extras: Mapping[str, Any] = EXTRAS) -> dict[str, Any]:
    """A chat body with unknown fields at the top level and keys we do not model nested in a
    message, a content part, a tool and the stream options."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "be brief", "x_note": {"kept": [1, 2.5, None]}},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}},
                ],
                "x_user_meta": "m",
            },
        ],
        "tools": [
            {
                "type": "function",
                "function": {"name": "f", "parameters": {"type": "object"}, "x_strictish": True},
                "x_vendor": 1,
            }
        ],
        "temperature": 0.7,
        "stream": stream,
        **extras,
    }
    if stream:
        body["stream_options"] = {"include_usage": False, "x_option": "o"}
    return body


def as_forwarded(sent: Mapping[str, Any]) -> dict[str, Any]:
    """What a worker not of ours must receive for ``sent``: the same JSON, streamed with usage
    (a unary request too: a real engine keeps generating a unary answer after a hang-up)."""
    options = dict(sent.get("stream_options") or {})
    return {**sent, "stream": True, "stream_options": {**options, "include_usage": True}}


def is_uuid4(value: str) -> bool:
    try:
        return uuid.UUID(value).version == 4 and str(uuid.UUID(value)) == value
    except ValueError:
        return False


def routed(
    *urls: str, env: Mapping[str, str] | None = None
) -> AbstractAsyncContextManager[Frontend]:
    """The routed frontend on 127.0.0.1 in front of ``urls`` (learnt before it serves)."""
    config = Config.from_env(dict(env or {})).replace(upstreams=urls)
    return serving(build_routed_app(config, SystemClock()))


async def post(fe: Frontend, path: str, body: Mapping[str, Any], **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=fe.base_url, timeout=SAFETY_NET) as http:
        return await http.post(path, json=body, headers=headers)


def sse_chunks(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON chunks of a whole SSE body (which must end with [DONE] and hold no error)."""
    text = response.text
    assert text.endswith("data: [DONE]\n\n"), text[-300:]
    assert "event: error" not in text, text[-300:]
    events = [e.removeprefix("data: ") for e in text.strip().split("\n\n")]
    return [json.loads(e) for e in events[:-1]]


class _WatchedEcho(EchoEngine):
    """The echo engine, keeping every request it serves and its context."""

    def __init__(self, delay_ms: float = 20) -> None:
        super().__init__(SystemClock(), delay_ms=delay_ms)
        self.requests: list[EngineRequest] = []
        self.contexts: list[EngineContext] = []
        self.started = asyncio.Event()

    async def generate(
        self, request: EngineRequest, ctx: EngineContext
    ) -> AsyncIterator[EngineOutput]:
        self.requests.append(request)
        self.contexts.append(ctx)
        self.started.set()
        return await super().generate(request, ctx)


def own_worker_app(engine: _WatchedEcho) -> App:
    """Our own worker's app (control routes on) serving ``engine`` as ``MODEL``."""
    return create_app(
        Config.from_env({}), [ServedModel(MODEL, engine)], clock=SystemClock(), control_routes=True
    )


# --- pass-through ----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
async def test_unknown_fields_at_every_level_reach_the_worker_unchanged(stream: bool) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        recording_worker() as worker,
        routed(worker.url) as fe,
    ):
        sent = rich_chat(stream=stream)
        response = await post(fe, "/v1/chat/completions", sent)
    assert not net.expired()
    assert response.status_code == 200, response.text
    [received] = worker.received
    assert received.json == as_forwarded(sent)


async def test_a_completions_request_passes_its_unknown_fields_on_too() -> None:
    sent = {"model": MODEL, "prompt": "once upon", "max_tokens": 3, **EXTRAS}
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        recording_worker() as worker,
        routed(worker.url) as fe,
    ):
        response = await post(fe, "/v1/completions", sent)
    assert not net.expired()
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == "tok0tok1tok2"
    [received] = worker.received
    assert received.json == as_forwarded(sent)


@pytest.mark.parametrize(
    ("env", "whole"),
    [
        ({}, True),
        ({"DYN_MIGRATION_LIMIT": "1"}, False),
        ({"DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS": "30"}, False),
        ({"DYN_HTTP_FIRST_TOKEN_TIMEOUT_SECS": "30"}, False),
    ],
    ids=["nothing-needs-events", "migration", "inactivity-limit", "first-token-limit"],
)
async def test_our_own_worker_is_asked_for_a_unary_answer_while_nothing_needs_its_events(
    env: dict[str, str], whole: bool
) -> None:
    # Our own worker app (echo) behind the routed frontend: it says owned_by dynamo-llm.
    engine = _WatchedEcho(delay_ms=0)
    sent = {"model": MODEL, "prompt": "once upon a time", "max_tokens": 3}
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        serving(own_worker_app(engine)) as worker,
        routed(worker.base_url, env=env) as fe,
    ):
        response = await post(fe, "/v1/completions", sent)
    assert not net.expired()
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == "once upon a"
    [request] = engine.requests
    assert request.raw_body is not None
    received = json.loads(request.raw_body)
    if whole:
        assert received == sent  # as the client sent it: no stream, no stream options
    else:
        assert received["stream"] is True
        assert received["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("extra", "code", "param"),
    [
        ({"temperature": "hot"}, "invalid_type", "temperature"),
        ({"temperature": 5}, "invalid_value", "temperature"),
        ({"messages": []}, "invalid_value", "messages"),
        ({"max_tokens": 0}, "invalid_value", "max_tokens"),
    ],
    ids=["type", "range", "empty-messages", "max-tokens"],
)
async def test_known_fields_stay_strict_beside_unknown_ones(
    extra: dict[str, Any], code: str, param: str
) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        recording_worker() as worker,
        routed(worker.url) as fe,
    ):
        response = await post(fe, "/v1/chat/completions", {**rich_chat(stream=False), **extra})
    assert not net.expired()
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert worker.received == []


async def test_a_router_answers_an_unknown_model_with_404_whatever_unknown_fields_it_holds() -> (
    None
):
    # The router's /openapi.json allows unknown fields; the model is what is wrong here.
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        recording_worker() as worker,
        routed(worker.url) as fe,
    ):
        body = {**rich_chat(stream=False), "model": "no-such-model", "cache_prompt": True}
        response = await post(fe, "/v1/chat/completions", body)
    assert not net.expired()
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"
    assert worker.received == []


@pytest.mark.parametrize("engine", ["echo", "mocker"])
async def test_an_in_process_engine_still_refuses_an_unknown_field_naming_it(engine: str) -> None:
    app = build_app(Config.from_env({"DYN_ENGINE": engine, "DYN_TOKEN_ECHO_DELAY_MS": "0"}))
    body = {"model": engine, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    async with asyncio.timeout(SAFETY_NET) as net, serving(app) as fe:
        refused = await post(fe, "/v1/chat/completions", {**body, "cache_prompt": True})
        served = await post(fe, "/v1/chat/completions", body)
    assert not net.expired()
    assert refused.status_code == 400
    assert refused.json()["error"] == {
        "message": "Validation: Unsupported parameter(s): `cache_prompt`",
        "type": "invalid_request_error",
        "param": "cache_prompt",
        "code": "unsupported_parameter",
    }
    assert served.status_code == 200, served.text


async def test_the_names_an_error_echoes_are_bounded() -> None:
    body: dict[str, Any] = {"model": "echo", "messages": [{"role": "user", "content": "x"}]}
    body.update({f"f{i:05d}": i for i in range(20_000)})
    body["a" * 5000] = 1
    app = build_app(Config.from_env({"DYN_ENGINE": "echo"}))
    async with asyncio.timeout(SAFETY_NET) as net, serving(app) as fe:
        response = await post(fe, "/v1/chat/completions", body)
    assert not net.expired()
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "unsupported_parameter"
    assert len(error["message"]) < 1000
    assert error["message"].endswith("and 19993 more")
    assert error["message"].count("`") == 16  # 8 names listed
    assert error["param"] == "a" * 61 + "..."


# --- upstream ids ----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
async def test_the_worker_gets_a_uuid_and_the_client_keeps_its_own_id(
    stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dynamo_llm.router")
    client_id = "client/id#42"  # no engine that wants a UUID would take this one
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        recording_worker() as worker,
        routed(worker.url) as fe,
    ):
        body = rich_chat(stream=stream)
        response = await post(fe, "/v1/chat/completions", body, **{"X-Request-Id": client_id})
    assert not net.expired()
    assert response.status_code == 200, response.text
    [received] = worker.received
    upstream_id = received.headers["x-request-id"]
    assert is_uuid4(upstream_id)
    assert received.headers["x-client-request-id"] == client_id
    # The client sees its own id: in the header and in every chunk (the relay rewrote the
    # worker's chatcmpl-<uuid>).
    assert response.headers["x-request-id"] == client_id
    chunks = sse_chunks(response) if stream else [response.json()]
    assert {c["id"] for c in chunks} == {f"chatcmpl-{client_id}"}
    # One dispatch line in our log names both ids.
    lines = [r.getMessage() for r in caplog.records if upstream_id in r.getMessage()]
    assert len(lines) == 1 and client_id in lines[0], lines


async def test_each_choice_of_n_gets_its_own_uuid() -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        recording_worker() as worker,
        routed(worker.url) as fe,
    ):
        body = {**rich_chat(stream=True), "n": 2}
        response = await post(fe, "/v1/chat/completions", body, **{"X-Request-Id": "fan"})
    assert not net.expired()
    assert response.status_code == 200, response.text
    assert {c["id"] for c in sse_chunks(response)} == {"chatcmpl-fan"}
    ids = [r.headers["x-request-id"] for r in worker.received]
    assert len(ids) == 2 and len(set(ids)) == 2 and all(map(is_uuid4, ids))
    assert sorted(r.headers["x-client-request-id"] for r in worker.received) == ["fan-0", "fan-1"]
    without_n = as_forwarded({k: v for k, v in body.items() if k != "n"})
    assert [r.json for r in worker.received] == [without_n, without_n]


async def test_a_migrated_request_sends_a_new_uuid_and_every_field_again() -> None:
    # Whichever worker the router picks first cuts the stream after two tokens; the other one
    # takes the replay. Expected: two attempts (and the prompt's count), each its own UUID, one
    # client id; the replay
    # carries every field the client sent, the messages as written, and continues the text.
    script = Script(["cut@2"])
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        recording_worker(script=script, tokens=6) as one,
        recording_worker(script=script, tokens=6) as two,
        routed(one.url, two.url, env={"DYN_MIGRATION_LIMIT": "1"}) as fe,
    ):
        sent = {**rich_chat(stream=True, extras=SAMPLING_EXTRAS), "max_tokens": 6}
        response = await post(fe, "/v1/chat/completions", sent, **{"X-Request-Id": "mig"})
    assert not net.expired()
    assert response.status_code == 200, response.text
    chunks = sse_chunks(response)
    assert {c["id"] for c in chunks} == {"chatcmpl-mig"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "tok0tok1" + "tok0tok1tok2tok3"  # the replay's budget is what was left
    received = [*one.received, *two.received]
    # The first worker cut the stream before its usage, so it never said the prompt's size, and
    # the replay's prompt is not the client's: the request itself, for one token, counts it.
    [count] = [r for r in received if r.json.get("max_tokens") == 1]
    first, replay = sorted([r for r in received if r is not count], key=_is_replay)
    ids = [r.headers["x-request-id"] for r in (first, replay, count)]
    assert all(map(is_uuid4, ids)) and len(set(ids)) == 3
    assert {r.headers["x-client-request-id"] for r in (first, replay, count)} == {"mig"}
    assert count.json == as_forwarded(sent) | {"max_tokens": 1}
    assert first.json == as_forwarded(sent) | {"return_token_ids": True}
    assert replay.json == as_forwarded(sent) | {
        "return_token_ids": True,
        "max_tokens": 4,
        "messages": [*sent["messages"], {"role": "assistant", "content": "tok0tok1"}],
        "continue_final_message": True,
        "add_generation_prompt": False,
    }


def _is_replay(received: Received) -> bool:
    return bool(received.json.get("continue_final_message"))


# --- graceful stop -------------------------------------------------------------------------


async def test_a_graceful_stop_reaches_our_worker_by_the_id_it_knows() -> None:
    # Our own worker app (echo, control routes on) behind the routed frontend's router. The
    # request's id is not a UUID; once it streams, its context is stopped gracefully (as the
    # control route does). Expected: the worker knew the request by a UUID, was told to stop
    # under that id (its context stopped explicitly, not hung up on) and ended the stream.
    engine = _WatchedEcho()
    worker_app = own_worker_app(engine)
    client_id = "not-a-uuid-7"
    words = " ".join(f"w{i}" for i in range(500))
    raw = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": words}], "stream": True}
    ).encode()
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        serving(worker_app) as worker,
        routed(worker.base_url) as fe,
    ):
        router = fe.app.models[MODEL].engine
        request = CHAT.request(
            CHAT.decode(raw), id=client_id, model=MODEL, max_tokens=None, raw_body=raw
        )
        ctx = EngineContext(client_id)
        stream = await router.generate(request, ctx)
        try:
            first = await anext(aiter(stream))
            ctx.stop()
            rest = [out async for out in stream]
        finally:
            await aclose_stream(stream)
    assert not net.expired()
    assert first.num_tokens == 1
    assert sum(out.num_tokens for out in rest) < 499  # it stopped early, without an error
    [worker_ctx] = engine.contexts
    assert is_uuid4(worker_ctx.id) and worker_ctx.id != client_id
    assert worker_ctx.reason is StopReason.EXPLICIT
    assert not worker_ctx.is_killed
