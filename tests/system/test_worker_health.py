"""Quarantine and return of real workers behind the routed frontend (SPEC §8.2, issue 9).

Problem 6: a quarantined worker comes back only when a probe proves its engine generates. One
without ``/health`` (llama_cpp.server) comes back on its 1-token completion; one whose engine hung
behind a live ``/health`` (vLLM) stays out.

Problem 7: a 200 that carries no event stream (llama_cpp.server on a prompt longer than its
context) is a 502 for that request, naming the worker's status and what its body said. The worker
is not quarantined for it, only probed; quarantined if the probe fails. A stream that started and
ended without ``[DONE]`` is still a disconnect that quarantines.

The frontend runs in this process, in front of scripted fake workers on loopback
(:mod:`dynamo_llm.testing.health_workers`); the back-off is the real one (1 s).
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from dynamo_llm.fleet import Fleet
from dynamo_llm.router import Worker
from dynamo_llm.testing import Frontend
from dynamo_llm.testing.health_workers import ScriptedWorker, routed_fleet, scripted_worker

SAFETY_NET = 15.0
MODEL = "m"
# The router's first-token limit (s), so that a hung request ends fast; the probe's deadline.
FAST = {"DYN_HTTP_FIRST_TOKEN_TIMEOUT_SECS": "1", "DYN_WORKER_PROBE_TIMEOUT_SECS": "0.5"}


class Bench:
    """The routed frontend in front of one scripted worker, and a client."""

    def __init__(self, fe: Frontend, fleet: Fleet, worker: ScriptedWorker) -> None:
        self.fe = fe
        self.fleet = fleet
        self.worker = worker
        self.http = httpx.AsyncClient(base_url=fe.base_url, timeout=SAFETY_NET)
        self.changed = asyncio.Event()
        self.availability: list[bool] = []  # the worker's availability at each change
        fleet.workers.on_change(self._on_change)

    def _on_change(self, _models: frozenset[str]) -> None:
        self.availability.append(self.registered.is_available)
        self.changed.set()

    @property
    def registered(self) -> Worker:
        worker = self.fleet.workers.get(self.worker.url)
        assert worker is not None
        return worker

    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self.changed.clear()
            await self.changed.wait()

    async def probe_settled(self) -> None:
        """Wait for the worker's running probe (if any) to decide."""
        name = f"probe {self.registered.id}"
        tasks = [t for t in asyncio.all_tasks() if t.get_name() == name]
        if tasks:
            await asyncio.wait(tasks)

    async def send(self, *, stream: bool = True, prompt: str = "say something") -> httpx.Response:
        body = {"model": MODEL, "prompt": prompt, "stream": stream}
        return await self.http.post("/v1/completions", json=body)

    def requests_total(self) -> float:
        return self.fe.value("requests_total")


@contextlib.asynccontextmanager
async def bench(**worker: Any) -> AsyncIterator[Bench]:
    """A scripted worker (``worker`` are its options) behind the routed frontend, under the
    safety net (asserted not to have fired)."""
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        scripted_worker(model=MODEL, **worker) as w,
        routed_fleet({MODEL: [w.url]}, FAST) as (fe, fleet),
    ):
        b = Bench(fe, fleet, w)
        try:
            yield b
        finally:
            await b.http.aclose()
    assert not net.expired()


def error_of(response: httpx.Response) -> dict[str, Any]:
    return dict(json.loads(response.content)["error"])


def text_of(response: httpx.Response) -> str:
    out = []
    for event in response.content.split(b"\n\n"):
        if event.startswith(b"data: {"):
            out += [c.get("text") or "" for c in json.loads(event[6:])["choices"]]
    return "".join(out)


# --- problem 6: probes that prove generation ----------------------------------------------------


async def test_a_worker_without_health_comes_back_on_its_completion_probe() -> None:
    # llama_cpp.server: no /health (404). Its first request ends early (one token, no [DONE]).
    async with bench(health="missing", script=["drop"]) as b:
        w = b.worker
        dropped = await b.send()
        assert b"worker_disconnected" in dropped.content
        assert b.registered.quarantined
        unavailable = await b.send()
        assert unavailable.status_code == 503
        assert error_of(unavailable)["code"] == "no_workers_available"
        await b.until(lambda: b.registered.is_available)  # after the 1 s back-off
        assert b.availability == [False, True]
        served = await b.send()
        assert served.status_code == 200 and text_of(served) == "tok0tok1tok2tok3tok4"
        assert b.registered.probe_path == "/v1/completions"
        assert [s.path for s in w.requests(probes=True)] == ["/v1/completions"], "never /health"
        # The probe is no client request: three requests sent, three counted.
        assert b.requests_total() == 3
        assert b.fe.value("requests_started_total") == 3


