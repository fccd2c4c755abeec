"""A worker that falls silent hands its request to another worker when migration is on (SPEC §9).

Issue 9, problem 9: with ``--migration-limit 1`` a worker quarantined for silence (the router's
first-token or inactivity limit, before or after its first token) now moves its request like a
dropped stream does: the client's text completes from the other worker with one ``[DONE]``, the
silent worker sees its connection closed and is quarantined before the retry is chosen, and
``model_migration_total`` counts ``new_request`` (nothing generated yet) or ``ongoing_request``.
With migration off the client gets the timeout as before. The HTTP layer's safety net (twice the
limit) starts over at each migration, so two silent workers in a row still leave the third to
finish.

The frontend runs in this process in front of scripted fake workers on loopback
(:mod:`dynamo_llm.testing.health_workers`); the router's limits are 1 s.
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from dynamo_llm.fleet import Fleet
from dynamo_llm.testing import Frontend
from dynamo_llm.testing.health_workers import ScriptedWorker, Seen, routed_fleet, scripted_worker

SAFETY_NET = 15.0
MODEL = "m"
LIMITS = {"DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS": "1", "DYN_HTTP_FIRST_TOKEN_TIMEOUT_SECS": "1"}
MIGRATION_ON = {**LIMITS, "DYN_MIGRATION_LIMIT": "1"}
GOOD_TEXT = "tok0tok1tok2tok3tok4"


def payload(kind: str, *, stream: bool) -> dict[str, Any]:
    if kind == "chat":
        messages = [{"role": "user", "content": "say something"}]
        return {"model": MODEL, "messages": messages, "stream": stream}
    return {"model": MODEL, "prompt": "say something", "stream": stream}


async def post(fe: Frontend, body: dict[str, Any]) -> httpx.Response:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    async with httpx.AsyncClient(base_url=fe.base_url, timeout=SAFETY_NET) as http:
        return await http.post(path, json=body)


def text_of(response: httpx.Response, stream: bool) -> str:
    if not stream:
        choice = json.loads(response.content)["choices"][0]
        return str(choice.get("text") or choice["message"]["content"])
    out = []
    for event in response.content.split(b"\n\n"):
        if event.startswith(b"data: {"):
            for c in json.loads(event[6:])["choices"]:
                out.append(c.get("text") or c.get("delta", {}).get("content") or "")
    return "".join(out)


def migrations(fe: Frontend, kind: str | None = None) -> float:
    if kind is None:
        return fe.value("model_migration_total")
    return fe.value("model_migration_total", migration_type=kind)


async def closed(worker: ScriptedWorker) -> Seen:
    """The silent worker's request, once its connection was closed."""
    seen = await worker.wait_for(lambda s: not s.is_probe and s.ended)
    assert seen.disconnected, "the silent worker must learn the request is abandoned"
    return seen


@contextlib.asynccontextmanager
async def pair(
    behaviour: str, env: dict[str, str]
) -> AsyncIterator[tuple[Frontend, Fleet, ScriptedWorker, ScriptedWorker]]:
    """The routed frontend, its fleet, a silent worker (``behaviour``; round-robin takes it
    first) and a good one, under the safety net (asserted not to have fired)."""
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        scripted_worker(model=MODEL, default=behaviour) as silent,
        scripted_worker(model=MODEL) as good,
        routed_fleet({MODEL: [silent.url, good.url]}, env) as (fe, fleet),
    ):
        yield fe, fleet, silent, good
    assert not net.expired()


def quarantined(fleet: Fleet, worker: ScriptedWorker) -> bool:
    registered = fleet.workers.get(worker.url)
    assert registered is not None
    return registered.quarantined


