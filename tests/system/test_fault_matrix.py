"""The fault matrix (issue 5, SPEC §11): every fault we know of, and the invariants after each.

The frontend is the routed app in this process (``fleet_helpers.routed_frontend``), the workers
are real processes on loopback (``dynamo_llm.testing.bad_workers``). Three families of cases:

* **client**: a hang-up before the worker sent a byte (a ``zombie``), while waiting for the first
  token (``zombie-after-first``), mid-stream, and on a unary request — for chat, completions and
  a batch of two prompts, streamed and unary. One frontend serves all 18 cases, one after another.
* **worker**: a worker that refuses connections, never answers (before and after its first
  event), ends its stream without a terminal item, is SIGKILLed mid-stream, answers 500, sends
  malformed SSE — each for the three endpoints, streamed and unary, each case on a fresh frontend
  (the failure quarantines the worker, which would decide the next case); a slow but live worker
  (all six together: it is never cut); a worker that flaps while requests flow.
* **input**: malformed JSON, wrong types, unknown fields, an oversized body, an unknown model,
  huge and control-character header values, a slow-loris body.

After every case :meth:`Bench.assert_invariants` checks, from the outside:

1. each worker that was generating when the client left saw the hang-up (its own record);
2. ``inflight_requests``, ``queued_requests`` and ``worker_inflight_requests`` are 0;
3. ``requests_total`` equals, label set by label set, the ledger of what the test sent and what
   each request had to end as (the tables below);
4. no asyncio task, upstream connection (the fleet's connector) or file descriptor leaked — the
   counts return to the baseline taken after a warm-up request. A leak check cannot wait for an
   event (the thing checked is an absence), so it re-reads the counts every 10 ms for at most
   ``SETTLE`` seconds: a socket the peer reset is closed by the event loop a moment later. The
   probe task of a quarantined worker (``probe <id>``) belongs to the worker set, not to a
   request, and is not counted;
5. the frontend still serves a normal request, with the exact text.

Cases run inside one test function per family so that their workers start once; a failing case is
reported by name and the rest still run (the ledger is re-read from the metrics after a failure,
so one wrong count does not fail every later case).

The worker cases above run with migration off (``DYN_MIGRATION_LIMIT=0``). They run again with
``DYN_MIGRATION_LIMIT=1`` and a healthy ``ok`` worker after the faulty one for the same model
(section 2b): a migratable fault (refused connection, a worker that never answers, stream ended
without its terminal item, SIGKILL mid-stream) gives the client one complete, correct answer and
counts one migration; a fault that is not migratable (the worker's own 500 or malformed output)
ends as with migration off and counts none. A client that hangs up during a migrated stream
reaches the replay's worker.
"""

import asyncio
import contextlib
import functools
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from dynamo_llm.testing.bad_workers import BadWorker
from tests.system.fleet_helpers import (
    HOLD,
    LIMITS,
    SAFETY_NET,
    RawClient,
    Reply,
    RoutedFrontend,
    bad_workers,
    rid,
    routed_frontend,
    send,
)
from tests.system.raw_http import raw_exchange, raw_post, status_of

SETTLE = 3.0
GOOD = "good"  # the model of the healthy worker every bench keeps for invariant 5
GOOD_TEXT = "".join(f"tok{i}" for i in range(5))  # what an ``ok`` worker says by default

# --- requests -----------------------------------------------------------------------------------

ENDPOINTS = ("chat", "completions", "batch")
MODES = ("stream", "unary")


def payload(kind: str, model: str, *, stream: bool) -> dict[str, Any]:
    if kind == "chat":
        messages = [{"role": "user", "content": "say something"}]
        return {"model": model, "messages": messages, "stream": stream}
    prompt: str | list[str] = "say something" if kind == "completions" else ["say one", "say two"]
    return {"model": model, "prompt": prompt, "stream": stream}


def upstream_ids(kind: str, request_id: str) -> list[str]:
    """The ids the worker sees: a batch is one sub-request per prompt, ``<id>-<k>``."""
    return [f"{request_id}-0", f"{request_id}-1"] if kind == "batch" else [request_id]


Key = tuple[str, str, str, str]  # requests_total{endpoint, request_type, status, error_type}


def key(kind: str, stream: bool, error_type: str = "") -> Key:
    endpoint = "chat_completions" if kind == "chat" else "completions"
    return (
        endpoint,
        "stream" if stream else "unary",
        "error" if error_type else "success",
        error_type,
    )


# --- the bench: a frontend, its ledger, its baseline ---------------------------------------------


def fd_targets() -> Counter[str]:
    out: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            out[target.split(":")[0] if ":[" in target else target] += 1
    return out


@dataclass(frozen=True)
class Counts:
    tasks: int
    upstream: int
    fds: int

    def within(self, baseline: "Counts") -> bool:
        return (
            self.tasks <= baseline.tasks
            and self.upstream <= baseline.upstream
            and self.fds <= baseline.fds
        )


