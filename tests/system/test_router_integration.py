"""The router end to end: a frontend in this process in front of real worker processes.

The frontend is ``build_routed_app`` served by granian on a loopback port, exactly as
``dynamo-llm serve --upstream-file`` runs it; the workers are separate processes: the misbehaving
workers of :mod:`dynamo_llm.testing.bad_workers` (each keeps a record of what it saw, with
``time.monotonic()`` stamps that compare with this process's clock), and once our own
``dynamo-llm worker --engine echo``. Every claim is checked where it happens: a hang-up is timed
by the *worker's* record of its socket closing, routing is counted from the workers' records, and
quarantine is read from the frontend's own worker set and gauges.

Nothing sleeps to synchronise: a test waits for a worker to report a request (``/_record?arrived``
or ``?wait``), for SSE events to reach the client, or for the worker set to announce a change
(``WorkerSet.on_change``). Each test runs under a safety-net timeout and asserts that it did not
fire. Most workers serve their models through an upstream file, which names each model's workers
without asking them (a zombie never answers ``/v1/models``) and fixes their order, so that
round-robin's first choice is known.
"""

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dynamo_llm.testing.bad_workers import BadWorker
from dynamo_llm.testing.process import ServerProcess
from tests.system.fleet_helpers import (
    HOLD,
    LIMITS,
    SAFETY_NET,
    RawClient,
    RoutedFrontend,
    bad_workers,
    chat,
    completion,
    health,
    ok,
    rid,
    routed_frontend,
    send,
)

# A hang-up must reach the worker by itself: the steady worker's next token is HOLD (30 s) away,
# past the safety net, and the zombies never write, so a frontend that noticed the hang-up only
# when it next wrote would leave the worker's record without a disconnect. How fast it really is
# (milliseconds) is measured by bench/bench_hangup.py, not asserted here.
MODES = ["round-robin", "random", "power-of-two", "least-loaded", "kv", "direct"]


async def ids_seen(worker: BadWorker) -> list[str]:
    """The client requests the worker saw. Not the probes of a quarantined worker (1-token
    completions), which carry no client id (``X-Client-Request-Id``): their id is their own."""
    requests = (await worker.record())["requests"]
    return [seen["id"] for seen in requests if seen["id"] != seen["upstream_id"]]


# --- 1. client hang-ups reach the worker ---------------------------------------------------------

# phase: (model, payload maker, stream, SSE events to read before hanging up)
PHASES: dict[str, tuple[str, Callable[..., dict[str, Any]], bool, int]] = {
    # The worker streams; the frontend folds it for a unary client (handler phase).
    "unary": ("steady", chat, False, 0),
    # The worker never sends its response headers (handler phase, waiting for the worker).
    "before-headers": ("silent", chat, True, 0),
    # The worker sent its headers and the role chunk, no token yet (stream phase).
    "before-first-token": ("first-then-silent", chat, True, 1),
    # The client has the role chunk and a token; the worker is between tokens.
    "mid-stream": ("steady", chat, True, 2),
    "completions-mid-stream": ("steady", completion, True, 1),
}


@pytest.mark.parametrize("mode", MODES)
async def test_client_hang_up_closes_the_upstream_connection_at_once(
    mode: str, tmp_path: Path
) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        bad_workers(
            steady={"behaviour": "ok", "tokens": 3, "gap": HOLD},
            silent={"behaviour": "zombie"},
            first={"behaviour": "zombie-after-first"},
        ) as w,
    ):
        by_model = {"steady": w["steady"], "silent": w["silent"], "first-then-silent": w["first"]}
        models = {name: [worker.url] for name, worker in by_model.items()}
        async with routed_frontend(tmp_path, models, mode=mode) as fe:
            cancelled: Counter[tuple[str, str, str]] = Counter()
            for n, (phase, (model, make, stream, events)) in enumerate(PHASES.items(), 1):
                worker = by_model[model]
                request_id = f"{phase}-{rid()}"
                headers = {"X-Request-Id": request_id}
                if mode == "direct":
                    headers["X-Worker-Instance-Id"] = worker.url
                payload = make(model, stream=stream)
                client = await RawClient.send(fe, payload, headers)
                if events:
                    await client.events(events)
                else:
                    await worker.record(arrived=request_id)
                t0 = client.hang_up()
                seen = await worker.request_record(request_id)
                await fe.app.wait_until_idle()

                assert seen["disconnected"] and not seen["completed"], (phase, seen)
                assert seen["disconnected_at"] >= t0, phase  # the hang-up's doing, not earlier
                endpoint = "chat_completions" if make is chat else "completions"
                cancelled[model, endpoint, "stream" if stream else "unary"] += 1
                assert fe.value("disconnected_clients") == n
                for (m, e, kind), count in cancelled.items():
                    labels = {"model": m, "endpoint": e, "request_type": kind}
                    assert fe.value("model_cancellation_total", **labels) == count
                assert fe.value("requests_total", status="error", error_type="cancelled") == n
                fe.assert_idle(n)
            # A hang-up is the client's doing: no worker was reported down.
            assert all(q == 0 for _, q in fe.worker_gauges().values())
    assert not net.expired()


