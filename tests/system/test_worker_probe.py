"""The probe of a quarantined worker proves generation (SPEC §8.2), against fake workers on sockets.

``WorkerClient.probe`` asks for a 1-token completion and falls back only where the engine does
not offer a route (404/405/501): chat, then ``/health``, then ``/v1/models``. A probe that gets no
answer, a 5xx or a 200 without a completion fails, and the probes below it are not asked, so a
hung engine behind a live ``/health`` stays out.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from dynamo_llm.testing.health_workers import scripted_worker, worker_client
from dynamo_llm.transport import WorkerClient
from dynamo_llm.transport.probe import CHAT_PROBE, COMPLETIONS_PROBE, HEALTH_PROBE, MODELS_PROBE

SAFETY_NET = 10.0


@pytest.fixture
async def client() -> AsyncIterator[WorkerClient]:
    async with worker_client() as client:
        yield client


async def test_the_probe_is_a_one_token_completion_of_the_workers_model(
    client: WorkerClient,
) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, scripted_worker(model="org/m") as w:
        result = await client.probe(w.url, within=2.0, model="org/m")
    assert not net.expired()
    assert result and result.path == COMPLETIONS_PROBE
    [seen] = w.seen
    assert seen.path == "/v1/completions"
    assert isinstance(seen.body, dict)
    assert seen.body["model"] == "org/m"
    assert seen.body["max_tokens"] == 1
    assert seen.body["stream"] is False
    assert seen.body["prompt"]
    assert uuid.UUID(seen.id), "llama_cpp.server refuses request ids that are not UUIDs"
    assert result.summary.startswith("POST /v1/completions: 200 in ")


async def test_an_engine_without_completions_is_probed_with_a_chat_completion(
    client: WorkerClient,
) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, scripted_worker(model="m", routes={"chat"}) as w:
        result = await client.probe(w.url, within=2.0, model="m")
    assert not net.expired()
    assert result and result.path == CHAT_PROBE
    [seen] = w.seen
    assert isinstance(seen.body, dict)
    assert [m["role"] for m in seen.body["messages"]] == ["user"]
    assert seen.body["max_tokens"] == 1 and seen.body["stream"] is False
    assert "/v1/completions: 404" in result.summary and "(not offered)" in result.summary


async def test_an_engine_without_generation_routes_falls_back_to_health_then_models(
    client: WorkerClient,
) -> None:
    async with asyncio.timeout(SAFETY_NET) as net:
        async with scripted_worker(model="m", routes=()) as w:
            result = await client.probe(w.url, within=2.0, model="m")
            assert result and result.path == HEALTH_PROBE
        async with scripted_worker(model="m", routes=(), health="missing") as w:
            result = await client.probe(w.url, within=2.0, model="m")
            assert result and result.path == MODELS_PROBE
    assert not net.expired()


async def test_an_engine_without_health_passes_on_its_completion(client: WorkerClient) -> None:
    # llama_cpp.server: no /health (404), completions work.
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        scripted_worker(model="m", health="missing") as w,
    ):
        assert await client.probe(w.url, within=2.0, model="m")
        assert await client.probe(w.url, within=2.0, model="m", first=COMPLETIONS_PROBE)
    assert not net.expired()
    assert [s.path for s in w.seen] == ["/v1/completions", "/v1/completions"]


async def test_a_hung_engine_behind_a_live_health_fails_and_its_connection_is_closed(
    client: WorkerClient,
) -> None:
    # vLLM with a hung EngineCore: /health 200, generation never answers.
    async with asyncio.timeout(SAFETY_NET) as net, scripted_worker(model="m", default="hang") as w:
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await client.probe(w.url, within=0.3, model="m")
        waited = loop.time() - started
        seen = await w.wait_for(lambda s: s.ended)
    # The engine never answers, so only the probe's own deadline can end it (were it ignored, the
    # safety net would fire): it gave up as a timeout, and not before the deadline (asyncio may
    # run a timer up to its clock resolution early).
    assert not net.expired()
    assert not result and result.path == COMPLETIONS_PROBE
    assert waited >= 0.3 - time.get_clock_info("monotonic").resolution
    assert [s.path for s in w.seen] == ["/v1/completions"], "/health must not be asked"
    assert seen.disconnected, "the abandoned probe closed its connection"
    assert "no answer after" in result.summary


@pytest.mark.parametrize(
    ("behaviour", "words"),
    [("empty", "but no completion: an empty body"), ("http-500", ": 500 in ")],
)
async def test_a_broken_answer_fails_the_probe_without_falling_back(
    client: WorkerClient, behaviour: str, words: str
) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        scripted_worker(model="m", default=behaviour) as w,
    ):
        result = await client.probe(w.url, within=2.0, model="m")
    assert not net.expired()
    assert not result
    assert [s.path for s in w.seen] == ["/v1/completions"]
    assert words in result.summary, result.summary


async def test_a_connection_closed_unanswered_is_asked_again_once(client: WorkerClient) -> None:
    # A pooled connection the worker closed just as the probe went out on it: asked again on a
    # fresh one. A worker that closes every connection fails.
    async with asyncio.timeout(SAFETY_NET) as net:
        async with scripted_worker(model="m", script=["close"]) as w:
            result = await client.probe(w.url, within=2.0, model="m")
            assert result and result.path == COMPLETIONS_PROBE, result.summary
            assert [s.behaviour for s in w.seen] == ["close", "ok"]
            assert "closed the connection" in result.summary and "asked again" in result.summary
        async with scripted_worker(model="m", default="close") as w:
            result = await client.probe(w.url, within=2.0, model="m")
            assert not result and result.path == COMPLETIONS_PROBE
            assert [s.behaviour for s in w.seen] == ["close", "close"], "no fallback to /health"
    assert not net.expired()


async def test_the_remembered_probe_is_asked_first(client: WorkerClient) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, scripted_worker(model="m") as w:
        result = await client.probe(w.url, within=2.0, model="m", first=CHAT_PROBE)
    assert not net.expired()
    assert result.path == CHAT_PROBE
    assert [s.path for s in w.seen] == ["/v1/chat/completions"]


async def test_an_unreachable_worker_fails_the_probe(client: WorkerClient) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, scripted_worker(model="m") as w:
        url = w.url
    result = await client.probe(url, within=2.0, model="m")
    assert not net.expired()
    assert not result and result.path == COMPLETIONS_PROBE
    assert "refused" in result.summary


async def test_without_a_model_only_health_and_models_can_be_asked(
    client: WorkerClient,
) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, scripted_worker(model="m") as w:
        assert (await client.probe(w.url, within=2.0)).path == HEALTH_PROBE
    assert not net.expired()
    assert [s.path for s in w.seen] == ["/health"]
