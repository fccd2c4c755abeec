"""Round-robin vs approximate ``kv`` vs precise ``kv``: a multi-turn shared-prefix workload over
four mocker workers with a small KV cache, routed by two frontends at once.

For each mode, in one run and in this order (``--modes``), the script starts fresh processes:

- **4 workers** (``dynamo-llm worker --engine mocker``, ``--workers``) with
  ``--num-gpu-blocks-override`` ``--kv-blocks`` (default 512 blocks of 16 tokens: 8 192 tokens
  each, 32 768 in all, for about 20 000 tokens of the 16 conversations in flight), so they
  evict. ``--speedup-ratio 1``: the mocker's timing model as fitted to vLLM on one GPU
  (prefill ~16.5 ms + 15 µs per uncached token, a decode step 6-34 ms with the KV use), so a
  prefix-cache hit shortens the TTFT as it would on the GPU. In ``precise`` mode they publish
  their KV events (``--kv-events-port 0``); in the other modes they do not.
- **2 frontends** (``dynamo-llm serve --upstream-file``) routing the same four workers:
  ``--router-mode round-robin`` or ``kv``; in ``precise`` mode the upstream file names each
  worker's KV event endpoints, in ``approximate`` mode it does not (the frontend guesses from
  the text it routed). The script waits until both frontends list the model (and, precise, see
  every worker as ``kv_mode: precise`` in ``/health``).

The workload (seeded, the same in every mode): ``--conversations`` conversations (default 48),
at most ``--concurrency`` at a time (16), each ``--turns`` turns (10). A conversation opens with
one of ``--system-prompts`` shared system prompts (3, of ``--system-words`` words: 200); each
turn appends a user message of ``--user-words`` words (150) and sends the whole history as a
streamed chat completion of ``--max-tokens`` tokens (16); the reply joins the history. Turn ``t`` of
conversation ``c`` goes to frontend ``(c + t) % 2``: the turns of one conversation alternate
between the frontends, as behind a load balancer without affinity, so each frontend sees half
of any conversation's traffic (``--sticky`` keeps a conversation on one frontend instead).

Reported per mode:

- the **prefix-cache hit rate from the workers' own counters**: the sum over the workers of
  ``dynamo_mocker_prefix_cache_hits_total`` over ``dynamo_mocker_prefix_cache_queries_total``
  (prompt tokens found in the cache / looked up at admission, readmissions after a preemption
  included), and their preemptions;
- the hit rate the clients saw: ``usage.prompt_tokens_details.cached_tokens`` over
  ``prompt_tokens``, each request's first admission only;
- **TTFT** (send to the first content chunk) mean and p99, request latency mean, requests/s
  over the run (the workload is closed-loop, so requests/s is what the latency allows);
- each core's busy share over the run (all processes: the machine is shared).

Cores: the two frontends are pinned to ``--frontend-cpu`` (0), the four workers to
``--worker-cpu`` (1), and this load generator to the worker core. The mocker's passes are
simulated time (sleeps), so its figures stay the model's while neither core is saturated; the
busy shares say whether that held.

Run: ``PYTHONPATH=src .venv/bin/python bench/bench_kv_routing.py`` (``--help`` for the knobs;
under a minute with the defaults on a quiet machine). Exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

import _common
from dynamo_llm.testing.process import ServerProcess

MODEL = "m"
MODES = ("round-robin", "approximate", "precise")


@dataclass
class Tally:
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    errors: list[str] = field(default_factory=list)


# --- the workload -----------------------------------------------------------------------------


def vocabulary(rng: random.Random, n: int = 5000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def words(rng: random.Random, vocab: Sequence[str], n: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


@dataclass(frozen=True)
class Workload:
    systems: tuple[str, ...]
    turns: tuple[tuple[str, ...], ...]  # per conversation, its user messages

    @classmethod
    def build(cls, args: argparse.Namespace) -> Workload:
        rng = random.Random(args.seed)
        vocab = vocabulary(rng)
        systems = tuple(
            f"System prompt {i}. " + words(rng, vocab, args.system_words)
            for i in range(args.system_prompts)
        )
        turns = tuple(
            tuple(
                f"Conversation {c}, turn {t}. " + words(rng, vocab, args.user_words)
                for t in range(args.turns)
            )
            for c in range(args.conversations)
        )
        return cls(systems, turns)


async def stream_turn(
    session: aiohttp.ClientSession,
    url: str,
    messages: list[dict[str, str]],
    args: Any,
    tally: Tally,
) -> str | None:
    """One streamed chat completion: the reply's text, or None after recording an error."""
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": args.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    usage: dict[str, Any] | None = None
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            if response.status != 200:
                tally.errors.append(f"HTTP {response.status}: {(await response.text())[:200]}")
                return None
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    tally.errors.append(str(chunk["error"])[:200])
                    return None
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", ()):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        if first is None:
                            first = time.perf_counter()
                        parts.append(text)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        tally.errors.append(f"{type(exc).__name__}: {exc}")
        return None
    end = time.perf_counter()
    if first is None or usage is None:
        tally.errors.append("no content or no usage")
        return None
    tally.ttft.append(first - start)
    tally.latency.append(end - start)
    tally.prompt_tokens += usage["prompt_tokens"]
    tally.cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return "".join(parts)