# --- 2. faulty workers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    behaviour: str
    status: int  # what the client gets: an HTTP status, or 200 and an error frame mid-stream
    type: str
    code: str | None
    error_type: str  # requests_total{error_type}
    quarantines: bool
    why: str


# The router's limits are 1 s (LIMITS); the HTTP layer's net is 2 s, and only the router's
# limit quarantines the worker: `quarantines` tells the two apart (no wall-clock bound, which
# would fail on a busy machine).
FAULTS = {
    # (A worker that refuses connections is not here: its request is retried on the healthy
    # worker, see tests/system/test_idle_workers.py.)
    "never-answers": Fault(
        "zombie", 504, "timeout_error", "response_timeout", "response_timeout", True,
        "no headers within the 1 s first-token limit: the router's timer (SPEC §4, §8.3)",
    ),
    "silent-after-first-event": Fault(
        "zombie-after-first", 200, "timeout_error", "response_timeout", "response_timeout", True,
        "the stream started, then 1 s of silence: the router's inactivity timer",
    ),
    "stops-mid-stream": Fault(
        "stop-mid-stream", 200, "service_unavailable_error", "worker_disconnected", "unavailable",
        True, "the body ended without [DONE]: a stream without its terminal item",
    ),
    "dies-mid-stream": Fault(
        "die-mid-stream", 200, "service_unavailable_error", "worker_disconnected", "unavailable",
        True, "the worker process exited: the connection dropped mid-stream",
    ),
    # Not in SPEC §8.2's list (which issue 4 says is exhaustive): the worker answered, with its
    # own error, so the request fails but the worker stays in rotation.
    "answers-500": Fault(
        "http-500", 502, "upstream_error", None, "internal", False,
        "the worker's own 5xx is passed on as a bad gateway (UpstreamError)",
    ),
    "error-event-mid-stream": Fault(
        "error-mid-stream", 200, "upstream_error", None, "internal", False,
        "the worker's own error event is passed on as an UpstreamError frame",
    ),
    "malformed-sse": Fault(
        "malformed-sse", 502, "upstream_error", None, "internal", False,
        "a broken first event: bad gateway before any byte reached the client",
    ),
    "busy": Fault(
        "busy", 503, "overloaded_error", "all_workers_busy", "overload", False,
        "the worker sheds load: an overload, which never quarantines",
    ),
}  # fmt: skip


async def recover(fe: RoutedFrontend, bad: BadWorker) -> None:
    """Bring the bad worker back as a healthy one on the same URL; wait for its probe to pass."""
    bad.options.behaviour = "ok"
    bad.options.gap = 0.0
    await bad.restart()
    worker = fe.worker(bad.url)
    await fe.until(lambda: not worker.quarantined)


