"""Tokens per second the in-process mocker sustains through the frontend, and its CPU per token.

``dynamo-llm serve`` with its default engine, the mocker, at ``--speedup-ratio 1000`` (so the
simulated GPU is never the limit: a decode pass of a 256-request batch is modelled at about
10 us) runs as a child process pinned to one core (``--server-cpu``, default 0); this load
generator (aiohttp) pins itself to another (``--client-cpu``, default 1). ``--concurrency``
closed-loop clients (default 256, the mocker's ``max_num_seqs``) each stream a chat completion
of ``--max-tokens`` tokens (default 200) for a prompt of ``--prompt-words`` words that no other
request shares (no prefix-cache hits), read it to ``[DONE]`` and send the next at once.

Over a window of ``--duration`` seconds after ``--warmup`` seconds, the script counts every
streamed token as it arrives and reads the server's CPU time (user + system, every thread, from
``/proc/<pid>/stat``), its own, and the mocker's pass counter (``dynamo_mocker_passes_total``),
and prints:

- streamed tokens/s: what one core running the frontend and the mocker together sustains;
- the server's CPU microseconds per streamed token (the mocker's scheduler included: it runs in
  the same process and event loop);
- scheduler passes/s and tokens per pass (the batch actually running), set against the pass
  time the mocker's model predicts at the observed KV usage, divided by the speedup;
- request latency and TTFT percentiles, and how busy each of the two cores was.

Every response is checked (HTTP 200, exactly ``--max-tokens`` content chunks, a usage chunk
saying so, no error event, ``[DONE]``); any failure makes the script exit with status 1.

Run: ``.venv/bin/python bench/bench_mocker.py`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

import _common
from dynamo_llm.engines.endpoints import CHAT
from dynamo_llm.engines.mocker import MockerConfig, MockerEngine, decode_ms
from dynamo_llm.protocols.chat import decode_chat_request
from dynamo_llm.runtime.context import EngineContext

MODEL = "mocker"
HEADERS = {"content-type": "application/json"}
CONTENT_MARK = b'"content":"'
DONE_LINE = b"data: [DONE]\n"


@dataclass
class Tally:
    measuring: bool = False
    tokens: int = 0  # content chunks received while measuring
    requests: int = 0  # requests completed while measuring
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def stream_once(
    session: aiohttp.ClientSession, url: str, body: bytes, max_tokens: int, tally: Tally
) -> None:
    t0 = time.perf_counter()
    ttft = -1.0
    chunks = 0
    tail = b""
    done = False
    usage_ok = False
    async with session.post(url, data=body, headers=HEADERS) as resp:
        if resp.status != 200:
            raise ValueError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        while data := await resp.content.readany():
            cut = data.rfind(b"\n")
            if cut < 0:
                tail += data
                continue
            lines, tail = tail + data[: cut + 1], data[cut + 1 :]
            n = lines.count(CONTENT_MARK)
            if n:
                if ttft < 0:
                    ttft = time.perf_counter() - t0
                chunks += n
                if tally.measuring:
                    tally.tokens += n
            if b"event: error" in lines:
                raise ValueError(f"error event: {lines[:300]!r}")
            if b'"usage":' in lines:
                usage_ok = f'"completion_tokens":{max_tokens},'.encode() in lines
            done = done or DONE_LINE in lines
    if not done or chunks != max_tokens or not usage_ok:
        raise ValueError(
            f"{chunks} content chunks (want {max_tokens}), usage ok {usage_ok}, [DONE] {done}"
        )
    if tally.measuring:
        tally.requests += 1
        tally.latencies.append(time.perf_counter() - t0)
        tally.ttfts.append(ttft)


def chat_body(args: argparse.Namespace, cid: int, k: int) -> bytes:
    words = " ".join(f"c{cid}r{k}w{i}" for i in range(args.prompt_words))  # never shared
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": words}],
            "max_tokens": args.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


async def client(
    cid: int,
    session: aiohttp.ClientSession,
    url: str,
    args: argparse.Namespace,
    *,
    stop: asyncio.Event,
    tally: Tally,
) -> None:
    k = 0
    while not stop.is_set():
        k += 1
        body = chat_body(args, cid, k)
        try:
            await stream_once(session, url, body, args.max_tokens, tally)
        except (ValueError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            tally.errors.append(f"{type(exc).__name__}: {exc}")
            if len(tally.errors) <= 10:
                print(f"request error: {tally.errors[-1]}", file=sys.stderr)
            await asyncio.sleep(0.01)


async def scrape(session: aiohttp.ClientSession, base_url: str) -> dict[str, float]:
    async with session.get(f"{base_url}/metrics") as resp:
        text = await resp.text()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("dynamo_mocker_")
    }


async def sample(
    session: aiohttp.ClientSession, base_url: str, out: list[dict[str, float]]
) -> None:
    """Scrape the scheduler state every 0.5 s until cancelled (a scrape is ~1 ms of server CPU)."""
    while True:
        out.append(await scrape(session, base_url))
        await asyncio.sleep(0.5)


async def run(args: argparse.Namespace, base_url: str, pid: int) -> dict[str, Any]:
    url = f"{base_url}/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        stop = asyncio.Event()
        tally = Tally()
        tasks = [
            asyncio.create_task(client(i, session, url, args, stop=stop, tally=tally))
            for i in range(args.concurrency)
        ]
        await asyncio.sleep(args.warmup)
        m0 = await scrape(session, base_url)
        t0 = time.perf_counter()
        server0, client0, cores0 = (
            _common.proc_cpu_seconds(pid),
            _common.self_cpu_seconds(),
            _common.core_ticks(),
        )
        tally.measuring = True
        samples: list[dict[str, float]] = []
        sampler = asyncio.create_task(sample(session, base_url, samples))
        await asyncio.sleep(args.duration)
        tally.measuring = False
        sampler.cancel()
        await asyncio.wait([sampler])
        t1 = time.perf_counter()
        server1, client1, cores1 = (
            _common.proc_cpu_seconds(pid),
            _common.self_cpu_seconds(),
            _common.core_ticks(),
        )
        m1 = await scrape(session, base_url)
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=60)
        for task in pending:
            task.cancel()
        if pending:
            tally.errors.append(f"{len(pending)} clients still streaming 60 s after the window")
            await asyncio.wait(pending)

    elapsed = t1 - t0
    server_cpu = server1 - server0
    passes = m1["dynamo_mocker_passes_total"] - m0["dynamo_mocker_passes_total"]
    usage = sum(m["dynamo_mocker_kv_cache_usage_ratio"] for m in samples) / len(samples)
    running = sum(m["dynamo_mocker_running_requests"] for m in samples) / len(samples)
    modelled_pass_us = decode_ms(usage) / args.speedup_ratio * 1000
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"nproc": os.cpu_count(), "cpu_model": _common.cpu_model()},
        "core_split": {"server": args.server_cpu, "load_generator": args.client_cpu},
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "prompt_words": args.prompt_words,
        "speedup_ratio": args.speedup_ratio,
        "duration_s": elapsed,
        "tokens": tally.tokens,
        "tokens_per_s": tally.tokens / elapsed,
        "requests": tally.requests,
        "requests_per_s": tally.requests / elapsed,
        "server_cpu_s": server_cpu,
        "server_cpu_us_per_token": server_cpu * 1e6 / tally.tokens if tally.tokens else math.nan,
        "server_cpu_pct": 100 * server_cpu / elapsed,
        "client_cpu_pct": 100 * (client1 - client0) / elapsed,
        "server_core_busy_pct": _common.core_usage(cores0, cores1, args.server_cpu)[0],
        "client_core_busy_pct": _common.core_usage(cores0, cores1, args.client_cpu)[0],
        "passes_per_s": passes / elapsed,
        "tokens_per_pass": tally.tokens / passes if passes else math.nan,
        "wall_us_per_pass": elapsed * 1e6 / passes if passes else math.nan,
        "modelled_us_per_pass": modelled_pass_us,
        "kv_cache_usage": usage,
        "mean_running_requests": running,
        "latency_ms": {
            "p50": _common.percentile(tally.latencies, 50) * 1000,
            "p99": _common.percentile(tally.latencies, 99) * 1000,
        },
        "ttft_ms": {
            "p50": _common.percentile(tally.ttfts, 50) * 1000,
            "p99": _common.percentile(tally.ttfts, 99) * 1000,
        },
        "errors": len(tally.errors),
    }


async def engine_alone(args: argparse.Namespace) -> dict[str, float]:
    """The same load on a bare ``MockerEngine`` in this process: no HTTP, no frontend."""
    engine = MockerEngine(
        MockerConfig(speedup_ratio=args.speedup_ratio, max_num_seqs=max(256, args.concurrency))
    )

    async def stream(cid: int) -> int:
        tokens = 0
        for k in range(args.engine_requests):
            params = decode_chat_request(chat_body(args, cid, k))
            rid = f"c{cid}r{k}"
            request = CHAT.request(params, id=rid, model=MODEL, max_tokens=args.max_tokens)
            async for out in await engine.generate(request, EngineContext(rid)):
                tokens += out.num_tokens
        return tokens

    t0, c0 = time.perf_counter(), _common.self_cpu_seconds()
    try:
        tokens = sum(await asyncio.gather(*(stream(i) for i in range(args.concurrency))))
    finally:
        await engine.aclose()
    elapsed, cpu = time.perf_counter() - t0, _common.self_cpu_seconds() - c0
    return {"tokens_per_s": tokens / elapsed, "cpu_us_per_token": cpu * 1e6 / tokens}


def report(r: dict[str, Any]) -> str:
    split = r["core_split"]
    return "\n".join(
        [
            f"core split: frontend + embedded mocker on core {split['server']}, "
            f"aiohttp load generator on core {split['load_generator']} "
            f"({r['machine']['cpu_model']}, {r['machine']['nproc']} cores)",
            f"{r['concurrency']} concurrent streams x {r['max_tokens']} tokens, speedup "
            f"{r['speedup_ratio']:g}, measured {r['duration_s']:.1f}s",
            f"tokens/s                 {r['tokens_per_s']:10.0f}   ({r['tokens']} tokens)",
            f"frontend CPU per token   {r['server_cpu_us_per_token']:10.2f} us "
            f"(mocker scheduler included)",
            f"requests/s               {r['requests_per_s']:10.1f}",
            f"latency p50 / p99        {r['latency_ms']['p50']:10.1f} / "
            f"{r['latency_ms']['p99']:.1f} ms",
            f"TTFT p50 / p99           {r['ttft_ms']['p50']:10.1f} / {r['ttft_ms']['p99']:.1f} ms",
            f"scheduler passes/s       {r['passes_per_s']:10.0f}   "
            f"({r['tokens_per_pass']:.0f} tokens per pass)",
            f"wall vs modelled pass    {r['wall_us_per_pass']:10.1f} / "
            f"{r['modelled_us_per_pass']:.1f} us (mean KV usage {100 * r['kv_cache_usage']:.1f} %, "
            f"mean running {r['mean_running_requests']:.0f})",
            f"server CPU               {r['server_cpu_pct']:10.1f} % of core {split['server']} "
            f"(core busy {r['server_core_busy_pct']:.1f} %)",
            f"client CPU               {r['client_cpu_pct']:10.1f} % of core "
            f"{split['load_generator']} (core busy {r['client_core_busy_pct']:.1f} %)",
            f"errors                   {r['errors']:10d}",
            f"for scale: the bare engine (no HTTP), same load, core {split['server']}: "
            f"{r['engine_alone']['tokens_per_s']:.0f} tokens/s, "
            f"{r['engine_alone']['cpu_us_per_token']:.2f} us CPU per token",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--concurrency", type=int, default=256, help="concurrent streams")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens per stream")
    p.add_argument("--prompt-words", type=int, default=32, help="words per (unique) prompt")
    p.add_argument("--speedup-ratio", type=float, default=1000.0, help="the mocker's speedup")
    p.add_argument("--duration", type=float, default=15.0, help="measured window, seconds")
    p.add_argument("--warmup", type=float, default=3.0, help="load before the window, seconds")
    p.add_argument("--server-cpu", type=int, default=0, help="core of the server process")
    p.add_argument("--client-cpu", type=int, default=1, help="core of this load generator")
    p.add_argument("--http-interface", choices=("rsgi", "asgi"), default="rsgi")
    p.add_argument(
        "--engine-requests",
        type=int,
        default=5,
        help="requests per stream in the bare-engine comparison run",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.server_cpu == args.client_cpu:
        raise SystemExit("--server-cpu and --client-cpu must differ")
    _common.check_cores(args.server_cpu, args.client_cpu)
    _common.pin_self(args.server_cpu)
    alone = asyncio.run(engine_alone(args))
    server_args = [
        "serve",  # the default engine: the mocker
        "--speedup-ratio",
        str(args.speedup_ratio),
        "--max-num-seqs",
        str(max(256, args.concurrency)),
        "--http-port",
        "0",
        "--http-interface",
        args.http_interface,
        "--log-level",
        "warning",
    ]
    server = _common.start_server(server_args, args.server_cpu)
    _common.pin_self(args.client_cpu)  # after the server's start, which checks its core
    try:
        assert server.url is not None
        results = asyncio.run(run(args, server.url, server.pid))
    finally:
        code = server.stop()
    results["server_exit_code"] = code
    results["engine_alone"] = alone
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if results["errors"] or code != 0:
        print(f"FAILED: {results['errors']} errors, server exit code {code}", file=sys.stderr)
        if code != 0:
            print(server.log[-3000:], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