async def converse(
    session: aiohttp.ClientSession,
    frontends: Sequence[str],
    workload: Workload,
    c: int,
    *,
    args: Any,
    tally: Tally,
) -> None:
    messages = [{"role": "system", "content": workload.systems[c % len(workload.systems)]}]
    for t, user in enumerate(workload.turns[c]):
        messages.append({"role": "user", "content": user})
        url = frontends[c % 2 if args.sticky else (c + t) % 2]
        reply = await stream_turn(session, url, messages, args, tally)
        if reply is None:
            return
        messages.append({"role": "assistant", "content": reply})


async def run_workload(frontends: Sequence[str], workload: Workload, args: Any) -> Tally:
    tally = Tally()
    slots = asyncio.Semaphore(args.concurrency)
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=60)
    connector = aiohttp.TCPConnector(limit=2 * args.concurrency)

    async def one(c: int) -> None:
        async with slots:
            await converse(session, frontends, workload, c, args=args, tally=tally)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(one(c) for c in range(len(workload.turns))))
    return tally


# --- the processes ----------------------------------------------------------------------------


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        return await response.json(content_type=None)


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def start_all(argvs: Sequence[Sequence[str]], cpu: int) -> list[ServerProcess]:
    procs: list[ServerProcess] = []
    try:
        for argv in argvs:  # one at a time: a start-up costs ~1 s of CPU, the core is shared
            procs.append(_common.start_server(argv, cpu, ready_within=120))
    except BaseException:
        stop_all(procs)
        raise
    return procs


def stop_all(procs: Sequence[ServerProcess]) -> None:
    for proc in procs:
        proc.stop()


async def wait_routable(
    session: aiohttp.ClientSession, frontends: Sequence[str], workers: int, precise: bool
) -> None:
    deadline = time.monotonic() + 60
    while True:
        ready = 0
        for url in frontends:
            health = await get_json(session, f"{url}/health")
            models = {m.get("model"): m for m in health.get("models", ())}
            described = models.get(MODEL, {}).get("workers", [])
            modes = [w.get("kv_mode") for w in described]
            if len(described) == workers and (not precise or modes.count("precise") == workers):
                ready += 1
        if ready == len(frontends):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the frontends did not see {workers} workers within 60 s")
        await asyncio.sleep(0.2)