@pytest.mark.parametrize("name", list(FAULTS))
async def test_a_faulty_worker_fails_its_request_is_avoided_and_returns(
    name: str, tmp_path: Path
) -> None:
    fault = FAULTS[name]
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        bad_workers(bad={"behaviour": fault.behaviour}, good={"behaviour": "ok"}) as w,
    ):
        bad, good = w["bad"], w["good"]
        # The bad worker is listed first: round-robin sends it the first request.
        async with routed_frontend(tmp_path, {"m": [bad.url, good.url]}, env=LIMITS) as fe:
            failed = await send(fe, chat("m", stream=True))
            assert failed.status == fault.status, (fault.why, failed.body)
            error = failed.error()
            assert (error["type"], error["code"]) == (fault.type, fault.code), (fault.why, error)
            assert fe.value("requests_total", error_type=fault.error_type) == 1
            assert fe.value("disconnected_clients") == 0  # a worker fault is no hang-up
            quarantined = fault.quarantines
            assert fe.value("worker_quarantined", worker=bad.url) == quarantined
            assert fe.value("worker_quarantined", worker=good.url) == 0
            status, states = await health(fe)
            assert status == 200  # the model still has a worker
            assert states[good.url] == "free"
            assert states[bad.url] in (("quarantined", "probing") if quarantined else ("free",))
            assert fe.value("model_ready", model="m") == 1

            if quarantined:
                # While it is out, every request goes to the healthy worker.
                for _ in range(4):
                    await ok(fe, chat("m", stream=True))
                assert fe.worker(bad.url).quarantined, "back in rotation too early to tell"
                assert len(await ids_seen(good)) == 4
                await recover(fe, bad)
                assert fe.value("worker_quarantined", worker=bad.url) == 0
                assert (await health(fe))[1][bad.url] == "free"
                # Back in rotation: round-robin reaches it again, and it serves.
                for _ in range(2):
                    await ok(fe, chat("m", stream=True))
                assert len(await ids_seen(bad)) == 1
                sent, failures = 7, 1
            else:
                # Never taken out: round-robin keeps sending it every other request.
                replies = [await send(fe, chat("m", stream=True)) for _ in range(4)]
                assert [r.status == 200 and r.done for r in replies] == [True, False] * 2
                assert len(await ids_seen(good)) == 2
                assert len(await ids_seen(bad)) == 3
                sent, failures = 5, 3
            await fe.app.wait_until_idle()
            assert fe.value("requests_total", error_type=fault.error_type) == failures
            assert fe.value("requests_total", status="success") == sent - failures
            fe.assert_idle(sent)
            assert all(q == 0 for _, q in fe.worker_gauges().values())
    assert not net.expired()


# A unary client gets the same errors as plain HTTP answers: nothing was sent before them.
UNARY_FAULTS = {
    "stop-mid-stream": (503, "worker_disconnected", True),
    "die-mid-stream": (503, "worker_disconnected", True),
    "zombie-after-first": (504, "response_timeout", True),
    "error-mid-stream": (502, None, False),
    "malformed-sse": (502, None, False),
}


async def test_unary_requests_to_faulty_workers_get_the_matching_http_error(
    tmp_path: Path,
) -> None:
    specs = {name: {"behaviour": name} for name in UNARY_FAULTS}
    async with asyncio.timeout(SAFETY_NET) as net, bad_workers(**specs) as w:
        models = {name: [worker.url] for name, worker in w.items()}  # one model per fault
        async with routed_frontend(tmp_path, models, env=LIMITS) as fe:
            replies = await asyncio.gather(
                *(send(fe, chat(name, stream=False)) for name in UNARY_FAULTS)
            )
            for (name, (status, code, quarantines)), reply in zip(
                UNARY_FAULTS.items(), replies, strict=True
            ):
                assert reply.status == status, (name, reply.body)
                assert reply.error()["code"] == code, (name, reply.body)
                # Counted against the worker (it may be back already: its back-off is 1 s).
                assert (fe.worker(w[name].url).failures > 0) == quarantines, name
            await fe.app.wait_until_idle()
            assert fe.value("requests_total", error_type="unavailable") == 2
            assert fe.value("requests_total", error_type="response_timeout") == 1
            assert fe.value("requests_total", error_type="internal") == 2
            assert fe.value("disconnected_clients") == 0
            fe.assert_idle(5)
    assert not net.expired()


