"""Closed-loop load on ``dynamo-llm serve --engine echo``: the frontend's cost per streamed request.

The frontend runs as a separate process pinned to one core (``--server-cpu``, default 0) and this
load generator pins itself to another (``--client-cpu``, default 1), so the two never compete for
a core; the echo engine runs inside the frontend process, on the frontend's core. ``--concurrency``
clients (default 64) each send a streaming chat completion whose last user message has exactly
``--tokens`` whitespace-separated words (default 100), so the echo engine streams exactly that many
tokens, read the SSE stream to ``[DONE]``, and send the next at once (closed loop).

After ``--warmup`` seconds, whose requests are not counted, the measured window of ``--duration``
seconds starts. Over exactly that window the script reads the frontend's CPU time (user + system
of every thread, from ``/proc/<pid>/stat``) and its own, and reports requests/s, tokens/s, p50/p99
latency (send to ``[DONE]``) and time to first token, and the frontend's CPU milliseconds per
request and microseconds per token. A request counts in the window when it completes inside it.
It also prints the frontend's kernel share of that CPU, its context switches per token, and how
busy each core was in total (``/proc/stat``), so a noisy neighbour or a saturated client shows.

The client is aiohttp's (``TCPConnector(limit=concurrency)``); it reads each stream as it arrives
and looks only at complete SSE lines, counting content chunks with byte searches rather than
parsing JSON, so it stays well under its core's capacity (it warns when that core was > 90 %
busy, as the figures would then be client-bound).

Every response is checked: HTTP 200, exactly ``--tokens`` content chunks, no error event, and a
``[DONE]``; the first response of each client is also parsed as JSON and its text compared with
the prompt. Any failed request makes the script exit with status 1 (2 if the frontend never
became ready). At the end the frontend gets SIGTERM and drains; it is killed after 10 s.

Run standalone: ``.venv/bin/python bench/bench_frontend.py`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

import _common

CLK_TCK = os.sysconf("SC_CLK_TCK")
MAX_ERRORS_SHOWN = 10


# --- CPU accounting -------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of every thread of process ``pid`` (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = data[data.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return utime / CLK_TCK, stime / CLK_TCK


def proc_context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches summed over every thread of ``pid``."""
    vol = invol = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    vol += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    invol += int(line.split()[1])
    return vol, invol


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def core_ticks() -> dict[int, tuple[int, int, int]]:
    """Per core, from ``/proc/stat``: (busy, steal, total) clock ticks since boot."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *rest = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            v = [int(x) for x in rest[:8]]
            # user nice system idle iowait irq softirq steal
            idle = v[3] + v[4]
            steal = v[7]
            total = sum(v)
            out[int(name[3:])] = (total - idle - steal, steal, total)
    return out


def core_usage(
    before: dict[int, tuple[int, int, int]], after: dict[int, tuple[int, int, int]], core: int
) -> tuple[float, float]:
    """(busy %, steal %) of ``core`` between two :func:`core_ticks` readings."""
    b, a = before[core], after[core]
    total = a[2] - b[2]
    if total <= 0:
        return math.nan, math.nan
    return 100 * (a[0] - b[0]) / total, 100 * (a[1] - b[1]) / total


def wait_idle(cores: set[int], limit: float, threshold: float = 10.0, window: float = 3.0) -> None:
    """Wait (up to ``limit`` s) until every core in ``cores`` was < ``threshold`` % busy over one
    ``window``: on a shared machine, start only when other jobs leave the cores alone."""
    deadline = time.monotonic() + limit
    while True:
        before = core_ticks()
        time.sleep(window)
        after = core_ticks()
        busy = {c: core_usage(before, after, c)[0] for c in sorted(cores)}
        if all(b < threshold for b in busy.values()):
            print("cores idle: " + ", ".join(f"core {c} {b:.0f}% busy" for c, b in busy.items()))
            return
        if time.monotonic() > deadline:
            print(
                f"warning: cores still busy after {limit:g}s ({busy}); starting anyway",
                file=sys.stderr,
            )
            return
        print("waiting for idle cores: " + ", ".join(f"core {c} {b:.0f}%" for c, b in busy.items()))


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def frontend_source() -> dict[str, Any]:
    """Which ``dynamo_llm`` the frontend will import (same interpreter and environment), and
    the git commit of the tree it lives in, with ``dirty`` when that ``src/`` has local edits."""
    import importlib.util

    spec = importlib.util.find_spec("dynamo_llm")
    origin = spec.origin if spec is not None and spec.origin else "?"
    info: dict[str, Any] = {"path": str(Path(origin).parent)}
    pkg_dir = Path(origin).parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(pkg_dir)]
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "."], capture_output=True, text=True, check=True
        ).stdout.strip()
        info["commit"] = commit
        info["dirty"] = bool(dirty)
    return info


# --- the frontend process -------------------------------------------------------------------


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Frontend:
    """``dynamo-llm serve --engine echo`` in a child process pinned to one core."""

    def __init__(self, args: argparse.Namespace, port: int, log_path: Path) -> None:
        self.args = args
        self.port = port
        self.log_path = log_path
        self.base_url = f"http://{args.host}:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.shutdown_seconds: float | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        a = self.args
        return [
            sys.executable,
            "-m",
            "dynamo_llm",
            "serve",
            "--engine",
            "echo",
            "--token-echo-delay-ms",
            "0",
            "--http-host",
            a.host,
            "--http-port",
            str(self.port),
            "--http-interface",
            a.http_interface,
            "--model-name",
            a.model_name,
            "--log-level",
            "warning",
        ]

    def start(self) -> None:
        # Pin ourselves to the server's core for the instant of the fork so that the child, and
        # every thread it ever starts, inherits that affinity (taskset semantics); then move the
        # load generator to its own core.
        os.sched_setaffinity(0, {self.args.server_cpu})
        try:
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
        finally:
            os.sched_setaffinity(0, {self.args.client_cpu})
        got = os.sched_getaffinity(self.pid)
        if got != {self.args.server_cpu}:
            raise RuntimeError(
                f"frontend affinity is {sorted(got)}, not {{{self.args.server_cpu}}}"
            )

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def wait_ready(self, session: aiohttp.ClientSession, limit: float) -> float:
        """Poll ``GET /health`` until it answers 200; return how long that took."""
        assert self.proc is not None
        start = time.perf_counter()
        deadline = start + limit
        last = "no answer yet"
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"the frontend exited with status {code} before it was ready; its log:\n"
                    + self.log_tail()
                )
            try:
                async with session.get(
                    self.base_url + "/health", timeout=aiohttp.ClientTimeout(total=1)
                ) as resp:
                    if resp.status == 200:
                        return time.perf_counter() - start
                    last = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.perf_counter() > deadline:
                raise TimeoutError(
                    f"the frontend at {self.base_url} was not healthy within {limit:g}s "
                    f"(last: {last}); its log:\n" + self.log_tail()
                )
            await asyncio.sleep(0.05)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (the frontend drains), then SIGKILL if it has not exited within ``grace``."""
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self.exit_code = self.proc.returncode
            return
        start = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            print(
                f"warning: the frontend did not exit within {grace:g}s of SIGTERM; killing it",
                file=sys.stderr,
            )
            self.proc.kill()
            self.exit_code = self.proc.wait()
        self.shutdown_seconds = time.perf_counter() - start


