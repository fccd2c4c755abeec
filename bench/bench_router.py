"""The router's cost: streamed requests/s through the frontend against the same load sent direct.

A fast fake worker (``python -m dynamo_llm.testing.bad_workers --behaviour ok --tokens 100``: an
aiohttp server that streams ``--tokens`` chat chunks with no delay, then the usage chunk and
``[DONE]``) runs pinned to ``--worker-cpu`` (default 1), the core this load generator pins
itself to as well. ``dynamo-llm serve --upstream <worker>`` runs pinned to ``--frontend-cpu``
(default 0), alone on its core, so its CPU time is the frontend's and nothing else's.

In one run, for ``--rounds`` rounds (default 2), the same closed-loop load (``--concurrency``
clients, default 32, each streaming a chat completion to its end and sending the next at once)
goes first **direct** to the worker, then **through** the frontend, each for ``--warmup`` seconds
uncounted and ``--duration`` seconds measured. Over each measured window the script reads the
CPU time (user + system, every thread, ``/proc/<pid>/stat``) of the frontend, of the worker and
its own, and how busy each core was, and reports:

- streamed requests/s direct and through the frontend, and their **ratio** (through / direct);
- the **frontend's CPU milliseconds per request** (and microseconds per streamed token);
- the worker's and the load generator's CPU per request, for scale, and latency percentiles.

The worker and the load generator share one core in both modes, so the direct figure is what
that core sustains; through the frontend the same core does the same work per request and the
frontend has a core of its own, so the ratio shows how much of that the frontend keeps (1.0: it
is never the bottleneck) and the CPU per request what it costs.

Every response is checked (HTTP 200, exactly ``--tokens`` content chunks, a usage chunk saying
so, no error event, ``[DONE]``); any failure makes the script exit with status 1. ``--unary``
sends unary chats instead (the answer's text and usage checked); with ``--ours`` the fake worker
says it is a ``dynamo-llm worker``, the only kind the frontend asks for a unary answer taken
whole (it streams from any other engine). ``--baseline CHECKOUT`` also
runs ``dynamo-llm`` from another checkout's ``src/`` on the frontend's core, measured in turn
with this one in every round (an A/B in one run, e.g. against a detached worktree of ``main``).

Run: ``.venv/bin/python bench/bench_router.py`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

import _common
from dynamo_llm.testing.process import ServerProcess

MODEL = "bad-model"  # the fake worker's model name, learned by the frontend from /v1/models
HEADERS = {"content-type": "application/json"}
CONTENT_MARK = b'"content":"tok'
DONE_LINE = b"data: [DONE]\n"


# --- the fake worker --------------------------------------------------------------------------


class FakeWorker:
    """The ``ok`` bad worker as a child process; its URL from its first line.

    It inherits this process's affinity: pin this process first (:func:`_common.pin_self`).
    """

    def __init__(self, tokens: int, gap_ms: float = 0.0, *, ours: bool = False) -> None:
        args = [
            sys.executable,
            "-m",
            "dynamo_llm.testing.bad_workers",
            "--behaviour",
            "ok",
            "--tokens",
            str(tokens),
            "--port",
            "0",
            "--model",
            MODEL,
            "--gap",
            str(gap_ms / 1000),
            *(("--owned-by", "dynamo-llm") if ours else ()),
        ]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"the fake worker did not start: {line!r}")
        self.url = line.removeprefix("listening on ")
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# --- the load ---------------------------------------------------------------------------------


@dataclass
class Tally:
    measuring: bool = False
    requests: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def stream_once(
    session: aiohttp.ClientSession, url: str, body: bytes, tokens: int, tally: Tally
) -> None:
    t0 = time.perf_counter()
    ttft = -1.0
    chunks = 0
    tail = b""
    done = usage_ok = False
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
            if b"event: error" in lines:
                raise ValueError(f"error event: {lines[:300]!r}")
            if b'"usage":' in lines:
                usage_ok = f'"completion_tokens":{tokens},'.encode() in lines
            done = done or DONE_LINE in lines
    if not done or chunks != tokens or not usage_ok:
        raise ValueError(
            f"{chunks} content chunks (want {tokens}), usage ok {usage_ok}, [DONE] {done}"
        )
    if tally.measuring:
        tally.requests += 1
        tally.latencies.append(time.perf_counter() - t0)
        tally.ttfts.append(ttft)


async def unary_once(
    session: aiohttp.ClientSession, url: str, body: bytes, tokens: int, tally: Tally
) -> None:
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers=HEADERS) as resp:
        data = await resp.read()
        if resp.status != 200:
            raise ValueError(f"HTTP {resp.status}: {data[:300]!r}")
    answer = json.loads(data)
    content = answer["choices"][0]["message"]["content"]
    want = "".join(f"tok{i}" for i in range(tokens))
    if content.replace(" ", "") != want or answer["usage"]["completion_tokens"] != tokens:
        raise ValueError(f"content {content[:100]!r} (want {want[:100]!r}), {answer['usage']}")
    if tally.measuring:
        tally.requests += 1
        elapsed = time.perf_counter() - t0
        tally.latencies.append(elapsed)
        tally.ttfts.append(elapsed)


async def client(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    tokens: int,
    *,
    stop: asyncio.Event,
    tally: Tally,
    unary: bool = False,
) -> None:
    once = unary_once if unary else stream_once
    while not stop.is_set():
        try:
            await once(session, url, body, tokens, tally)
        except (ValueError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            tally.errors.append(f"{type(exc).__name__}: {exc}")
            if len(tally.errors) <= 10:
                print(f"request error: {tally.errors[-1]}", file=sys.stderr)
            await asyncio.sleep(0.01)


async def measure(
    args: argparse.Namespace,
    base_url: str,
    pids: dict[str, int],
    *,
    profile: tuple[int, str] | None = None,
) -> dict[str, Any]:
    """One closed-loop window against ``base_url``: rates and the CPU time of ``pids``.

    ``profile``: (pid, path) to sample with py-spy over the window.
    """
    url = f"{base_url}/v1/chat/completions"
    request: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "stream me some tokens"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.unary:
        request = {**request, "stream": False}
        del request["stream_options"]
    body = json.dumps(request).encode()
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        stop = asyncio.Event()
        tally = Tally()
        tasks = [
            asyncio.create_task(
                client(session, url, body, args.tokens, stop=stop, tally=tally, unary=args.unary)
            )
            for _ in range(args.concurrency)
        ]
        await asyncio.sleep(args.warmup)
        cpu0 = {name: _common.proc_cpu_seconds(pid) for name, pid in pids.items()}
        self0, cores0, t0 = _common.self_cpu_seconds(), _common.core_ticks(), time.perf_counter()
        tally.measuring = True
        profiler = (
            None
            if profile is None
            else _common.Profiler(profile[0], profile[1], duration=args.duration)
        )
        await asyncio.sleep(args.duration)
        tally.measuring = False
        t1 = time.perf_counter()
        cpu1 = {name: _common.proc_cpu_seconds(pid) for name, pid in pids.items()}
        self1, cores1 = _common.self_cpu_seconds(), _common.core_ticks()
        if profiler is not None:
            _common.print_profile(profiler.finish())
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=30)
        for task in pending:
            task.cancel()
        if pending:
            tally.errors.append(f"{len(pending)} clients still streaming 30 s after the window")
            await asyncio.wait(pending)
    elapsed = t1 - t0
    n = max(1, tally.requests)
    cpu_ms = {name: 1000 * (cpu1[name] - cpu0[name]) / n for name in pids}
    cpu_ms["load generator"] = 1000 * (self1 - self0) / n
    return {
        "rps": tally.requests / elapsed,
        "requests": tally.requests,
        "cpu_ms": cpu_ms,
        "p50": _common.percentile(tally.latencies, 50),
        "p99": _common.percentile(tally.latencies, 99),
        "ttft50": _common.percentile(tally.ttfts, 50),
        "cores": {
            cpu: _common.core_usage(cores0, cores1, cpu)
            for cpu in sorted({args.frontend_cpu, args.worker_cpu})
        },
        "errors": tally.errors,
    }


def describe(label: str, r: dict[str, Any], tokens: int) -> str:
    cpu = ", ".join(f"{name} {ms:.2f}" for name, ms in r["cpu_ms"].items())
    cores = ", ".join(f"core {c} {busy:.0f}% busy" for c, (busy, _) in r["cores"].items())
    return (
        f"  {label:<8} {r['rps']:8.1f} req/s ({r['rps'] * tokens:9.0f} tokens/s)  "
        f"p50 {1000 * r['p50']:6.1f} ms  p99 {1000 * r['p99']:6.1f} ms  "
        f"TTFT p50 {1000 * r['ttft50']:5.1f} ms\n"
        f"           CPU ms/request: {cpu}; {cores}"
    )


@dataclass
class Router:
    """One frontend under test: its name, URL and process."""

    name: str
    url: str
    pid: int


async def run(args: argparse.Namespace, worker: FakeWorker, routers: list[Router]) -> int:
    failed = False
    table: dict[str, list[dict[str, Any]]] = {r.name: [] for r in routers}
    for k in range(1, args.rounds + 1):
        print(f"round {k}:")
        direct = await measure(args, worker.url, {"worker": worker.pid})
        print(describe("direct", direct, args.tokens), flush=True)
        failed = failed or bool(direct["errors"])
        for router in routers:
            profile = (
                (router.pid, args.py_spy)
                if args.py_spy and k == args.rounds and router.name == "dynamo-llm"
                else None
            )
            routed = await measure(
                args, router.url, {"frontend": router.pid, "worker": worker.pid}, profile=profile
            )
            print(describe(router.name, routed, args.tokens), flush=True)
            ratio = routed["rps"] / direct["rps"] if direct["rps"] else float("nan")
            per_request = routed["cpu_ms"]["frontend"]
            print(
                f"  {router.name}: ratio to direct {ratio:.3f}; its CPU {per_request:.3f} ms per "
                f"request ({1000 * per_request / args.tokens:.1f} µs per streamed token; at that "
                f"cost one core would serve about {1000 / per_request:.0f} req/s)"
            )
            table[router.name].append({"rps": routed["rps"], "ratio": ratio, "ms": per_request})
            failed = failed or bool(routed["errors"])
    print("summary (per round: req/s, CPU ms/request, ratio to direct):")
    for name, rows in table.items():
        cells = " / ".join(
            f"{r['rps']:.0f} req/s, {r['ms']:.3f} ms, {r['ratio']:.3f}" for r in rows
        )
        print(f"  {name:<14} {cells}")
    if failed:
        print("FAILED: some responses were wrong (see above)", file=sys.stderr)
        return 1
    return 0


# --- the peer routers -------------------------------------------------------------------------

PEERS_DIR = Path.home() / ".cache" / "dynamo-llm-bench" / "peers" / "bin"
PEERS = {
    # name: (executable, arguments before the common ones)
    "vllm-router": ("vllm-router", []),
    "sglang-router": ("sglang-router", ["launch"]),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PeerRouter:
    """A peer router (a Rust binary from PyPI) in front of the worker, pinned to ``cpu``."""

    def __init__(self, name: str, exe: Path, worker_url: str, cpu: int) -> None:
        _, pre = PEERS[name]
        self.name = name
        port, metrics_port = free_port(), free_port()
        args = [str(exe), *pre, "--host", "127.0.0.1", "--port", str(port)]
        args += ["--worker-urls", worker_url, "--policy", "round_robin"]
        args += ["--prometheus-port", str(metrics_port), "--log-level", "error"]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        # Pinned before the fork, so that every thread it starts inherits the core.
        mine = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpu})
        try:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT
            )
        finally:
            os.sched_setaffinity(0, mine)
        self.pid = self.proc.pid
        self.url = f"http://127.0.0.1:{port}"

    async def wait_ready(self, within: float = 60.0) -> None:
        """Until a streamed chat comes back whole through it."""
        body = json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        ).encode()
        deadline = time.monotonic() + within
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode}: {self.output()}"
                    )
                try:
                    async with session.post(
                        f"{self.url}/v1/chat/completions", data=body, headers=HEADERS
                    ) as resp:
                        if resp.status == 200 and DONE_LINE in await resp.read():
                            return
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready within {within} s: {self.output()}")
                await asyncio.sleep(0.2)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:].decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def start_peers(args: argparse.Namespace, worker: FakeWorker) -> list[PeerRouter]:
    """The peers that are installed and start; a line for each that is not, or does not."""
    peers: list[PeerRouter] = []
    for name, (exe_name, _) in PEERS.items():
        if name not in args.peers:
            continue
        exe = Path(args.peers_dir) / exe_name
        if not exe.exists():
            print(f"{name}: not installed at {exe} (run bench/install-peers); skipped")
            continue
        peer = PeerRouter(name, exe, worker.url, args.frontend_cpu)
        try:
            asyncio.run(peer.wait_ready())
        except RuntimeError as exc:
            print(f"{name}: did not start ({exc}); skipped")
            peer.stop()
            continue
        peers.append(peer)
    return peers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frontend-cpu", type=int, default=0)
    parser.add_argument("--worker-cpu", type=int, default=1, help="also the load generator's")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=100, help="streamed tokens per request")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=0.0,
        help="the worker waits this long after each token (paced like an engine: every event "
        "reaches the frontend in its own read, so the cost per event is measured whatever the "
        "load; 0: as fast as it can write)",
    )
    parser.add_argument(
        "--peers",
        default="vllm-router,sglang-router",
        type=lambda v: [p for p in v.split(",") if p],
        help="peer routers measured in the same run, comma-separated ('' for none)",
    )
    parser.add_argument(
        "--peers-dir", default=str(PEERS_DIR), help="where bench/install-peers put them"
    )
    parser.add_argument(
        "--migration-limit",
        type=int,
        default=0,
        help="dynamo-llm's --migration-limit (the raw relay is kept with migration on too)",
    )
    parser.add_argument(
        "--unary",
        action="store_true",
        help="unary chats (stream: false) instead of streamed ones; the answer is checked whole",
    )
    parser.add_argument(
        "--ours",
        action="store_true",
        help="the fake worker says it is a dynamo-llm worker (owned_by dynamo-llm): the frontend "
        "then takes a unary chat's answer from it whole, where it streams from any other engine",
    )
    parser.add_argument(
        "--baseline",
        metavar="CHECKOUT",
        help="also measure dynamo-llm run from this checkout's src/ (e.g. a `git worktree add "
        "--detach` of main), in turn with this one in every round: an A/B in one run",
    )
    parser.add_argument(
        "--py-spy",
        metavar="PATH",
        help="profile the frontend with py-spy over the last round's window through it, "
        "writing collapsed stacks to PATH (py-spy on PATH; profiling adds CPU, so that round's "
        "figures are not comparable)",
    )
    args = parser.parse_args()
    unknown = set(args.peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; known: {', '.join(PEERS)}")
    if args.frontend_cpu == args.worker_cpu:
        parser.error("the frontend needs a core of its own")
    _common.check_cores(args.frontend_cpu, args.worker_cpu)

    # The load generator and, inheriting it, the worker on one core; the frontends on the other
    # (all started up front, each loaded alone in its turn).
    _common.pin_self(args.worker_cpu)
    worker = FakeWorker(args.tokens, args.gap_ms, ours=args.ours)
    peers: list[PeerRouter] = []
    baseline: ServerProcess | None = None
    try:
        if os.sched_getaffinity(worker.pid) != {args.worker_cpu}:
            raise RuntimeError(f"the worker's affinity is {os.sched_getaffinity(worker.pid)}")
        frontend = _common.start_server(
            [
                *("serve", "--upstream", worker.url, "--http-port", "0"),
                *("--log-level", "warning", "--migration-limit", str(args.migration_limit)),
            ],
            args.frontend_cpu,
        )
        try:
            assert frontend.url is not None
            peers = start_peers(args, worker)
            names = ", ".join(["dynamo-llm serve --upstream", *(p.name for p in peers)])
            print(
                f"cores: frontends ({names}) on core {args.frontend_cpu}, one loaded at a "
                f"time; fake worker (bad_workers ok, {args.tokens} tokens"
                f"{', owned_by dynamo-llm' if args.ours else ''}) and this load "
                f"generator on core {args.worker_cpu}\n"
                f"machine: {_common.cpu_model()}, {os.cpu_count()} cores; Python "
                f"{sys.version.split()[0]}; concurrency {args.concurrency}, warm-up "
                f"{args.warmup:g} s, window {args.duration:g} s"
            )
            routers = [Router("dynamo-llm", frontend.url, frontend.pid)]
            if args.baseline:
                src = str(Path(args.baseline).resolve() / "src")
                baseline = _common.start_server(
                    [
                        *("serve", "--upstream", worker.url, "--http-port", "0"),
                        *("--log-level", "warning"),
                        *("--migration-limit", str(args.migration_limit)),
                    ],
                    args.frontend_cpu,
                    env={**os.environ, "PYTHONPATH": src},
                )
                assert baseline.url is not None
                routers.append(Router("baseline", baseline.url, baseline.pid))
            routers += [Router(p.name, p.url, p.pid) for p in peers]
            return asyncio.run(run(args, worker, routers))
        finally:
            for peer in peers:
                peer.stop()
            if baseline is not None:
                baseline.stop()
            frontend.stop()
    finally:
        worker.stop()


if __name__ == "__main__":
    sys.exit(main())