async def test_a_worker_killed_mid_stream_fails_the_request_at_once_and_returns(
    tmp_path: Path,
) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        bad_workers(
            bad={"behaviour": "ok", "tokens": 3, "gap": HOLD}, good={"behaviour": "ok"}
        ) as w,
    ):
        bad, good = w["bad"], w["good"]
        async with routed_frontend(tmp_path, {"m": [bad.url, good.url]}, env=LIMITS) as fe:
            client = await RawClient.send(fe, chat("m", stream=True), {})
            await client.events(2)
            await bad.kill()  # SIGKILL: the kernel resets its sockets
            rest = await client.rest()
            assert b"event: error" in rest
            # The dropped connection ended it, not the 1 s inactivity limit (response_timeout).
            assert b'"code":"worker_disconnected"' in rest
            assert b"[DONE]" not in rest
            client.writer.close()
            assert fe.worker(bad.url).quarantined
            assert fe.value("requests_total", error_type="unavailable") == 1
            for _ in range(3):
                await ok(fe, chat("m", stream=False))
            assert len(await ids_seen(good)) == 3
            await recover(fe, bad)
            await ok(fe, chat("m", stream=False))
            await ok(fe, chat("m", stream=False))
            assert len(await ids_seen(bad)) == 1
            await fe.app.wait_until_idle()
            fe.assert_idle(6)
            assert all(q == 0 for _, q in fe.worker_gauges().values())
    assert not net.expired()


async def test_a_worker_that_never_answers_is_quarantined_by_the_inactivity_limit_alone(
    tmp_path: Path,
) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        bad_workers(bad={"behaviour": "zombie"}, good={"behaviour": "ok"}) as w,
    ):
        bad, good = w["bad"], w["good"]
        env = {"DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS": "1"}
        async with routed_frontend(tmp_path, {"m": [bad.url, good.url]}, env=env) as fe:
            failed = await send(fe, chat("m", stream=True))
            assert failed.status == 504
            assert failed.error()["type"] == "timeout_error"
            # The router's own limit (1 s), not the HTTP layer's net (2 s), ended it: only the
            # router's takes the silent worker out of rotation.
            assert fe.worker(bad.url).quarantined
    assert not net.expired()


# --- 3. slow but alive ---------------------------------------------------------------------------


async def test_a_slow_but_alive_worker_is_never_cut_or_quarantined(tmp_path: Path) -> None:
    # 0.3 s between events, 8 tokens: 2.4 s in all, longer than the router's 1 s limits and
    # than the HTTP layer's 2 s net, but never 1 s of silence.
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        bad_workers(slow={"behaviour": "ok", "tokens": 8, "gap": 0.3}) as w,
    ):
        slow = w["slow"]
        async with routed_frontend(tmp_path, {"m": [slow.url]}, env=LIMITS) as fe:
            replies = await asyncio.gather(
                send(fe, chat("m", stream=True)),
                send(fe, chat("m", stream=False)),
                send(fe, completion("m", stream=True)),
            )
            for reply in replies:
                assert reply.status == 200, reply.body
                assert reply.seconds > 2.0
            assert replies[0].done and replies[2].done
            assert replies[0].body.count(b'"content":"tok') == 8
            assert json.loads(replies[1].body)["choices"][0]["message"]["content"] == "".join(
                f"tok{i}" for i in range(8)
            )
            assert not fe.worker(slow.url).quarantined
            await fe.app.wait_until_idle()
            assert fe.value("requests_total", status="success") == 3
            fe.assert_idle(3)
            assert fe.value("worker_quarantined", worker=slow.url) == 0
            records = (await slow.record())["requests"]
            assert [r["completed"] for r in records] == [True] * 3
            assert not any(r["disconnected"] for r in records)
    assert not net.expired()


# --- 4. many cancellations -----------------------------------------------------------------------


async def test_a_hundred_client_cancellations_quarantine_nothing(tmp_path: Path) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        bad_workers(steady={"behaviour": "ok", "tokens": 3, "gap": HOLD}) as w,
    ):
        worker = w["steady"]
        async with routed_frontend(tmp_path, {"m": [worker.url]}) as fe:
            total = 0
            for batch in range(4):  # 25 at a time, in flight together
                ids = [f"{batch}-{i}-{rid()}" for i in range(25)]
                kinds = [("unary", "stream", "completions")[i % 3] for i in range(25)]

                async def open_one(request_id: str, kind: str) -> RawClient:
                    payload = (
                        completion("m", stream=True)
                        if kind == "completions"
                        else chat("m", stream=kind == "stream")
                    )
                    client = await RawClient.send(fe, payload, {"X-Request-Id": request_id})
                    if kind == "unary":
                        await worker.record(arrived=request_id)
                    else:
                        await client.events(1)
                    return client

                clients = await asyncio.gather(*map(open_one, ids, kinds))
                assert fe.value("worker_inflight_requests", worker=worker.url) == 25
                for client in clients:
                    client.hang_up()
                for request_id in ids:
                    assert (await worker.request_record(request_id))["disconnected"]
                await fe.app.wait_until_idle()
                total += 25
                assert fe.value("requests_total", error_type="cancelled") == total
            assert fe.value("disconnected_clients") == 100
            assert fe.value("requests_total", error_type="internal") == 0
            fe.assert_idle(100)  # so every request is a cancellation, and nothing else
            assert not fe.worker(worker.url).quarantined
            assert fe.worker(worker.url).failures == 0
            assert fe.value("worker_quarantined", worker=worker.url) == 0
    assert not net.expired()