# --- the load generator ---------------------------------------------------------------------


def prompt_words(n: int, salt: int) -> str:
    return " ".join(f"w{salt}x{i}" for i in range(n))


@dataclass
class Window:
    """The measured window, in ``time.perf_counter()`` seconds."""

    start: float = math.inf
    end: float = math.inf


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)  # seconds, requests in the window
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    total_requests: int = 0  # completed, warm-up and tail included
    errors: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)

    def error(self, kind: str, detail: str) -> None:
        self.errors += 1
        self.error_kinds[kind] += 1
        if len(self.error_samples) < MAX_ERRORS_SHOWN:
            self.error_samples.append(f"{kind}: {detail}")
            print(f"request error: {kind}: {detail}", file=sys.stderr)


CONTENT_MARK = b'"content":"'
EMPTY_CONTENT = b'"content":""'
DONE_LINE = b"data: [DONE]\n"
HEADERS = {"content-type": "application/json"}


async def one_request(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    expected_tokens: int,
    expected_text: str | None,
) -> tuple[float, float, int]:
    """Send one streaming chat completion; return (latency, ttft, content chunks).

    Raises ``ValueError`` with a description when the response is wrong. With ``expected_text``
    every chunk is also parsed as JSON and the streamed text compared with it.
    """
    t0 = time.perf_counter()
    ttft = -1.0
    chunks = 0
    done = False
    text_parts: list[str] = []
    tail = b""
    async with session.post(url, data=body, headers=HEADERS) as resp:
        if resp.status != 200:
            raise ValueError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        content = resp.content
        while True:
            data = await content.readany()
            if not data:
                break
            # Only complete lines are looked at; a partial last line waits for the rest.
            cut = data.rfind(b"\n")
            if cut < 0:
                tail += data
                continue
            lines = tail + data[: cut + 1] if tail else data[: cut + 1]
            tail = data[cut + 1 :]
            n = lines.count(CONTENT_MARK) - lines.count(EMPTY_CONTENT)
            if n:
                if ttft < 0:
                    ttft = time.perf_counter() - t0
                chunks += n
            if lines.startswith(b"event:") or b"\nevent:" in lines:
                raise ValueError(f"error event in the stream: {lines[:300]!r}")
            if DONE_LINE in lines:
                done = True
            if expected_text is not None:
                for line in lines.split(b"\n"):
                    if line.startswith(b"data: {"):
                        for choice in json.loads(line[6:])["choices"]:
                            text_parts.append(choice.get("delta", {}).get("content") or "")
    if tail.strip():
        raise ValueError(f"stream ended inside a line: {tail[:300]!r}")
    latency = time.perf_counter() - t0
    if not done:
        raise ValueError(f"stream ended without [DONE] after {chunks} content chunks")
    if chunks != expected_tokens:
        raise ValueError(f"{chunks} content chunks, expected exactly {expected_tokens}")
    if expected_text is not None and "".join(text_parts) != expected_text:
        raise ValueError("the streamed text is not the prompt echoed back")
    return latency, ttft, chunks