@pytest.mark.parametrize("kind", ["completions", "chat"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
async def test_a_worker_silent_before_its_first_token_hands_the_request_on(
    kind: str, stream: bool
) -> None:
    async with pair("hang", MIGRATION_ON) as (fe, fleet, silent, good):
        response = await post(fe, payload(kind, stream=stream))
        assert response.status_code == 200, response.content
        assert text_of(response, stream) == GOOD_TEXT
        if stream:
            assert response.content.count(b"data: [DONE]") == 1
            assert response.content.endswith(b"data: [DONE]\n\n")
            assert b"event: error" not in response.content
        await closed(silent)
        assert quarantined(fleet, silent) and not quarantined(fleet, good)
        assert migrations(fe, "new_request") == 1 and migrations(fe) == 1
        assert len(good.requests()) == 1
        assert fe.value("requests_total", status="success") == 1
        assert fe.value("requests_total") == 1


@pytest.mark.parametrize("kind", ["completions", "chat"])
async def test_a_worker_silent_after_its_first_token_hands_the_rest_on(kind: str) -> None:
    async with pair("first-hang", MIGRATION_ON) as (fe, fleet, silent, good):
        response = await post(fe, payload(kind, stream=True))
        assert response.status_code == 200, response.content
        # tok0 from the silent worker, then the good worker's whole text (it answers any
        # continuation with tok0..tok4: no token ids, so the replay continues the text).
        assert text_of(response, True) == "tok0" + GOOD_TEXT
        assert response.content.count(b"data: [DONE]") == 1
        assert b"event: error" not in response.content
        await closed(silent)
        assert quarantined(fleet, silent)
        assert migrations(fe, "ongoing_request") == 1 and migrations(fe) == 1
        # The replay continues what the client already has; the silent worker never said the
        # prompt's size, so the original request is sent once more for one token to count it.
        [replay, count] = good.requests()
        body = replay.body
        assert isinstance(body, dict)
        continued = body.get("prompt") or body["messages"][-1]["content"]
        assert str(continued).endswith("tok0")
        assert isinstance(count.body, dict) and count.body["max_tokens"] == 1
        assert "tok0" not in json.dumps(count.body)


async def test_the_http_safety_net_does_not_cut_a_request_the_router_is_moving() -> None:
    # Two silent workers in a row, then a good one, with --migration-limit 2. The HTTP layer's
    # first-token net is 2 s from the request's start; the router gives up on the second silent
    # worker 2 s after the start too (1 s each). Unless the net starts over at each migration,
    # it fires first and the client gets a 504 the router was about to avoid.
    # Round-robin over [a, good, b]: a first; then [good, b] at position 1: b; then good.
    async with asyncio.timeout(SAFETY_NET) as net:
        env = {**LIMITS, "DYN_MIGRATION_LIMIT": "2"}
        async with (
            scripted_worker(model=MODEL, default="hang") as a,
            scripted_worker(model=MODEL, default="hang") as b,
            scripted_worker(model=MODEL) as good,
            routed_fleet({MODEL: [a.url, good.url, b.url]}, env) as (fe, fleet),
        ):
            loop = asyncio.get_running_loop()
            started = loop.time()
            response = await post(fe, payload("completions", stream=True))
            elapsed = loop.time() - started
            assert response.status_code == 200, response.content
            assert text_of(response, True) == GOOD_TEXT
            assert elapsed >= 2.0, "both silent workers had their full second"
            await closed(a)
            await closed(b)
            assert quarantined(fleet, a) and quarantined(fleet, b)
            assert migrations(fe, "new_request") == 2
            assert fe.value("requests_total", status="success") == 1
    assert not net.expired()


@pytest.mark.parametrize("behaviour", ["hang", "first-hang"])
async def test_with_migration_off_the_client_gets_the_timeout(behaviour: str) -> None:
    async with pair(behaviour, LIMITS) as (fe, fleet, silent, good):
        response = await post(fe, payload("completions", stream=True))
        if behaviour == "hang":
            assert response.status_code == 504
            error = json.loads(response.content)["error"]
        else:
            # The first token was sent: the timeout arrives as an error frame.
            assert response.status_code == 200
            frame = response.content.split(b"event: error\ndata: ", 1)[1].split(b"\n\n")[0]
            error = json.loads(frame)["error"]
        assert error["type"] == "timeout_error" and error["code"] == "response_timeout"
        await closed(silent)
        assert quarantined(fleet, silent)
        assert good.requests() == [], "nothing moved"
        assert migrations(fe) == 0
        assert fe.value("requests_total", error_type="response_timeout") == 1