# --- 5. routing ----------------------------------------------------------------------------------


async def test_round_robin_spreads_requests_evenly(tmp_path: Path) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        bad_workers(**{k: {"behaviour": "ok"} for k in "abc"}) as w,
    ):
        urls = [w[k].url for k in "abc"]
        async with routed_frontend(tmp_path, {"m": urls}) as fe:
            for i in range(30):
                await ok(fe, chat("m", stream=i % 2 == 0))
            counts = [len(await ids_seen(w[k])) for k in "abc"]
            assert counts == [10, 10, 10]
            await fe.app.wait_until_idle()
            fe.assert_idle(30)
    assert not net.expired()


@pytest.mark.parametrize("mode", ["least-loaded", "power-of-two"])
async def test_load_aware_modes_avoid_a_loaded_worker(mode: str, tmp_path: Path) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        bad_workers(
            loaded={"behaviour": "ok", "tokens": 3, "gap": HOLD},
            b={"behaviour": "ok"},
            c={"behaviour": "ok"},
        ) as w,
    ):
        loaded = w["loaded"]
        # "hold" is served by the loaded worker alone: its streams load that worker.
        models = {"m": [loaded.url, w["b"].url, w["c"].url], "hold": [loaded.url]}
        async with routed_frontend(tmp_path, models, mode=mode) as fe:
            holds = []
            for _ in range(3):
                client = await RawClient.send(fe, chat("hold", stream=True), {})
                await client.events(2)
                holds.append(client)
            assert fe.value("worker_inflight_requests", worker=loaded.url) == 3
            for i in range(20):
                await ok(fe, chat("m", stream=i % 2 == 0))
            assert len(await ids_seen(loaded)) == 3  # the holds, nothing else
            assert len(await ids_seen(w["b"])) + len(await ids_seen(w["c"])) == 20
            for client in holds:
                client.hang_up()
            await fe.app.wait_until_idle()
            fe.assert_idle(23)
    assert not net.expired()


async def test_kv_mode_keeps_a_shared_prefix_on_one_worker_and_spreads_unrelated_prompts(
    tmp_path: Path,
) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        bad_workers(**{k: {"behaviour": "ok", "tokens": 3, "gap": HOLD} for k in "abc"}) as w,
    ):
        workers = [w[k] for k in "abc"]
        async with routed_frontend(tmp_path, {"m": [x.url for x in workers]}, mode="kv") as fe:

            async def where(request_ids: list[str]) -> list[str]:
                found = []
                for request_id in request_ids:
                    owners = [x.url for x in workers if request_id in await ids_seen(x)]
                    assert len(owners) == 1
                    found.append(owners[0])
                return found

            # Three unrelated 1,000-character prompts in flight together: each worker's own
            # load (its active blocks) sends the next one elsewhere, so one lands on each.
            unrelated = [f"{rid()}-{i}" for i in range(3)]
            clients = []
            for i, request_id in enumerate(unrelated):
                prompt = f"topic {i}: " + " ".join(f"u{i}w{j}" for j in range(150))
                client = await RawClient.send(
                    fe, chat("m", stream=True, content=prompt), {"X-Request-Id": request_id}
                )
                await client.events(2)
                clients.append(client)
            assert sorted(await where(unrelated)) == sorted(x.url for x in workers)
            for client in clients:
                client.hang_up()
            await fe.app.wait_until_idle()

            # Six prompts sharing a 2,000-character prefix, one after another: the worker that
            # took the first holds the prefix (in the router's index) and gets all of them.
            shared = " ".join(f"shared{j}" for j in range(250))
            related = [f"{rid()}-s{i}" for i in range(6)]
            for i, request_id in enumerate(related):
                client = await RawClient.send(
                    fe,
                    chat("m", stream=True, content=f"{shared} question {i}"),
                    {"X-Request-Id": request_id},
                )
                await client.events(2)
                client.hang_up()
                await fe.app.wait_until_idle()
            assert len(set(await where(related))) == 1
            fe.assert_idle(9)
    assert not net.expired()


