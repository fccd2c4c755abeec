"""Soak: the routed frontend under steady load, client hang-ups and a worker killed every 30 s.

::

    .venv/bin/python bench/soak.py [--duration 300] [--rate 20] [--hangup-fraction 0.3]
                                   [--kill-every 30] [--migration-limit 1] [--seed 7]

- Three workers, real processes: ``dynamo-llm worker --engine mocker --speedup-ratio 100
  --seed 7`` on ports the OS chose. Every ``--kill-every`` seconds one of them (in turn) is
  SIGKILLed and started again on the same port.
- The frontend runs **in this process** (``build_routed_app`` on granian, exactly what
  ``dynamo-llm serve --upstream ...`` builds), so that the end of the run can also wait for it to
  be idle; every figure checked is read from its ``/metrics`` over HTTP, as an operator would.
  Migration: ``--migration-limit`` (``DYN_MIGRATION_LIMIT``) when this tree's ``Config`` has it;
  the script says whether it did.
- Load: an open loop at ``--rate`` requests/s (Poisson arrivals), each a chat or completions
  request, streamed or unary, for one of a few prompts and ``max_tokens`` values. A fraction
  (``--hangup-fraction``) of clients hang up: a stream after a random number of events, a unary
  request after a random few milliseconds.
- The mocker is deterministic for a seed, so a fault-free answer is known: before the load
  starts, each distinct (endpoint, prompt, max_tokens) is asked once of a healthy worker,
  directly. Every response that completed during the soak must be exactly that text.

At the end: ``inflight_requests``, ``queued_requests`` and ``worker_inflight_requests`` are all
0; the sum of ``requests_total`` equals the requests sent; no ``internal`` error (none has a
known cause here: the workers are healthy processes that are only ever killed); every completed
text is exact. The figures are printed; the exit status is 1 if an invariant failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from dynamo_llm.config import Config
from dynamo_llm.fleet import build_routed_app
from dynamo_llm.http.server import HttpServer
from dynamo_llm.runtime.clock import SystemClock
from dynamo_llm.testing.process import ServerProcess

MODEL = "soak"
PROMPTS = [
    "tell me about the sea",
    "write a haiku on autumn rain",
    "what is a router",
    "count the stars in the sky tonight please",
    "explain kv caches to a child",
    "a story about a lighthouse keeper",
]
MAX_TOKENS = (24, 96)
ENDPOINTS = ("chat", "completions")


def worker_args(port: int, seed: int) -> list[str]:
    return [
        "worker",
        "--engine",
        "mocker",
        "--speedup-ratio",
        "100",
        "--seed",
        str(seed),
        "--http-port",
        str(port),
        "--model-name",
        MODEL,
    ]


class Workers:
    """The three worker processes; :meth:`bounce` SIGKILLs one and restarts it on its port."""

    def __init__(self, count: int, seed: int) -> None:
        self.seed = seed
        self.procs = [ServerProcess(worker_args(0, seed)) for _ in range(count)]
        self.urls = [p.wait_ready(60) for p in self.procs]
        self.ports = [int(u.rsplit(":", 1)[1]) for u in self.urls]
        self.kills = 0

    async def bounce(self, i: int) -> None:
        await asyncio.to_thread(self.procs[i].stop, 10.0, signal.SIGKILL)
        self.kills += 1
        self.procs[i] = ServerProcess(worker_args(self.ports[i], self.seed))
        await asyncio.to_thread(self.procs[i].wait_ready, 60.0)

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


def payload(endpoint: str, prompt: str, max_tokens: int, *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "stream": stream}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def path(endpoint: str) -> str:
    return "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"


def unary_text(answer: dict[str, Any]) -> str:
    choice = answer["choices"][0]
    return str(choice["message"]["content"] if "message" in choice else choice["text"])


def stream_text(body: bytes) -> tuple[str, bool]:
    """The text of an SSE body, and whether it ended with ``[DONE]`` and no error."""
    out: list[str] = []
    done = False
    for event in body.split(b"\n\n"):
        if event.startswith(b"event: error"):
            return "".join(out), False
        if event == b"data: [DONE]":
            done = True
        elif event.startswith(b"data: {"):
            for c in json.loads(event[6:])["choices"]:
                out.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
    return "".join(out), done


@dataclass
class Tally:
    sent: int = 0
    hangups: int = 0
    completed: int = 0
    wrong: list[str] = field(default_factory=list)
    client_errors: Counter[str] = field(default_factory=Counter)


async def one_request(
    client: httpx.AsyncClient,
    rng: random.Random,
    expected: dict[tuple[str, str, int], str],
    tally: Tally,
    hangup_fraction: float,
) -> None:
    endpoint = rng.choice(ENDPOINTS)
    prompt = rng.choice(PROMPTS)
    max_tokens = rng.choice(MAX_TOKENS)
    stream = rng.random() < 0.5
    hang_up = rng.random() < hangup_fraction
    after_events = rng.randint(1, 20)
    after_ms = rng.uniform(2, 20)
    want = expected[endpoint, prompt, max_tokens]
    body = payload(endpoint, prompt, max_tokens, stream=stream)
    tally.sent += 1
    if hang_up:
        tally.hangups += 1
    try:
        if stream:
            async with client.stream("POST", path(endpoint), json=body) as response:
                if response.status_code != 200:
                    tally.client_errors[str(response.status_code)] += 1
                    await response.aread()
                    return
                chunks = []
                events = 0
                async for chunk in response.aiter_bytes():
                    chunks.append(chunk)
                    events += chunk.count(b"\n\n")
                    if hang_up and events >= after_events:
                        return  # leaving the block closes the connection mid-stream
                text, done = stream_text(b"".join(chunks))
        elif hang_up:
            # A raw socket, so that the request is surely on the wire before the hang-up (an
            # httpx call cancelled early may never have sent it: it would not count as sent).
            await hang_up_unary(client, endpoint, body, after_ms / 1000)
            return
        else:
            response = await client.post(path(endpoint), json=body)
            if response.status_code != 200:
                tally.client_errors[str(response.status_code)] += 1
                return
            text, done = unary_text(response.json()), True
    except httpx.HTTPError as exc:
        tally.client_errors[type(exc).__name__] += 1
        return
    if not done:
        tally.client_errors["stream error frame"] += 1
        return
    tally.completed += 1
    if text != want:
        tally.wrong.append(f"{endpoint} {prompt!r} {max_tokens}: {text[:60]!r} != {want[:60]!r}")


async def hang_up_unary(
    client: httpx.AsyncClient, endpoint: str, body: dict[str, Any], after: float
) -> None:
    url = client.base_url
    _reader, writer = await asyncio.open_connection(url.host, url.port)
    data = json.dumps(body).encode()
    writer.write(
        f"POST {path(endpoint)} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    await writer.drain()
    await asyncio.sleep(after)
    writer.transport.abort()


def scrape(metrics_text: str, prefix: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            name = sample.name.removeprefix(prefix + "_")
            out.setdefault(name, []).append((dict(sample.labels), sample.value))
    return out


async def soak(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    workers = await asyncio.to_thread(Workers, 3, args.mocker_seed)
    env = {"DYN_MIGRATION_LIMIT": str(args.migration_limit)}
    config = Config.from_env(env).replace(upstreams=tuple(workers.urls))
    migration = getattr(config, "migration_limit", None)
    app = build_routed_app(config, SystemClock())
    server = HttpServer(app, "127.0.0.1", 0)
    await server.start()
    tally = Tally()
    failures: list[str] = []
    t_start = time.monotonic()
    try:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=60, limits=limits) as direct:
            # The fault-free answers, straight from a healthy worker.
            expected: dict[tuple[str, str, int], str] = {}
            for endpoint in ENDPOINTS:
                for prompt in PROMPTS:
                    for max_tokens in MAX_TOKENS:
                        body = payload(endpoint, prompt, max_tokens, stream=False)
                        answer = await direct.post(workers.urls[0] + path(endpoint), json=body)
                        answer.raise_for_status()
                        expected[endpoint, prompt, max_tokens] = unary_text(answer.json())
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as client:
            # Discovery asks the workers for their models; the app announces no event for it.
            while not app.models:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            tasks: set[asyncio.Task[None]] = set()
            deadline = time.monotonic() + args.duration
            next_kill = time.monotonic() + args.kill_every
            victim = 0
            bounces: set[asyncio.Task[None]] = set()
            while (now := time.monotonic()) < deadline:
                if now >= next_kill:
                    bounces.add(asyncio.create_task(workers.bounce(victim % 3)))
                    victim += 1
                    next_kill += args.kill_every
                task = asyncio.create_task(
                    one_request(client, rng, expected, tally, args.hangup_fraction)
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(rng.expovariate(args.rate))
            await asyncio.gather(*tasks, *bounces)
            # A request the client hung up on may reach the app after the client's task ended
            # (the server hands it over late on a busy machine): idle is only the end once every
            # request sent has been counted, or the 30 s are up (then the check below fails).
            settle_by = time.monotonic() + 30
            while True:
                await asyncio.wait_for(
                    app.wait_until_idle(), max(0.1, settle_by - time.monotonic())
                )
                metrics_text = (await client.get("/metrics")).text
                m = scrape(metrics_text, app.metrics.prefix)
                totals: Counter[str] = Counter()
                for labels, value in m.get("requests_total", []):
                    totals[labels["error_type"] or "success"] += int(value)
                if sum(totals.values()) >= tally.sent or time.monotonic() > settle_by:
                    break
                await asyncio.sleep(0.05)
        elapsed = time.monotonic() - t_start
        gauges = {
            name: sum(v for _, v in m.get(name, []))
            for name in ("inflight_requests", "queued_requests", "worker_inflight_requests")
        }
        migrations = sum(v for _, v in m.get("model_migration_total", []))
        print(f"soak: {elapsed:.0f} s, {args.rate:g} req/s offered, migration limit {migration}")
        print(f"  sent {tally.sent}, client hang-ups {tally.hangups}, completed {tally.completed}")
        print(f"  worker kills {workers.kills}, migrations {migrations:g}")
        print(f"  requests_total by error_type: {dict(totals)}")
        print(f"  client-visible errors: {dict(tally.client_errors)}")
        print(f"  gauges at the end: {gauges}")
        print(f"  wrong texts: {len(tally.wrong)}")
        if any(gauges.values()):
            failures.append(f"gauges not back to 0: {gauges}")
        if sum(totals.values()) != tally.sent:
            failures.append(f"requests_total {sum(totals.values())} != sent {tally.sent}")
        if totals["internal"]:
            failures.append(f"{totals['internal']} internal errors")
        if tally.completed == 0:
            failures.append("no request completed")
        failures += [f"wrong text: {w}" for w in tally.wrong[:10]]
    finally:
        await app.shutdown(grace=0, kill_wait=5)
        await server.stop()
        await asyncio.to_thread(workers.stop)
    for failure in failures:
        print(f"FAILED: {failure}")
    print("soak: " + ("FAILED" if failures else "passed"))
    return 1 if failures else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second offered")
    parser.add_argument("--hangup-fraction", type=float, default=0.3)
    parser.add_argument("--kill-every", type=float, default=30.0, help="seconds between kills")
    parser.add_argument("--migration-limit", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7, help="the load's random choices")
    parser.add_argument("--mocker-seed", type=int, default=7, help="the workers' --seed")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(soak(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