async def run_mode(mode: str, workload: Workload, args: Any, tmp: Path) -> dict[str, Any]:
    precise = mode == "precise"
    worker_argv = [
        "worker",
        "--engine",
        "mocker",
        "--model-name",
        MODEL,
        "--http-port",
        "0",
        "--block-size",
        str(args.block_size),
        "--num-gpu-blocks-override",
        str(args.kv_blocks),
        "--speedup-ratio",
        str(args.speedup_ratio),
    ]
    if precise:
        worker_argv += ["--kv-events-port", "0"]
    workers = await asyncio.to_thread(start_all, [worker_argv] * args.workers, args.worker_cpu)
    frontends: list[ServerProcess] = []
    try:
        async with aiohttp.ClientSession() as session:
            entries: list[dict[str, Any]] = []
            for proc in workers:
                assert proc.url is not None
                entry: dict[str, Any] = {"url": proc.url}
                if precise:
                    model = (await get_json(session, f"{proc.url}/health"))["models"][0]
                    entry["kv_events_endpoint"] = model["kv_events_endpoint"]
                    entry["kv_events_replay_endpoint"] = model["kv_events_replay_endpoint"]
                entries.append(entry)
            upstreams = tmp / f"upstreams-{mode}.json"
            upstreams.write_text(json.dumps({MODEL: entries}))
            router_mode = "round-robin" if mode == "round-robin" else "kv"
            fe_argv = [
                "serve",
                "--upstream-file",
                str(upstreams),
                "--router-mode",
                router_mode,
                "--http-port",
                "0",
            ]
            frontends = await asyncio.to_thread(start_all, [fe_argv] * 2, args.frontend_cpu)
            urls = [p.url for p in frontends if p.url is not None]
            await wait_routable(session, urls, args.workers, precise)
            before = _common.core_ticks()
            start = time.perf_counter()
            tally = await run_workload(urls, workload, args)
            took = time.perf_counter() - start
            after = _common.core_ticks()
            counters = [await scrape(session, p.url or "") for p in workers]
    finally:
        await asyncio.to_thread(stop_all, [*frontends, *workers])
    hits = sum(c.get("dynamo_mocker_prefix_cache_hits_total", 0.0) for c in counters)
    queries = sum(c.get("dynamo_mocker_prefix_cache_queries_total", 0.0) for c in counters)
    preemptions = sum(c.get("dynamo_mocker_preemptions_total", 0.0) for c in counters)
    n = len(tally.ttft)
    return {
        "mode": mode,
        "requests": n,
        "errors": tally.errors,
        "hit_rate": hits / queries if queries else float("nan"),
        "hit_tokens": hits,
        "queried_tokens": queries,
        "client_hit_rate": tally.cached_tokens / tally.prompt_tokens if n else float("nan"),
        "preemptions": preemptions,
        "ttft_mean": statistics.fmean(tally.ttft) if n else float("nan"),
        "ttft_p50": _common.percentile(tally.ttft, 50),
        "ttft_p99": _common.percentile(tally.ttft, 99),
        "latency_mean": statistics.fmean(tally.latency) if n else float("nan"),
        "req_per_s": n / took,
        "seconds": took,
        "core_busy": {
            cpu: round(_common.core_usage(before, after, cpu)[0], 1)
            for cpu in sorted({args.frontend_cpu, args.worker_cpu})
        },
    }


def print_table(results: Sequence[dict[str, Any]]) -> None:
    print()
    print(
        "| mode | requests | prefix-cache hit rate (workers' counters) | hit rate (clients' "
        "usage) | preemptions | TTFT mean | TTFT p50 | TTFT p99 | latency mean | req/s | "
        "core busy (frontends / workers) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        busy = " / ".join(f"{v:.0f} %" for v in r["core_busy"].values())
        print(
            f"| {r['mode']} | {r['requests']} | **{100 * r['hit_rate']:.1f} %** "
            f"| {100 * r['client_hit_rate']:.1f} % | {r['preemptions']:.0f} "
            f"| **{1000 * r['ttft_mean']:.0f} ms** | {1000 * r['ttft_p50']:.0f} ms "
            f"| {1000 * r['ttft_p99']:.0f} ms | {1000 * r['latency_mean']:.0f} ms "
            f"| {r['req_per_s']:.1f} | {busy} |"
        )


async def amain(args: argparse.Namespace) -> int:
    _common.check_cores(args.frontend_cpu, args.worker_cpu)
    _common.pin_self(args.worker_cpu)
    workload = Workload.build(args)
    print(
        f"{args.workers} mocker workers x {args.kv_blocks} blocks of {args.block_size} tokens "
        f"({args.kv_blocks * args.block_size} tokens each), speedup {args.speedup_ratio}; "
        f"2 frontends; {args.conversations} conversations x {args.turns} turns, "
        f"{args.concurrency} at a time, {args.system_prompts} shared system prompts, turns "
        f"{'kept on one frontend' if args.sticky else 'alternating between the frontends'}"
    )
    print(
        f"cores: frontends on core {args.frontend_cpu}; workers and this load generator on "
        f"core {args.worker_cpu}; {_common.cpu_model()}, Python {sys.version.split()[0]}"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-kv-routing-") as tmp:
        for mode in args.modes:
            result = await run_mode(mode, workload, args, Path(tmp))
            print(
                f"{mode}: {result['requests']} requests in {result['seconds']:.1f} s, "
                f"{len(result['errors'])} errors",
                flush=True,
            )
            for error in result["errors"][:5]:
                print(f"  error: {error}")
            results.append(result)
    print_table(results)
    if args.json:
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(results, indent=2))
    return 1 if any(r["errors"] for r in results) else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--kv-blocks", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--speedup-ratio", type=float, default=1.0)
    parser.add_argument("--conversations", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--system-prompts", type=int, default=3)
    parser.add_argument("--system-words", type=int, default=200)
    parser.add_argument("--user-words", type=int, default=150)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--sticky", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frontend-cpu", type=int, default=0)
    parser.add_argument("--worker-cpu", type=int, default=1)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    sys.exit(asyncio.run(amain(args)))


if __name__ == "__main__":
    main()