async def test_direct_mode_needs_the_worker_header_and_a_known_worker(tmp_path: Path) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, bad_workers(a={"behaviour": "ok"}) as w:
        url = w["a"].url
        async with routed_frontend(tmp_path, {"m": [url]}, mode="direct") as fe:
            missing = await send(fe, chat("m", stream=True))
            assert missing.status == 400
            assert missing.error()["type"] == "invalid_request_error"
            assert missing.error()["code"] == "worker_id_required"
            unknown = await send(
                fe, chat("m", stream=True), {"X-Worker-Instance-Id": "http://127.0.0.1:9"}
            )
            assert unknown.status == 503
            assert unknown.error()["code"] == "no_workers_available"
            await ok(fe, chat("m", stream=True), **{"X-Worker-Instance-Id": url})
            assert len(await ids_seen(w["a"])) == 1
            await fe.app.wait_until_idle()
            assert fe.value("requests_total", error_type="validation") == 1
            assert fe.value("requests_total", error_type="unavailable") == 1
            fe.assert_idle(3)
    assert not net.expired()


# --- 6. load shedding ----------------------------------------------------------------------------


async def test_a_worker_at_its_in_flight_limit_sheds_load(tmp_path: Path) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        bad_workers(a={"behaviour": "ok", "tokens": 3, "gap": HOLD}) as w,
    ):
        worker = w["a"]
        env = {"DYN_MAX_INFLIGHT_PER_WORKER": "1"}
        async with routed_frontend(tmp_path, {"m": [worker.url]}, env=env) as fe:
            held = await RawClient.send(fe, chat("m", stream=True), {})
            await held.events(2)
            assert (await health(fe))[1][worker.url] == "busy"
            for stream in (True, False):
                shed = await send(fe, chat("m", stream=stream))
                assert shed.status == 503
                assert shed.error()["type"] == "overloaded_error"
                assert shed.error()["code"] == "all_workers_busy"
            assert fe.value("model_rejection_total", model="m", endpoint="chat_completions") == 2
            assert fe.value("requests_total", error_type="overload") == 2
            assert len(await ids_seen(worker)) == 1  # the shed requests never reached it
            assert not fe.worker(worker.url).quarantined
            held.hang_up()
            await fe.app.wait_until_idle()
            fe.assert_idle(3)
    assert not net.expired()


async def test_past_the_connection_bound_a_request_waits_for_a_free_connection(
    tmp_path: Path,
) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        bad_workers(a={"behaviour": "ok", "tokens": 3, "gap": HOLD}) as w,
    ):
        worker = w["a"]
        env = {"DYN_WORKER_MAX_CONNECTIONS": "1"}
        async with routed_frontend(tmp_path, {"m": [worker.url]}, env=env) as fe:
            client = fe.fleet._client
            assert client is not None
            held = await RawClient.send(fe, chat("m", stream=True), {})
            await held.events(2)
            waiting = await RawClient.send(fe, chat("m", stream=True), {})
            while not client.pool.waiting:  # queued behind the one connection, not shed
                await asyncio.sleep(0)
            assert client.pool.open == 1
            assert len(await ids_seen(worker)) == 1  # the waiting request has not reached it
            held.hang_up()  # its connection closes: the waiting request takes it
            await waiting.events(2)
            assert len(await ids_seen(worker)) == 2
            waiting.hang_up()
            await fe.app.wait_until_idle()
            fe.assert_idle(2)
            assert not fe.worker(worker.url).quarantined
            assert (client.pool.open, client.pool.waiting) == (0, 0)
    assert not net.expired()