async def client(
    cid: int,
    session: aiohttp.ClientSession,
    url: str,
    args: argparse.Namespace,
    *,
    window: Window,
    stop: asyncio.Event,
    results: Results,
) -> None:
    text = prompt_words(args.tokens, cid)
    body = json.dumps(
        {
            "model": args.model_name,
            "stream": True,
            "messages": [
                {"role": "system", "content": "You are a benchmark."},
                {"role": "user", "content": text},
            ],
        }
    ).encode()
    check_text: str | None = text  # the first response is checked in full
    while not stop.is_set():
        try:
            latency, ttft, chunks = await one_request(session, url, body, args.tokens, check_text)
        except ValueError as exc:
            results.error("bad response", str(exc))
            continue
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            results.error(type(exc).__name__, str(exc) or repr(exc))
            await asyncio.sleep(0.01)  # don't spin if the server is gone
            continue
        check_text = None
        results.total_requests += 1
        end = time.perf_counter()
        if window.start <= end <= window.end:
            results.latencies.append(latency)
            results.ttfts.append(ttft)
            results.tokens += chunks


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


async def run_load(args: argparse.Namespace, frontend: Frontend) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=args.read_timeout)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        ready_s = await frontend.wait_ready(session, args.ready_timeout)
        print(f"frontend healthy after {ready_s:.2f}s (pid {frontend.pid})")
        window = Window()
        stop = asyncio.Event()
        results = Results()
        url = frontend.base_url + "/v1/chat/completions"
        tasks = [
            asyncio.create_task(
                client(i, session, url, args, window=window, stop=stop, results=results)
            )
            for i in range(args.concurrency)
        ]
        await asyncio.sleep(args.warmup)
        # The window: CPU readings as close to its two edges as we can put them.
        window.start = time.perf_counter()
        server_cpu0 = proc_cpu_seconds(frontend.pid)
        client_cpu0 = self_cpu_seconds()
        cores0 = core_ticks()
        switches0 = proc_context_switches(frontend.pid)
        profiler = (
            _common.Profiler(
                frontend.pid,
                args.py_spy,
                duration=args.duration,
                rate=args.py_spy_rate,
                native=args.py_spy_native,
            )
            if args.py_spy
            else None
        )
        await asyncio.sleep(args.duration)
        window.end = time.perf_counter()
        server_cpu1 = proc_cpu_seconds(frontend.pid)
        client_cpu1 = self_cpu_seconds()
        cores1 = core_ticks()
        switches1 = proc_context_switches(frontend.pid)
        threads = len(os.listdir(f"/proc/{frontend.pid}/task"))
        stop.set()
        # Clients finish the request they are in (not counted), then stop.
        _, pending = await asyncio.wait(tasks, timeout=max(30.0, args.read_timeout))
        for t in pending:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                exc = t.exception() if t.done() and not t.cancelled() else None
                if exc is not None:
                    results.error("client crashed", repr(exc))
        if pending:
            results.error("stall", f"{len(pending)} clients still in a request 30 s after the end")
        profile = profiler.finish() if profiler is not None else None

    elapsed = window.end - window.start
    server_user = server_cpu1[0] - server_cpu0[0]
    server_sys = server_cpu1[1] - server_cpu0[1]
    server_cpu = server_user + server_sys
    client_cpu = client_cpu1 - client_cpu0
    n = len(results.latencies)
    server_core = core_usage(cores0, cores1, args.server_cpu)
    client_core = core_usage(cores0, cores1, args.client_cpu)
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "nproc": os.cpu_count(),
            "cpu_model": cpu_model(),
            "loadavg": os.getloadavg(),
        },
        "concurrency": args.concurrency,
        "tokens_per_request": args.tokens,
        "warmup_s": args.warmup,
        "duration_s": elapsed,
        "requests": n,
        "tokens": results.tokens,
        "requests_per_s": n / elapsed,
        "tokens_per_s": results.tokens / elapsed,
        "latency_ms": {
            "p50": percentile(results.latencies, 50) * 1000,
            "p99": percentile(results.latencies, 99) * 1000,
            "max": max(results.latencies, default=math.nan) * 1000,
        },
        "ttft_ms": {
            "p50": percentile(results.ttfts, 50) * 1000,
            "p99": percentile(results.ttfts, 99) * 1000,
        },
        "frontend": {
            "pid": frontend.pid,
            "cpu": args.server_cpu,
            "cpu_s": server_cpu,
            "user_s": server_user,
            "system_s": server_sys,
            "cpu_ms_per_request": server_cpu * 1000 / n if n else math.nan,
            "cpu_us_per_token": server_cpu * 1e6 / results.tokens if results.tokens else math.nan,
            "cpu_utilisation_pct": 100 * server_cpu / elapsed,
            "threads": threads,
            "context_switches_per_token": {
                "voluntary": (switches1[0] - switches0[0]) / max(1, results.tokens),
                "involuntary": (switches1[1] - switches0[1]) / max(1, results.tokens),
            },
            "core_busy_pct": server_core[0],
            "core_steal_pct": server_core[1],
        },
        "client": {
            "cpu": args.client_cpu,
            "cpu_s": client_cpu,
            "cpu_utilisation_pct": 100 * client_cpu / elapsed,
            "core_busy_pct": client_core[0],
            "core_steal_pct": client_core[1],
        },
        "errors": results.errors,
        "error_kinds": dict(results.error_kinds),
        "error_samples": results.error_samples,
        "total_requests_completed": results.total_requests,
        "profile": profile,
    }