async def test_an_engine_hung_behind_a_live_health_stays_quarantined() -> None:
    # vLLM with a hung EngineCore: /health answers 200, generation never does.
    async with bench(default="hang") as b:
        w = b.worker
        timed_out = await b.send()
        assert timed_out.status_code == 504
        assert error_of(timed_out)["code"] == "response_timeout"
        assert b.registered.quarantined
        # The probe after the 1 s back-off: a 1-token completion, which hangs too.
        probe = await w.wait_for(lambda s: s.is_probe)
        assert probe.path == "/v1/completions"
        await b.probe_settled()
        await w.wait_for(lambda s: s.is_probe and s.ended)
        assert probe.disconnected, "the probe gave up and closed its connection"
        assert b.registered.quarantined
        assert b.registered.failures == 2
        assert b.registered.next_backoff == 4.0, "quarantined again for 2 s, then 4 s"
        assert b.availability == [False], "it never came back"
        assert not [s for s in w.seen if s.path == "/health"], "a live /health proves nothing"
        assert b.requests_total() == 1


# --- problem 7: a 200 without an event stream ----------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
async def test_an_empty_200_is_a_502_for_the_request_and_the_worker_stays(stream: bool) -> None:
    # llama_cpp.server on a prompt longer than its context: an empty 200, for this request only.
    async with bench(script=["empty"]) as b:
        w = b.worker
        failed = await b.send(stream=stream, prompt="a very long prompt " * 50)
        assert failed.status_code == 502
        error = error_of(failed)
        assert error["type"] == "upstream_error"
        assert error["code"] == "no_event_stream"
        assert error["message"] == "The worker answered HTTP 200 with an empty body"
        # Not quarantined on this alone: probed at once, and it passes.
        assert not b.registered.quarantined
        await b.probe_settled()
        assert [s.path for s in w.requests(probes=True)] == ["/v1/completions"]
        assert not b.registered.quarantined
        assert b.availability == []
        served = await b.send(stream=stream)
        assert served.status_code == 200
        assert b.fe.value("requests_total", error_type="internal") == 1
        assert b.requests_total() == 2


async def test_a_request_lost_on_the_connection_an_empty_200_left_is_sent_again() -> None:
    # llama_cpp.server's uvicorn closes the connection whose app raised, after the empty body
    # ended cleanly and the connection went back to our pool: the next request sent on it is
    # lost, which says nothing about the engine. Generation requests have a pool of their own
    # (transport/pool.py), so the probe goes out on a fresh connection, and the next generation
    # request, sent on the lost one, is sent again on a new one.
    async with bench(script=["empty-close"]) as b:
        w = b.worker
        failed = await b.send()
        assert failed.status_code == 502
        await b.probe_settled()
        assert [s.behaviour for s in w.requests(probes=True)] == ["ok"]
        assert not b.registered.quarantined
        assert b.availability == []
        served = await b.send()
        assert served.status_code == 200 and text_of(served) == "tok0tok1tok2tok3tok4"
        assert [s.behaviour for s in w.requests()] == ["empty-close", "lost", "ok"]
        assert not b.registered.quarantined


async def test_a_json_error_in_a_200_is_a_502_with_the_workers_message() -> None:
    async with bench(script=["json-error"]) as b:
        failed = await b.send()
        assert failed.status_code == 502
        error = error_of(failed)
        assert error["type"] == "upstream_error"
        assert error["message"] == (
            "The worker answered HTTP 200 (application/json) with a body that is not an event "
            "stream: the prompt is too long for this engine (scripted)"
        )
        await b.probe_settled()
        assert not b.registered.quarantined


async def test_a_worker_that_only_answers_empty_200s_is_quarantined_by_its_probe() -> None:
    async with bench(default="empty") as b:
        failed = await b.send()
        assert failed.status_code == 502
        await b.probe_settled()
        assert b.registered.quarantined, "the probe got an empty 200 too"
        assert b.availability == [False]
        unavailable = await b.send()
        assert error_of(unavailable)["code"] == "no_workers_available"


async def test_a_stream_that_started_and_ended_without_done_still_quarantines() -> None:
    async with bench(script=["drop"]) as b:
        w = b.worker
        dropped = await b.send()
        assert dropped.status_code == 200  # its first token was sent
        assert b"event: error" in dropped.content
        assert b"worker_disconnected" in dropped.content
        assert b.registered.quarantined
        assert w.requests(probes=True) == [], "no probe before the back-off"