async def test_a_request_whose_limit_passes_while_it_waits_for_a_connection_blames_no_worker(
    tmp_path: Path,
) -> None:
    # The held stream is live (an event every 0.2 s, 2 s limit): only the queued request's own
    # silence limit runs out, while it waits for the frontend's one connection.
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        bad_workers(a={"behaviour": "ok", "tokens": 60, "gap": 0.2}) as w,
    ):
        worker = w["a"]
        env = {"DYN_WORKER_MAX_CONNECTIONS": "1", "DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS": "2"}
        async with routed_frontend(tmp_path, {"m": [worker.url]}, env=env) as fe:
            held = await RawClient.send(fe, chat("m", stream=True), {})
            await held.events(2)
            queued = await send(fe, chat("m", stream=True))
            assert queued.status == 503, queued.body
            assert queued.error()["type"] == "overloaded_error"
            assert queued.error()["code"] == "worker_connections_busy"
            assert not fe.worker(worker.url).quarantined
            assert len(await ids_seen(worker)) == 1  # it never reached the worker
            held.hang_up()
            await fe.app.wait_until_idle()
            fe.assert_idle(2)
    assert not net.expired()


async def test_no_available_worker_is_503_no_workers_available(tmp_path: Path) -> None:
    async with asyncio.timeout(SAFETY_NET) as net, bad_workers(a={"behaviour": "refuse"}) as w:
        url = w["a"].url
        async with routed_frontend(tmp_path, {"m": [url]}) as fe:
            assert fe.value("model_ready", model="m") == 1
            first = await send(fe, chat("m", stream=True))
            assert first.error()["code"] == "worker_unreachable"
            assert fe.worker(url).quarantined
            for stream in (True, False):
                none = await send(fe, chat("m", stream=stream))
                assert none.status == 503
                assert none.error()["type"] == "service_unavailable_error"
                assert none.error()["code"] == "no_workers_available"
            status, states = await health(fe)
            assert status == 503
            assert states[url] in ("quarantined", "probing")
            assert fe.value("model_ready", model="m") == 0
            assert fe.value("model_rejection_total") == 0  # unavailable is not a rejection
            assert fe.value("requests_total", error_type="unavailable") == 3

            # It comes back: the model is ready again.
            await recover(fe, w["a"])
            assert fe.value("model_ready", model="m") == 1
            assert (await health(fe)) == (200, {url: "free"})
            await ok(fe, chat("m", stream=True))
            await fe.app.wait_until_idle()
            fe.assert_idle(4)
    assert not net.expired()


# --- 7. models come from the workers -------------------------------------------------------------


@pytest.fixture
def echo_worker() -> Iterator[str]:
    """Our own ``dynamo-llm worker --engine echo`` as a child process; its URL."""
    args = ["worker", "--engine", "echo", "--token-echo-delay-ms", "0", "--http-port", "0"]
    with ServerProcess([*args, "--model-name", "echo-model"]) as proc:
        yield proc.wait_ready(timeout=SAFETY_NET)
    assert proc.returncode == 0, proc.log


async def test_models_are_learned_from_the_workers(tmp_path: Path, echo_worker: str) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        bad_workers(
            alpha={"behaviour": "ok", "model": "alpha"},
            beta={"behaviour": "ok", "model": "org/beta"},
        ) as w,
    ):
        upstreams = (w["alpha"].url, w["beta"].url + "/v1", echo_worker)
        async with routed_frontend(tmp_path, upstreams=upstreams) as fe:
            listed = (await fe.http.get("/v1/models")).json()
            assert sorted(card["id"] for card in listed["data"]) == [
                "alpha",
                "echo-model",
                "org/beta",
            ]
            assert (await fe.http.get("/v1/models/org/beta")).json()["id"] == "org/beta"
            assert fe.worker(echo_worker).is_ours  # it says owned_by dynamo-llm
            assert not fe.worker(w["beta"].url).is_ours

            await ok(fe, chat("org/beta", stream=True))
            assert len(await ids_seen(w["beta"])) == 1
            assert len(await ids_seen(w["alpha"])) == 0
            echoed = await ok(fe, chat("echo-model", stream=False, content="one two three"))
            message = json.loads(echoed.body)["choices"][0]["message"]
            assert "one two three" in message["content"]

            unknown = await send(fe, chat("gamma", stream=True))
            assert unknown.status == 404
            assert unknown.error()["type"] == "not_found_error"
            assert unknown.error()["code"] == "model_not_found"
            assert (await fe.http.get("/v1/models/gamma")).status_code == 404
            await fe.app.wait_until_idle()
            labels = {"model": "unknown_model", "error_type": "not_found"}
            assert fe.value("requests_total", **labels) == 1
            fe.assert_idle(3)
    assert not net.expired()