# --- reporting ------------------------------------------------------------------------------


def report(r: dict[str, Any]) -> list[str]:
    fe, cl = r["frontend"], r["client"]
    cs = fe["context_switches_per_token"]
    lines = [
        f"measured {r['duration_s']:.2f}s after {r['warmup_s']:g}s warm-up, "
        f"concurrency {r['concurrency']}, {r['tokens_per_request']} tokens per stream",
        f"requests/s            {r['requests_per_s']:10.1f}   ({r['requests']} requests)",
        f"tokens/s              {r['tokens_per_s']:10.0f}   ({r['tokens']} tokens)",
        f"latency p50 / p99     {r['latency_ms']['p50']:10.2f} / {r['latency_ms']['p99']:.2f} ms",
        f"TTFT    p50 / p99     {r['ttft_ms']['p50']:10.2f} / {r['ttft_ms']['p99']:.2f} ms",
        f"frontend CPU/request  {fe['cpu_ms_per_request']:10.3f} ms",
        f"frontend CPU/token    {fe['cpu_us_per_token']:10.2f} us",
        f"frontend CPU          {fe['cpu_utilisation_pct']:10.1f} % of one core (core {fe['cpu']}; "
        f"{100 * fe['system_s'] / max(fe['cpu_s'], 1e-9):.0f}% of it in the kernel)",
        f"frontend ctx switches {cs['voluntary']:10.2f} voluntary, {cs['involuntary']:.2f} "
        f"involuntary per token ({fe['threads']} threads)",
        f"client CPU            {cl['cpu_utilisation_pct']:10.1f} % of one core (core {cl['cpu']})",
        f"core {fe['cpu']} / core {cl['cpu']} busy      {fe['core_busy_pct']:6.1f} / "
        f"{cl['core_busy_pct']:.1f} % (all processes; steal {fe['core_steal_pct']:.1f} / "
        f"{cl['core_steal_pct']:.1f} %)",
        f"errors                {r['errors']:10d}",
    ]
    if r["errors"]:
        lines.append(f"error kinds: {r['error_kinds']}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Closed-loop streaming load on `dynamo-llm serve --engine echo` "
        "(zero token delay): requests/s, tokens/s, latency and TTFT percentiles, and the "
        "frontend's CPU time per request and per token. The frontend runs in its own process "
        "pinned to --server-cpu; this load generator pins itself to --client-cpu.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="The frontend is started as `<this python> -m dynamo_llm serve --engine echo "
        "--token-echo-delay-ms 0 ...`, so it imports dynamo_llm exactly as this interpreter "
        "would (set PYTHONPATH to measure another checkout); the script prints which. Besides "
        "the figures it prints how busy each core was in total (other processes show there) "
        "and warns when the client core was over 90 percent busy or either core was disturbed. "
        "Exit status: 0 when every request was right, 1 on any request error, 2 when the "
        "frontend did not become ready.",
    )
    p.add_argument(
        "--concurrency", type=int, default=64, help="concurrent clients, each in a closed loop"
    )
    p.add_argument(
        "--duration", type=float, default=20.0, help="length of the measured window, seconds"
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=3.0,
        help="seconds of load before the window; those requests are not counted",
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=100,
        help="words in each prompt = tokens the echo engine streams back per request",
    )
    p.add_argument("--server-cpu", type=int, default=0, help="core the frontend is pinned to")
    p.add_argument("--client-cpu", type=int, default=1, help="core this load generator runs on")
    p.add_argument("--host", default="127.0.0.1", help="address the frontend listens on")
    p.add_argument(
        "--http-interface",
        choices=("rsgi", "asgi"),
        default="rsgi",
        help="frontend server interface (granian RSGI or uvicorn ASGI)",
    )
    p.add_argument("--model-name", default="bench", help="model name the frontend serves")
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for GET /health to answer 200",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=30.0,
        help="a request fails when its stream is silent this long, seconds",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before starting, wait up to this long for both cores to be under 10%% busy over "
        "3 s (other jobs on a shared machine disturb the figures); 0 does not wait",
    )
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    p.add_argument(
        "--py-spy",
        metavar="PATH",
        help="profile the frontend with py-spy over the measured window, writing collapsed "
        "stacks to PATH and printing the top frames by own time (profiling adds CPU, so the "
        "figures of such a run are not comparable)",
    )
    p.add_argument("--py-spy-rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument(
        "--py-spy-native",
        action="store_true",
        help="include native (C/Rust) frames in py-spy (pauses the frontend at each sample)",
    )
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.tokens < 1 or args.duration <= 0 or args.warmup < 0:
        p.error("--concurrency and --tokens must be >= 1, --duration > 0, --warmup >= 0")
    cores = os.sched_getaffinity(0)
    for name in ("server_cpu", "client_cpu"):
        if getattr(args, name) not in cores:
            flag = "--" + name.replace("_", "-")
            p.error(f"{flag} {getattr(args, name)} is not one of {sorted(cores)}")
    if args.server_cpu == args.client_cpu:
        p.error("--server-cpu and --client-cpu must differ")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    port = free_port(args.host)
    source = frontend_source()
    if args.wait_idle > 0:
        wait_idle({args.server_cpu, args.client_cpu}, args.wait_idle)
    with tempfile.TemporaryDirectory(prefix="bench-frontend-") as tmp:
        frontend = Frontend(args, port, Path(tmp) / "frontend.log")
        frontend.start()
        print(
            f"client on core {args.client_cpu}, frontend on core {args.server_cpu}; "
            f"the echo engine runs inside the frontend (machine: {os.cpu_count()} cores, "
            f"{cpu_model()})"
        )
        print("frontend: " + " ".join(frontend.command()))
        where = source["path"]
        if "commit" in source:
            where += f" @ {source['commit']}" + (" + uncommitted edits" if source["dirty"] else "")
        print(f"dynamo_llm from {where}")
        try:
            result = asyncio.run(run_load(args, frontend))
        except (TimeoutError, RuntimeError) as exc:  # the frontend never became ready
            frontend.stop()
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except BaseException:
            frontend.stop()
            raise
        frontend.stop()
        if frontend.exit_code != 0:
            print(
                f"warning: the frontend exited with status {frontend.exit_code}; its log:\n"
                + frontend.log_tail(),
                file=sys.stderr,
            )
        result["frontend"]["source"] = source
        result["frontend"]["exit_code"] = frontend.exit_code
        result["frontend"]["shutdown_s"] = frontend.shutdown_seconds

    for line in report(result):
        print(line)
    client = result["client"]
    if client["cpu_utilisation_pct"] > 90 or client["core_busy_pct"] > 90:
        print(
            f"WARNING: the client core was {client['core_busy_pct']:.0f}% busy (the load "
            f"generator itself {client['cpu_utilisation_pct']:.0f}%): these figures may be "
            "limited by the client side, not the frontend",
            file=sys.stderr,
        )
    for who in ("frontend", "client"):
        part = result[who]
        other = part["core_busy_pct"] - part["cpu_utilisation_pct"]
        if other > 10 or part["core_steal_pct"] > 5:
            print(
                f"WARNING: core {part['cpu']} ({who}) spent {other:.0f}% on other processes and "
                f"{part['core_steal_pct']:.0f}% stolen by the hypervisor during the window: "
                "throughput and latency are disturbed (CPU per request is still the frontend's)",
                file=sys.stderr,
            )
    profile = result.get("profile")
    if profile:
        print(f"py-spy: {profile['samples']} samples, top functions by own time:")
        for frame, pct in profile["own_by_function"][:15]:
            print(f"  {pct:5.1f}%  {frame}")
        print("top lines by own time:")
        for frame, pct in profile["own"][:15]:
            print(f"  {pct:5.1f}%  {frame}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