class Bench:
    """One routed frontend under test, with the ledger of what every request must end as."""

    def __init__(self, fe: RoutedFrontend, good: BadWorker) -> None:
        self.fe = fe
        self.good = good
        self.ledger: Counter[Key] = Counter()
        self.baseline = Counts(0, 0, 0)
        self.baseline_fds: Counter[str] = Counter()
        self.failures: list[str] = []

    def counts(self) -> Counts:
        tasks = [t for t in asyncio.all_tasks() if not t.get_name().startswith("probe ")]
        session = self.fe.fleet._session
        assert session is not None
        connector = session.connector
        assert connector is not None
        client = self.fe.fleet._client
        assert client is not None
        pool = client.pool  # generation requests; the session: probes, model lists, stops
        acquired = len(connector._acquired) + pool.open - pool.idle
        # A connection idle in a pool is reused or closed after its keep-alive (4 s): it holds
        # an fd that is not a leak. Count the fds without them.
        idle = sum(len(c) for c in connector._conns.values()) + pool.idle
        return Counts(len(tasks), acquired, len(os.listdir("/proc/self/fd")) - idle)

    def requests_total(self) -> Counter[Key]:
        seen: Counter[Key] = Counter()
        for labels, value in self.fe.samples(f"{self.fe.metrics.prefix}_requests_total"):
            k = (labels["endpoint"], labels["request_type"], labels["status"], labels["error_type"])
            seen[k] += int(value)
        return +seen

    def expect(self, kind: str, stream: bool, error_type: str = "") -> None:
        self.ledger[key(kind, stream, error_type)] += 1

    async def normal(self) -> None:
        """Invariant 5: a normal request to the healthy worker, exact text."""
        reply = await send(self.fe, payload("chat", GOOD, stream=False))
        self.expect("chat", False)
        assert reply.status == 200, f"a normal request afterwards: {reply.body!r}"
        text = json.loads(reply.body)["choices"][0]["message"]["content"]
        assert text == GOOD_TEXT, f"a normal request afterwards said {text!r}"

    async def warm_up(self, *workers: BadWorker) -> None:
        """Open every pool a case will use (client, upstream, worker records); the baseline."""
        await self.normal()
        reply = await send(self.fe, payload("batch", GOOD, stream=True))
        self.expect("batch", True)
        assert reply.done, reply.body
        for worker in (self.good, *workers):
            await worker.record()
        await self.fe.app.wait_until_idle()
        self.baseline = self.counts()
        self.baseline_fds = fd_targets()

    async def assert_invariants(
        self, case: str, hung_up: tuple[BadWorker, list[str]] | None = None
    ) -> None:
        fe = self.fe
        # 1. the worker that was generating saw the client leave (its own record)
        if hung_up is not None:
            worker, ids = hung_up
            for request_id in ids:
                record = await worker.request_record(request_id)
                assert record["disconnected"], f"{case}: worker never saw {request_id} cancelled"
        # 2. gauges back to 0
        await fe.app.wait_until_idle()
        assert fe.value("inflight_requests") == 0, case
        assert fe.value("queued_requests") == 0, case
        gauges = {w.id: fe.value("worker_inflight_requests", worker=w.id) for w in fe.fleet.workers}
        assert all(v == 0 for v in gauges.values()), f"{case}: worker_inflight {gauges}"
        assert all(w.inflight == 0 for w in fe.fleet.workers), case
        # 3. every request counted once, as the ledger says
        seen = self.requests_total()
        assert seen == +self.ledger, (
            f"{case}: requests_total {dict(seen)} != expected {dict(+self.ledger)}"
        )
        # 4. nothing leaked
        deadline = time.monotonic() + SETTLE
        while not (now := self.counts()).within(self.baseline):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{case}: leaked: {now} after, baseline {self.baseline}; "
                    f"new fds {dict(fd_targets() - self.baseline_fds)}"
                )
            await asyncio.sleep(0.01)
        probes = [t for t in asyncio.all_tasks() if t.get_name().startswith("probe ")]
        quarantined = sum(w.quarantined for w in fe.fleet.workers)
        assert len(probes) <= quarantined, f"{case}: {len(probes)} probes, {quarantined} out"
        # 5. still serving
        await self.normal()

    async def run(self, case: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run one case; on failure note it, and re-read the ledger so later cases stand alone."""
        try:
            async with asyncio.timeout(SAFETY_NET):
                await body()
        except (AssertionError, TimeoutError) as exc:
            self.failures.append(f"{case}: {type(exc).__name__}: {exc}")
            await self.fe.app.wait_until_idle()
            self.ledger = Counter(self.requests_total())

    def assert_no_failures(self) -> None:
        assert not self.failures, "\n" + "\n".join(self.failures)


@contextlib.asynccontextmanager
async def bench(
    tmp_path: Path,
    good: BadWorker,
    models: dict[str, list[str]],
    *warm: BadWorker,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Bench]:
    # The leak check counts the frontend's tasks and connections to workers: no idle checks or
    # metrics scrapes of its own may come and go under it.
    quiet = {
        "DYN_WORKER_IDLE_PROBE_INTERVAL_SECS": "0",
        "DYN_WORKER_METRICS_INTERVAL_SECS": "0",
        **(env or {}),
    }
    async with routed_frontend(tmp_path, {GOOD: [good.url], **models}, env=quiet) as fe:
        b = Bench(fe, good)
        await b.warm_up(*warm)
        yield b


@contextlib.asynccontextmanager
async def own_client(fe: RoutedFrontend) -> AsyncIterator[None]:
    """Concurrent requests open more pooled client connections than the warm-up did: give them a
    client of their own, closed before the leak check."""
    saved = fe.http
    fe.http = httpx.AsyncClient(base_url=fe.base_url, timeout=SAFETY_NET)
    try:
        yield
    finally:
        await fe.http.aclose()
        fe.http = saved


def error_of(reply: Reply) -> dict[str, Any]:
    return reply.error()


# --- 1. client hang-ups --------------------------------------------------------------------------

# phase: the worker model, and the SSE events a streaming client reads before hanging up
# (chat, completions, batch). Unary clients hang up once the worker has the request.
CLIENT_PHASES: dict[str, tuple[str, dict[str, int]]] = {
    # The zombie accepted the request and never sends a byte: before dispatch completes.
    "before-first-byte": ("zombie", {"chat": 0, "completions": 0, "batch": 0}),
    # Headers (and, for chat, the role chunk) sent; no token yet.
    "waiting-first-token": ("first", {"chat": 1, "completions": 0, "batch": 0}),
    # Tokens flowing; the worker holds the next one for HOLD seconds.
    "mid-stream": ("steady", {"chat": 2, "completions": 1, "batch": 2}),
}
# Expected for every client case: one request, requests_total{status=error,
# error_type=cancelled} with its endpoint and request_type; the worker saw every sub-request it
# had received disconnect; no worker quarantined (a hang-up is the client's doing).


async def hang_up_case(b: Bench, worker: BadWorker, *, phase: str, kind: str, stream: bool) -> None:
    model = CLIENT_PHASES[phase][0]
    events = CLIENT_PHASES[phase][1][kind]
    case = f"{phase}/{kind}/{'stream' if stream else 'unary'}"
    request_id = f"{phase}-{rid()}"
    client = await RawClient.send(
        b.fe, payload(kind, model, stream=stream), {"X-Request-Id": request_id}
    )
    b.expect(kind, stream, "cancelled")
    ids = upstream_ids(kind, request_id)
    # A zombie holds the first sub-request's dispatch: only that one arrives.
    for sub in ids[:1] if model == "zombie" else ids:
        await worker.record(arrived=sub)
    if stream and events:
        await client.events(events)
    client.hang_up()
    arrived = [seen["id"] for seen in (await worker.record())["requests"]]
    await b.assert_invariants(case, (worker, [i for i in ids if i in arrived]))
    assert not any(x.quarantined for x in b.fe.fleet.workers), f"{case}: a worker quarantined"


async def test_client_hang_ups_at_every_phase_leave_nothing_behind(tmp_path: Path) -> None:
    async with (
        asyncio.timeout(120) as net,
        bad_workers(
            good={"behaviour": "ok"},
            zombie={"behaviour": "zombie"},
            first={"behaviour": "zombie-after-first"},
            steady={"behaviour": "ok", "tokens": 3, "gap": HOLD},
        ) as w,
    ):
        models = {name: [w[name].url] for name in ("zombie", "first", "steady")}
        async with bench(tmp_path, w["good"], models, *(w[n] for n in models)) as b:
            for phase, (model, _) in CLIENT_PHASES.items():
                for kind in ENDPOINTS:
                    for mode in MODES:
                        stream = mode == "stream"
                        case = functools.partial(
                            hang_up_case, b, w[model], phase=phase, kind=kind, stream=stream
                        )
                        await b.run(f"{phase}/{kind}/{mode}", case)
            assert b.fe.value("disconnected_clients") == 18
            assert b.fe.value("requests_total", error_type="internal") == 0
            b.assert_no_failures()
    assert not net.expired()


# --- 2. worker faults ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    status: int  # the HTTP status the client gets (200: an error frame mid-stream)
    code: str | None  # the error's code
    error_type: str  # requests_total{error_type}


# behaviour -> {(kind, mode): Outcome}; "*" for every kind. The router limits are 1 s (LIMITS).
# ``internal`` only where the worker itself reported an internal failure (its own 500, output
# that is not an event stream): UpstreamError, a bad gateway, SPEC §5 "anything else".
UNREACHABLE = Outcome(503, "worker_unreachable", "unavailable")
TIMEOUT_504 = Outcome(504, "response_timeout", "response_timeout")
TIMEOUT_FRAME = Outcome(200, "response_timeout", "response_timeout")
DROPPED_503 = Outcome(503, "worker_disconnected", "unavailable")
DROPPED_FRAME = Outcome(200, "worker_disconnected", "unavailable")
BAD_GATEWAY = Outcome(502, None, "internal")

WORKER_FAULTS: dict[str, tuple[dict[str, Any], dict[str, Outcome]]] = {
    # connect refused: the worker is down, nothing generated (SPEC §8.2)
    "refuses-connections": ({"behaviour": "refuse"}, {"stream": UNREACHABLE, "unary": UNREACHABLE}),
    # accepts, never a byte: the router's first-token limit, before anything reached the client
    "never-answers": ({"behaviour": "zombie"}, {"stream": TIMEOUT_504, "unary": TIMEOUT_504}),
    # headers (+ a role chunk for chat), then silence: the inactivity limit. Chat's client has
    # its role chunk, so it gets an error frame; completions' got nothing yet, so a 504.
    "silent-after-first-event": (
        {"behaviour": "zombie-after-first"},
        {"stream": TIMEOUT_504, "chat/stream": TIMEOUT_FRAME, "unary": TIMEOUT_504},
    ),
    # a few tokens, then the body ends without [DONE]: a stream without its terminal item
    "stops-mid-stream": (
        {"behaviour": "stop-mid-stream"},
        {"stream": DROPPED_FRAME, "unary": DROPPED_503},
    ),
    # SIGKILL while it holds the second token (the test kills it, then restarts it)
    "sigkill-mid-stream": (
        {"behaviour": "ok", "tokens": 3, "gap": HOLD},
        {"stream": DROPPED_FRAME, "unary": DROPPED_503},
    ),
    # the worker's own 500, passed on as a bad gateway (UpstreamError: internal, known)
    "answers-500": ({"behaviour": "http-500"}, {"stream": BAD_GATEWAY, "unary": BAD_GATEWAY}),
    # a broken first event: a bad gateway before any byte reached the client
    "malformed-sse": (
        {"behaviour": "malformed-sse"}, {"stream": BAD_GATEWAY, "unary": BAD_GATEWAY},
    ),
}  # fmt: skip


def outcome_for(table: dict[str, Outcome], kind: str, mode: str) -> Outcome:
    return table.get(f"{kind}/{mode}", table[mode])


async def worker_fault_case(
    b: Bench, bad: BadWorker, *, kind: str, stream: bool, expected: Outcome, case: str
) -> None:
    body = payload(kind, "m", stream=stream)
    b.expect(kind, stream, expected.error_type)
    if case.startswith("sigkill"):
        reply = await kill_mid_stream(b.fe, bad, kind, body)
    else:
        reply = await send(b.fe, body)
    assert reply.status == expected.status, (case, reply.body[-300:])
    error = error_of(reply)
    assert error["code"] == expected.code, (case, error)
    assert not reply.done, case
    if expected.code == "response_timeout":
        # The router's 1 s limit fired, not the HTTP layer's 2 s net: only the router's reports
        # the worker down (a behaviour, where a wall-clock bound would fail on a busy machine).
        assert b.fe.worker(bad.url).quarantined, case
    assert b.fe.value("disconnected_clients") == 0, case
    await b.assert_invariants(case)


async def test_worker_faults_fail_the_request_cleanly_and_leave_nothing_behind(
    tmp_path: Path,
) -> None:
    specs = {name: spec for name, (spec, _) in WORKER_FAULTS.items()}
    async with (
        asyncio.timeout(120) as net,
        bad_workers(good={"behaviour": "ok"}, **specs) as w,
    ):
        failures: list[str] = []
        for name, (_, table) in WORKER_FAULTS.items():
            bad = w[name]
            for kind in ENDPOINTS:
                for mode in MODES:
                    stream = mode == "stream"
                    expected = outcome_for(table, kind, mode)
                    case = f"{name}/{kind}/{mode}"
                    # A fresh frontend: the fault quarantines the worker, which would decide the
                    # next case; the bad worker's record session is not warmed (it may refuse).
                    env = {**LIMITS, "DYN_MIGRATION_LIMIT": "0"}  # off, whatever the default
                    async with bench(tmp_path, w["good"], {"m": [bad.url]}, env=env) as b:
                        await b.run(
                            case,
                            functools.partial(
                                worker_fault_case, b, bad, kind=kind, stream=stream,
                                expected=expected, case=case,
                            ),
                        )  # fmt: skip
                        failures += b.failures
                    if name == "sigkill-mid-stream":
                        await bad.restart()
        assert not failures, "\n" + "\n".join(failures)
    assert not net.expired()


async def kill_mid_stream(
    fe: RoutedFrontend, worker: BadWorker, kind: str, body: dict[str, Any]
) -> Reply:
    """Send ``body``; SIGKILL ``worker`` once it is mid-stream; the reply the client got."""
    request_id = rid()
    t0 = time.monotonic()
    if body["stream"]:
        client = await RawClient.send(fe, body, {"X-Request-Id": request_id})
        await client.events({"chat": 2, "completions": 1, "batch": 2}[kind])
        await worker.kill()
        rest = await client.rest()
        client.writer.close()
        # Reply.error() reads SSE events: drop the chunked framing before the error event.
        start = rest.find(b"event: error")
        return Reply(200, rest[start:] if start >= 0 else rest, time.monotonic() - t0)
    task = asyncio.create_task(send(fe, body, {"X-Request-Id": request_id}))
    for sub in upstream_ids(kind, request_id):
        await worker.record(arrived=sub)
    await worker.kill()
    reply = await task
    return Reply(reply.status, reply.body, time.monotonic() - t0)


async def test_a_slow_but_alive_worker_is_never_cut(tmp_path: Path) -> None:
    # 6 tokens 0.4 s apart: 2.4 s in all, past the router's 1 s limits and the HTTP layer's 2 s
    # net, but never 1 s of silence. Expected: six successes with the whole text.
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        bad_workers(
            good={"behaviour": "ok"}, slow={"behaviour": "ok", "tokens": 6, "gap": 0.4}
        ) as w,
        bench(tmp_path, w["good"], {"m": [w["slow"].url]}, w["slow"], env=LIMITS) as b,
    ):
        cases = [(kind, mode == "stream") for kind in ENDPOINTS for mode in MODES]

        async def all_six() -> None:
            async with own_client(b.fe):
                replies = await asyncio.gather(
                    *(send(b.fe, payload(kind, "m", stream=stream)) for kind, stream in cases)
                )
            for (kind, stream), reply in zip(cases, replies, strict=True):
                b.expect(kind, stream)
                assert reply.status == 200, (kind, stream, reply.body)
                assert reply.done or not stream, (kind, stream)
                assert reply.seconds > 2.0, (kind, stream, reply.seconds)
                assert text_of(reply, stream).count("tok5") == (2 if kind == "batch" else 1)
            assert not b.fe.worker(w["slow"].url).quarantined
            await b.assert_invariants("slow-but-alive")

        await b.run("slow-but-alive", all_six)
        b.assert_no_failures()
    assert not net.expired()


def text_of(reply: Reply, stream: bool) -> str:
    """Everything the model said in ``reply``, all choices together."""
    if not stream:
        return "".join(
            c.get("text") or c.get("message", {}).get("content") or ""
            for c in json.loads(reply.body)["choices"]
        )
    out = []
    for event in reply.body.split(b"\n\n"):
        if event.startswith(b"data: {"):
            for c in json.loads(event[6:])["choices"]:
                out.append(c.get("text") or c.get("delta", {}).get("content") or "")
    return "".join(out)


async def test_a_flapping_worker_costs_only_the_requests_it_held(tmp_path: Path) -> None:
    # Two workers for "m"; one is SIGKILLed and restarted 3 times while three clients send
    # requests (every endpoint, streamed and unary) back to back. Expected: each request either
    # succeeds with the whole text or fails as `unavailable` (its worker vanished: refused or
    # dropped); nothing is `internal`; the ledger is built from what each client saw.
    async with (
        asyncio.timeout(60) as net,
        bad_workers(
            good={"behaviour": "ok"},
            flappy={"behaviour": "ok", "tokens": 5, "gap": 0.05},
            stable={"behaviour": "ok", "tokens": 5, "gap": 0.05},
        ) as w,
    ):
        urls = [w["flappy"].url, w["stable"].url]
        async with bench(tmp_path, w["good"], {"m": urls}, w["stable"], env=LIMITS) as b:

            async def flapping() -> None:
                stop = asyncio.Event()
                outcomes: Counter[str] = Counter()

                async def client(n: int) -> None:
                    i = n
                    while not stop.is_set():
                        kind, stream = ENDPOINTS[i % 3], i % 2 == 0
                        i += 1
                        reply = await send(b.fe, payload(kind, "m", stream=stream))
                        if reply.status == 200 and (reply.done or not stream):
                            words = 10 if kind == "batch" else 5
                            assert text_of(reply, stream).count("tok") == words, reply.body
                            b.expect(kind, stream)
                            outcomes["success"] += 1
                            continue
                        error = reply.error()
                        assert error["type"] == "service_unavailable_error", (kind, error)
                        b.expect(kind, stream, "unavailable")
                        outcomes[error["code"]] += 1

                async with own_client(b.fe):
                    clients = [asyncio.create_task(client(n)) for n in range(3)]
                    try:
                        for _ in range(3):
                            await asyncio.sleep(0.3)  # requests reach it; kill it mid-stream
                            await w["flappy"].kill()
                            await asyncio.sleep(0.2)
                            await w["flappy"].restart()
                        await asyncio.sleep(0.3)
                    finally:
                        stop.set()
                        await asyncio.gather(*clients)
                assert outcomes["success"] > 0, outcomes
                await b.assert_invariants(f"flapping {dict(outcomes)}")

            await b.run("flapping", flapping)
            b.assert_no_failures()
    assert not net.expired()


# --- 3. bad input --------------------------------------------------------------------------------


GOOD_CHAT = json.dumps(payload("chat", GOOD, stream=False)).encode()

# case: (path, raw body, expected status, requests_total{error_type}); all labelled
# model=unknown_model (the body could not be read, or names no served model)
BAD_BODIES: dict[str, tuple[str, bytes, int, str]] = {
    "malformed-json": (
        "/v1/chat/completions", b'{"model": "good", "messages": [', 400, "validation",
    ),
    "not-an-object": ("/v1/completions", b"[1, 2, 3]", 400, "validation"),
    "wrong-type-messages": (
        "/v1/chat/completions", b'{"model": "good", "messages": "hi"}', 400, "validation",
    ),
    "wrong-type-max-tokens": (
        "/v1/completions", b'{"model": "good", "prompt": "hi", "max_tokens": "ten"}', 400,
        "validation",
    ),
    # A router forwards fields we do not know (its /openapi.json allows them), so beside a model
    # nobody serves it is the model that is refused.
    "unknown-field": (
        "/v1/chat/completions",
        b'{"model": "nope", "messages": [{"role": "user", "content": "x"}], "frobnicate": 1}',
        404, "not_found",
    ),
    "oversized-body": (
        "/v1/chat/completions",
        b'{"model": "good", "messages": [{"role": "user", "content": "'
        + b"x" * (1024 * 1024 + 10) + b'"}]}',
        413, "validation",
    ),
    "unknown-model": ("/v1/completions", b'{"model": "nope", "prompt": "hi"}', 404, "not_found"),
}  # fmt: skip

# A hostile header: answered (200, the id not echoed) or refused with a 4xx by the server before
# any handler ran (then not counted) — never a 500. header: (raw header line)
BAD_HEADERS: dict[str, bytes] = {
    "huge-value-16kb": b"X-Padding: " + b"a" * 16_384,
    "huge-request-id": b"X-Request-Id: " + b"b" * 4_096,
    "soh-in-value": b"X-Odd: a\x01b",
    "del-in-request-id": b"X-Request-Id: a\x7fb",
    "nul-in-value": b"X-Odd: a\x00b",
    "bare-cr-in-value": b"X-Odd: a\rb",
}


async def test_bad_input_is_refused_cleanly_and_leaves_nothing_behind(tmp_path: Path) -> None:
    async with (
        asyncio.timeout(60) as net,
        bad_workers(good={"behaviour": "ok"}) as w,
        bench(tmp_path, w["good"], {}, env={"DYN_HTTP_BODY_LIMIT_MB": "1"}) as b,
    ):
        for name, (path, raw, status, error_type) in BAD_BODIES.items():

            async def body_case(
                name: str = name, path: str = path, raw: bytes = raw, status: int = status,
                error_type: str = error_type,
            ) -> None:  # fmt: skip
                response = await raw_exchange(b.fe, raw_post(path, raw, close=True))
                got = status_of(response)
                b.expect("chat" if "chat" in path else "completions", False, error_type)
                assert got == status, (name, response[:300])
                body = response.split(b"\r\n\r\n", 1)[1]
                assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
                await b.assert_invariants(name)
                assert b.fe.value("requests_total", model="unknown_model") > 0, name

            await b.run(name, body_case)

        for name, header in BAD_HEADERS.items():

            async def header_case(name: str = name, header: bytes = header) -> None:
                response = await raw_exchange(
                    b.fe, raw_post("/v1/chat/completions", GOOD_CHAT, header, close=True)
                )
                got = status_of(response)
                assert got < 500, (name, response[:300])
                if got == 200:
                    b.expect("chat", False)
                    assert json.loads(response.split(b"\r\n\r\n", 1)[1])["choices"], name
                    assert header.split(b": ", 1)[1] not in response.split(b"\r\n\r\n")[0]
                await b.assert_invariants(name)

            await b.run(name, header_case)

        await b.run("slow-loris", lambda: slow_loris(b))
        assert b.fe.value("requests_total", error_type="internal") == 0
        b.assert_no_failures()
    assert not net.expired()


LORIS_DELAY = 0.020


async def loris(fe: RoutedFrontend, body: bytes, *, finish: bool) -> bytes:
    """Send ``body`` a byte every 20 ms; ``finish=False`` hangs up half way. The raw response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", fe.server.port)
    writer.write(raw_post("/v1/chat/completions", body, close=True)[: -len(body)])
    sent = body if finish else body[: len(body) // 2]
    for i in range(len(sent)):
        writer.write(sent[i : i + 1])
        await writer.drain()
        await asyncio.sleep(LORIS_DELAY)
    if not finish:
        writer.transport.abort()
        return b""
    try:
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def serve_meanwhile(b: Bench, slow: "asyncio.Task[bytes]") -> None:
    """Normal requests, one every 100 ms, until ``slow`` ends: answered while it still sends.

    A server that a slow body held up would answer none of them before the slow one is done;
    how fast they are is not asserted (the machine is shared)."""
    meanwhile = 0
    while not slow.done():
        reply = await send(b.fe, payload("chat", GOOD, stream=False))
        b.expect("chat", False)
        assert reply.status == 200, reply.body
        assert json.loads(reply.body)["choices"][0]["message"]["content"] == GOOD_TEXT
        if not slow.done():
            meanwhile += 1
        await asyncio.sleep(0.1)
    assert meanwhile >= 1, "a slow body held up every other client"


async def slow_loris(b: Bench) -> None:
    """A client sends its ~100-byte body a byte every 20 ms (~2 s); it is answered correctly (or
    refused with a 4xx), and everyone else is served at full speed meanwhile."""
    slow = asyncio.create_task(loris(b.fe, GOOD_CHAT, finish=True))
    await serve_meanwhile(b, slow)
    response = await slow
    status = int(response.split(b"\r\n", 1)[0].split()[1])
    if status == 200:
        b.expect("chat", False)
        answer = json.loads(response.split(b"\r\n\r\n", 1)[1])
        assert answer["choices"][0]["message"]["content"] == GOOD_TEXT
    else:
        assert status in (400, 408, 413), response[:300]
    await b.assert_invariants("slow-loris")


async def test_a_slow_loris_that_hangs_up_mid_body_is_a_cancellation(tmp_path: Path) -> None:
    # Expected: other clients served meanwhile; the abandoned request, if a handler saw it, is
    # counted once as `cancelled`; nothing leaks.
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        bad_workers(good={"behaviour": "ok"}) as w,
        bench(tmp_path, w["good"], {}) as b,
    ):

        async def abandoned() -> None:
            slow = asyncio.create_task(loris(b.fe, GOOD_CHAT, finish=False))
            await serve_meanwhile(b, slow)
            await slow
            await b.fe.app.wait_until_idle()
            extra = b.requests_total() - b.ledger
            assert set(extra) <= {key("chat", False, "cancelled")}, dict(extra)
            b.ledger += extra
            await b.assert_invariants("slow-loris-abandoned")

        await b.run("slow-loris-abandoned", abandoned)
        b.assert_no_failures()
    assert not net.expired()


# --- 2b. worker faults with migration on ---------------------------------------------------------

# With ``DYN_MIGRATION_LIMIT=1`` the model "m" has two workers, the faulty one first and a healthy
# ``ok`` one second; round-robin sends the (first) request to the faulty one. The ``ok`` worker
# reports no prompt token ids, so the replay is a text continuation, and it answers every request
# with its own ``tok0..tok4`` whatever the prompt: the client sees what the faulty worker sent
# before it failed, then the ``ok`` worker's whole text. No ``max_tokens`` is set, so nothing caps
# the replay.
MIGRATION_ON = {**LIMITS, "DYN_MIGRATION_LIMIT": "1"}

# fault -> (worker spec, what the faulty worker sent before failing, migration_type; None: the
# request moved, but that was no migration)
MIGRATABLE: dict[str, tuple[dict[str, Any], str, str | None]] = {
    # connect refused: nothing was sent; the dispatch is retried elsewhere whatever the limit,
    # and not counted as a migration
    "refuses-connections": ({"behaviour": "refuse"}, "", None),
    # accepts, never a byte: the router's first-token limit quarantines it, the request moves
    "never-answers": ({"behaviour": "zombie"}, "", "new_request"),
    # FEW=3 tokens, then the body ends without [DONE]
    "stops-mid-stream": ({"behaviour": "stop-mid-stream"}, "tok0tok1tok2", "ongoing_request"),
    # one token, then SIGKILL while it holds the second
    "sigkill-mid-stream": (
        {"behaviour": "ok", "tokens": 3, "gap": HOLD}, "tok0", "ongoing_request",
    ),
}  # fmt: skip
# Not migratable (the worker's own failure): the same outcome as with migration off
# (WORKER_FAULTS), the ``ok`` worker never sees the request, ``model_migration_total`` stays 0.
NOT_MIGRATABLE = ("answers-500", "malformed-sse")


def texts_by_choice(reply: Reply, stream: bool) -> list[str]:
    """The text of each choice of ``reply``, by index."""
    out: dict[int, str] = {}
    if not stream:
        for c in json.loads(reply.body)["choices"]:
            out[c["index"]] = c.get("text") or c.get("message", {}).get("content") or ""
    else:
        for event in reply.body.split(b"\n\n"):
            if event.startswith(b"data: {"):
                for c in json.loads(event[6:])["choices"]:
                    text = c.get("text") or c.get("delta", {}).get("content") or ""
                    out[c["index"]] = out.get(c["index"], "") + text
    return [out[i] for i in sorted(out)]


async def tokens_reached(b: Bench, wanted: float) -> None:
    """Wait until the frontend has passed ``wanted`` tokens to its clients in all.

    ``output_tokens_total`` is the frontend's own in-process state, counted as each item
    reaches the client path; no event announces it, so it is re-read every few milliseconds.
    """
    async with asyncio.timeout(5):
        while b.fe.value("output_tokens_total") < wanted:
            await asyncio.sleep(0.005)


async def arrived_at(worker: BadWorker, ids: list[str]) -> list[str]:
    """Which of ``ids`` ``worker`` has seen, once at least one has arrived."""
    async with asyncio.timeout(5):
        while True:
            seen = [s["id"] for s in (await worker.record())["requests"] if s["id"] in ids]
            if seen:
                return seen
            await asyncio.sleep(0.01)


async def migrated_case(
    b: Bench, bad: BadWorker, good: BadWorker, *, name: str, kind: str, stream: bool
) -> None:
    _, sent_before, migration_type = MIGRATABLE[name]
    case = f"migrate/{name}/{kind}/{'stream' if stream else 'unary'}"
    request_id = rid()
    ids = upstream_ids(kind, request_id)
    body = payload(kind, "m", stream=stream)
    b.expect(kind, stream)
    if name == "sigkill-mid-stream":
        # Kill once the faulty worker's first token has reached the frontend (it then holds the
        # second); the other choices of a batch come from the ``ok`` worker, whole.
        wanted = b.fe.value("output_tokens_total") + 1 + GOOD_TEXT.count("tok") * (len(ids) - 1)
        task = asyncio.create_task(send(b.fe, body, {"X-Request-Id": request_id}))
        on_bad = await arrived_at(bad, ids)
        await tokens_reached(b, wanted)
        await bad.kill()
        reply = await task
    else:
        reply = await send(b.fe, body, {"X-Request-Id": request_id})
        on_bad = [ids[0]] if name == "refuses-connections" else await arrived_at(bad, ids)
    assert reply.status == 200, (case, reply.body[-300:])
    if stream:
        assert reply.body.count(b"data: [DONE]") == 1 and reply.done, (case, reply.body[-300:])
        assert b"event: error" not in reply.body, (case, reply.body[-300:])
    # Round-robin: exactly one (sub-)request went to the faulty worker first.
    assert len(on_bad) == 1, (case, on_bad)
    want = [GOOD_TEXT] * len(ids)
    want[ids.index(on_bad[0])] = sent_before + GOOD_TEXT
    assert texts_by_choice(reply, stream) == want, (case, reply.body[-600:])
    if migration_type is None:
        assert b.fe.value("model_migration_total") == 0, case
    else:
        assert b.fe.value("model_migration_total", migration_type=migration_type) == 1, case
        assert b.fe.value("model_migration_total") == 1, case
    assert b.fe.worker(bad.url).quarantined, f"{case}: the faulty worker is not quarantined"
    assert not b.fe.worker(good.url).quarantined, case
    assert b.fe.value("disconnected_clients") == 0, case
    await b.assert_invariants(case)


async def test_worker_faults_with_migration_on(tmp_path: Path) -> None:
    specs = {name: spec for name, (spec, _, _) in MIGRATABLE.items()}
    specs |= {name: WORKER_FAULTS[name][0] for name in NOT_MIGRATABLE}
    async with (
        asyncio.timeout(120) as net,
        bad_workers(good={"behaviour": "ok"}, ok={"behaviour": "ok"}, **specs) as w,
    ):
        failures: list[str] = []
        ok_worker = w["ok"]
        for name in (*MIGRATABLE, *NOT_MIGRATABLE):
            bad = w[name]
            for kind in ENDPOINTS:
                for mode in MODES:
                    stream = mode == "stream"
                    # A fresh frontend: the fault quarantines the faulty worker, which would
                    # decide the next case (and round-robin starts again at the faulty one).
                    models = {"m": [bad.url, ok_worker.url]}
                    # The test reads the faulty worker's record too (unless it refuses): open
                    # that session in the warm-up, before the baseline.
                    warm = (ok_worker,) if name == "refuses-connections" else (ok_worker, bad)
                    async with bench(tmp_path, w["good"], models, *warm, env=MIGRATION_ON) as b:
                        if name in MIGRATABLE:
                            case = f"migrate/{name}/{kind}/{mode}"
                            body = functools.partial(
                                migrated_case, b, bad, ok_worker, name=name, kind=kind,
                                stream=stream,
                            )  # fmt: skip
                        else:
                            case = f"migrate-off-by-cause/{name}/{kind}/{mode}"
                            body = functools.partial(
                                not_migrated_case, b, bad, ok_worker, name=name, kind=kind,
                                stream=stream, case=case,
                            )  # fmt: skip
                        await b.run(case, body)
                        failures += b.failures
                    if name == "sigkill-mid-stream":
                        await bad.restart()
        assert not failures, "\n" + "\n".join(failures)
    assert not net.expired()


async def not_migrated_case(
    b: Bench, bad: BadWorker, good: BadWorker, *, name: str, kind: str, stream: bool, case: str
) -> None:
    expected = outcome_for(WORKER_FAULTS[name][1], kind, "stream" if stream else "unary")
    await worker_fault_case(b, bad, kind=kind, stream=stream, expected=expected, case=case)
    # No sub-request the faulty worker had was retried on the ``ok`` one. (Round-robin may have
    # sent the second prompt of a batch there in the first place.)
    on_bad = {s["id"] for s in (await bad.record())["requests"]}
    on_ok = {s["id"] for s in (await good.record())["requests"]}
    assert on_bad and not on_bad & on_ok, f"{case}: retried on the ok worker: {on_bad & on_ok}"
    assert b.fe.value("model_migration_total") == 0, case


async def read_text(client: RawClient, text: str) -> None:
    """Read a completions stream until its text so far is ``text``."""
    seen = ""
    while seen != text:
        line = await client.reader.readline()
        assert line and line != b"data: [DONE]\n", f"the stream ended after {seen!r}"
        if line.startswith(b"data: {"):
            seen += "".join(c["text"] for c in json.loads(line[6:])["choices"])
            assert text.startswith(seen), f"{seen!r} is not the start of {text!r}"


async def test_a_client_hang_up_during_a_migrated_stream_reaches_the_replay(
    tmp_path: Path,
) -> None:
    # "m": a worker that stops after 3 tokens, then one that streams its tokens HOLD s apart. The
    # client reads the 3 tokens and the replay's first one, then hangs up. Expected: the replay's
    # worker records the disconnect; one migration (ongoing_request); one request, cancelled.
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        bad_workers(
            good={"behaviour": "ok"},
            stops={"behaviour": "stop-mid-stream"},
            steady={"behaviour": "ok", "tokens": 5, "gap": HOLD},
        ) as w,
    ):
        models = {"m": [w["stops"].url, w["steady"].url]}
        # Default router limits: the replay's worker is silent for HOLD s, and must not time out.
        env = {"DYN_MIGRATION_LIMIT": "1"}
        async with bench(tmp_path, w["good"], models, w["steady"], env=env) as b:

            async def hang_up() -> None:
                request_id = rid()
                body = payload("completions", "m", stream=True)
                client = await RawClient.send(b.fe, body, {"X-Request-Id": request_id})
                b.expect("completions", True, "cancelled")
                # tok0 tok1 tok2 from "stops", then tok0 from the replay (events may coalesce)
                await read_text(client, "tok0tok1tok2tok0")
                replay = [s["id"] for s in (await w["steady"].record())["requests"]]
                assert len(replay) == 1, replay
                client.hang_up()
                await b.assert_invariants("migrated-hang-up", (w["steady"], replay))
                assert b.fe.value("model_migration_total", migration_type="ongoing_request") == 1
                assert b.fe.value("model_migration_total") == 1
                assert b.fe.value("disconnected_clients") == 1
                assert b.fe.value("requests_total", error_type="cancelled") == 1

            await b.run("migrated-hang-up", hang_up)
            b.assert_no_failures()
    assert not net.expired()
