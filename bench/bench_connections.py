"""Connections are not a limit: 10 000 slow streams, slow-loris clients, connect-and-vanish.

Starts a frontend process pinned to core 0 serving echo models ``slow`` (one token every
``--token-delay-ms``, default 5 s: a stream that stays open and nearly idle) and ``fast`` (no
delay), and pins itself, the client, to core 1 (:func:`serve_models`, :func:`start_frontend`;
``bench_large_body.py`` uses them too). Then, one phase after the other:

1. **streams**: opens ``--streams`` (10 000) streaming chats to ``slow``, 256 connecting at a
   time, and waits until each has its response headers; prints how long that took, the
   frontend's RSS and open descriptors, then the latency (fresh connection each, sequential) of
   ``GET /health``, ``GET /v1/models`` and a unary chat to ``fast``, p50 / p99 over ``--probes``
   each (a probe waits up to :data:`PROBE_LIMIT`, so a stall is measured). Streams without a 200
   are counted by what they got (``lost``: a status, or ``closed`` before any), with the
   machine's ``ListenOverflows`` over the opening (connections an accept queue had no room
   for; they are retried by the kernel). Closes the streams and polls the frontend's
   ``inflight_requests`` until it is 0 (``--drain-wait``, 60 s): how long, what it was every
   5 s, and the frontend's CPU seconds meanwhile (``drained``); ``--starve-drain 0.02`` lets
   the frontend run only 2 % of the time meanwhile (:class:`Starver`), as a crowded core would.
2. **slow-loris**: the chat probe alone (baseline), then with ``--loris`` (2 000) connections
   open that trickle one byte a second, half of them their headers and half their body; then how
   long the frontend took to close them (the frontend's ``--http-read-timeout-secs`` is set to
   ``--read-timeout``, default 10 s, so the run is short; the server's default is 30 s).
3. **connect-and-vanish**: ``--vanish`` (5 000) clients that connect and close at once, 500 at
   a time, half without a byte and half after a partial request line; prints how long they took
   and how long until the frontend's descriptors were back to where they were, then the chat
   probe.

    .venv/bin/python bench/bench_connections.py [--http-interface asgi] [--json out.json]
        [--frontend-log frontend.log]

Exits 1 if a stream did not get its headers, a probe failed, or the frontend kept connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import _common

READY = re.compile(r"serving .+? on (http://\S+)")
WORDS = " ".join(f"w{i}" for i in range(100))


def serve_models(interface: str, read_timeout: float, delay_ms: float) -> None:
    """The frontend process, with the real server and drain: echo models ``slow`` (one token
    every ``delay_ms``), ``fast`` (no delay) and ``tick`` (one every 2 ms), and ``sink``, which
    answers one token without looking at the prompt (so a large body costs only the HTTP
    layer)."""
    from dynamo_llm.cli import raise_open_file_limit, serve_until_signalled
    from dynamo_llm.config import Config
    from dynamo_llm.engines.base import EngineOutput, EngineRequest, Usage
    from dynamo_llm.engines.echo import EchoEngine
    from dynamo_llm.http.app import ServedModel, create_app
    from dynamo_llm.http.server import listen_socket
    from dynamo_llm.runtime.clock import SystemClock
    from dynamo_llm.runtime.context import EngineContext

    class SinkEngine:
        async def generate(self, request: EngineRequest, ctx: EngineContext) -> Any:
            async def one() -> Any:
                yield EngineOutput("ok", 1, finish_reason="stop", usage=Usage(1, 1, 0))

            return one()

        async def aclose(self) -> None:
            return None

    config = Config.from_env({}).replace(
        http_port=0,
        http_interface=interface,
        http_read_timeout_secs=read_timeout,
        body_limit_mb=64,  # bench_large_body measures bodies past the default limit
    )
    clock = SystemClock()
    models = [
        ServedModel("slow", EchoEngine(clock, delay_ms=delay_ms)),
        ServedModel("fast", EchoEngine(clock, delay_ms=0)),
        ServedModel("tick", EchoEngine(clock, delay_ms=2)),
        ServedModel("sink", SinkEngine()),
    ]
    raise_open_file_limit()
    sock = listen_socket("127.0.0.1", 0)
    app = create_app(config, models)
    asyncio.run(serve_until_signalled(app, config, "serve", "echo", sock=sock))


def chat(model: str, stream: bool, text: str) -> bytes:
    body = json.dumps(
        {"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]}
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )


class Client(asyncio.Protocol):
    """One connection: sends ``data``, notes when the status line and the close arrive."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.status: int | None = None
        self.head = b""
        self.transport: asyncio.Transport | None = None
        self.connected_at = 0.0
        self.headers = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.connected_at = time.monotonic()
        if self.data:
            transport.write(self.data)

    def data_received(self, data: bytes) -> None:
        if self.status is None:
            self.head += data
            if b"\r\n" in self.head:
                self.status = int(self.head.split(b" ", 2)[1])
                self.head = b""
                if not self.headers.done():
                    self.headers.set_result(time.monotonic())

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in (self.headers, self.closed):
            if not fut.done():
                fut.set_result(time.monotonic())


async def connect(port: int, data: bytes) -> Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: Client(data), "127.0.0.1", port)
    return client


async def bounded(count: int, at_once: int, make: Callable[[int], Awaitable[Any]]) -> list[Any]:
    gate = asyncio.Semaphore(at_once)

    async def one(i: int) -> Any:
        async with gate:
            return await make(i)

    return await asyncio.gather(*(one(i) for i in range(count)))


PROBE_LIMIT = 60.0
"""Seconds a probe waits for its answer before the run fails: long enough that a stall of the
frontend is measured (it shows in ``max_ms``) rather than ending the run."""


async def probe(port: int, data: bytes) -> float:
    """Seconds from connect to the whole answer (the server closes: Connection: close)."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    answer = await asyncio.wait_for(reader.read(), PROBE_LIMIT)
    writer.close()
    if not answer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"probe failed: {answer[:200]!r}")
    return time.monotonic() - start


def summary(times: list[float]) -> dict[str, float]:
    return {
        "p50_ms": 1000 * _common.percentile(times, 50),
        "p99_ms": 1000 * _common.percentile(times, 99),
        "max_ms": 1000 * max(times),
    }


async def probes(port: int, data: bytes, n: int) -> dict[str, float]:
    times = []
    for _ in range(n):
        times.append(await probe(port, data))
        await asyncio.sleep(0.005)
    return summary(times)


def server_state(pid: int) -> dict[str, float]:
    with open(f"/proc/{pid}/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return {"rss_mb": rss_kb / 1024, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


GET = {
    path: f"GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".encode()
    for path in ("/health", "/v1/models", "/metrics")
}


async def inflight(port: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(GET["/metrics"])
    text = (await reader.read()).decode()
    writer.close()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("dynamo_frontend_inflight_requests{")
    )


def listen_overflows() -> int:
    """The kernel's ``ListenOverflows`` (connections its accept queues had no room for), summed
    over the whole machine: other processes' listeners count too."""
    with open("/proc/net/netstat") as f:
        lines = [line.split() for line in f if line.startswith("TcpExt:")]
    return int(dict(zip(lines[0], lines[1], strict=True)).get("ListenOverflows", 0))


def lost_streams(clients: list[Client]) -> dict[str, Any]:
    """The streams without a 200: their status (or "closed": no status before the close), and
    how long after their connect the close came."""
    lost = [c for c in clients if c.status != 200]
    statuses: dict[str, int] = {}
    for c in lost:
        key = "closed" if c.status is None else str(c.status)
        statuses[key] = statuses.get(key, 0) + 1
    after = [c.closed.result() - c.connected_at for c in lost if c.closed.done() and c.connected_at]
    out: dict[str, Any] = {"count": len(lost), "statuses": statuses}
    if after:
        out["closed_after_connect_s"] = {"min": min(after), "max": max(after)}
    return out


async def drain(port: int, pid: int, wait: float) -> dict[str, Any]:
    """Poll ``inflight_requests`` until it is 0 or ``wait`` seconds passed: how long it took,
    what it was every 5 s meanwhile, and the CPU time the frontend had for it (a frontend
    starved of its core drains slowly with the CPU time of a quick drain)."""
    cpu = _common.proc_cpu_seconds(pid)
    start = time.monotonic()
    deadline = start + wait
    series: list[tuple[float, float]] = []
    while (left := await inflight(port)) and time.monotonic() < deadline:
        elapsed = time.monotonic() - start
        if not series or elapsed - series[-1][0] >= 5:
            series.append((round(elapsed, 1), left))
        await asyncio.sleep(0.2)
    return {
        "left": left,
        "after_s": time.monotonic() - start,
        "frontend_cpu_s": _common.proc_cpu_seconds(pid) - cpu,
        "every_5_s": series,
    }


class Starver:
    """Lets process ``pid`` run only ``duty`` of every 100 ms (SIGSTOP / SIGCONT) until
    :meth:`end`: a frontend whose core is taken by others, without taking the core from anyone."""

    def __init__(self, pid: int, duty: float) -> None:
        self.pid = pid
        self.duty = duty
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            os.kill(self.pid, signal.SIGSTOP)
            time.sleep(0.1 * (1 - self.duty))
            os.kill(self.pid, signal.SIGCONT)
            time.sleep(0.1 * self.duty)

    def end(self) -> None:
        self._stop.set()
        self._thread.join()
        os.kill(self.pid, signal.SIGCONT)


async def phase_streams(port: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    start = time.monotonic()
    overflows = listen_overflows()
    request = chat("slow", True, WORDS)
    clients = await bounded(args.streams, 256, lambda i: connect(port, request))
    await asyncio.wait([c.headers for c in clients], timeout=120)
    got = sum(1 for c in clients if c.status == 200)
    out: dict[str, Any] = {"streams": args.streams, "with_headers": got}
    out["open_s"] = time.monotonic() - start
    out["lost"] = lost_streams(clients)
    out["machine_listen_overflows"] = listen_overflows() - overflows
    out.update(server_state(pid))
    # Interleaved, so that the three see the same moments of the streams' traffic.
    kinds = {
        "health": GET["/health"],
        "models": GET["/v1/models"],
        "chat": chat("fast", False, "hello there"),
    }
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.probes):
        for kind, data in kinds.items():
            times[kind].append(await probe(port, data))
            await asyncio.sleep(0.005)
    out.update({kind: summary(values) for kind, values in times.items()})
    for c in clients:
        assert c.transport is not None
        c.transport.close()
    starver = Starver(pid, args.starve_drain) if args.starve_drain else None
    try:
        drained = await drain(port, pid, args.drain_wait)
    finally:
        if starver is not None:
            starver.end()
    out["inflight_after_close"] = drained["left"]
    out["drained"] = drained
    return out


async def trickle(clients: list[Client], stop: asyncio.Event) -> None:
    while not stop.is_set():
        for c in clients:
            if c.transport is not None and not c.closed.done():
                c.transport.write(b"x")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def phase_loris(port: int, args: argparse.Namespace) -> dict[str, Any]:
    data_chat = chat("fast", False, "hello there")
    out: dict[str, Any] = {"connections": args.loris, "read_timeout_s": args.read_timeout}
    out["chat_alone"] = await probes(port, data_chat, args.probes)
    heads = b"POST /v1/chat/completions HTTP/1.1\r\nHost: b\r\nX-Slow: "
    bodies = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n{"
    )
    opened_at = time.monotonic()
    clients = await bounded(args.loris, 256, lambda i: connect(port, heads if i % 2 else bodies))
    stop = asyncio.Event()
    trickler = asyncio.create_task(trickle(clients, stop))
    out["chat_with_loris"] = await probes(port, data_chat, args.probes)
    await asyncio.wait([c.closed for c in clients], timeout=args.read_timeout * 3 + 30)
    stop.set()
    await trickler
    closed = [c.closed.result() - opened_at for c in clients if c.closed.done()]
    out["closed_by_server"] = len(closed)
    out["closed_after_s"] = {
        "min": min(closed, default=0.0),
        "max": max(closed, default=0.0),
    }
    out["answered_408"] = sum(1 for c in clients if c.status == 408)
    for c in clients:
        if c.transport is not None:
            c.transport.close()
    return out


async def phase_vanish(port: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    before = server_state(pid)["fds"]

    loop = asyncio.get_running_loop()

    async def vanish(i: int) -> None:
        # A bare socket, not a transport: the client must not be what is measured.
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            if i % 2 == 0:
                sock.send(b"POST /v1/chat/comp")
        finally:
            sock.close()

    start = time.monotonic()
    await bounded(args.vanish, 500, vanish)
    out: dict[str, Any] = {"clients": args.vanish, "connect_close_s": time.monotonic() - start}
    deadline = time.monotonic() + 120
    while server_state(pid)["fds"] > before + 5 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    out["server_released_s"] = time.monotonic() - start
    out["fds_left_over"] = server_state(pid)["fds"] - before
    out["chat_after"] = await probes(port, chat("fast", False, "hello there"), args.probes)
    return out


def copy_log(stream: Any, sink: Any) -> None:
    for raw in stream:
        if sink is not None:
            sink.write(raw.decode(errors="replace"))
            sink.flush()


def start_frontend(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], int]:
    """The frontend pinned to core 0 (set before the fork, so all its threads inherit it)."""
    cmd = [sys.executable, __file__, "--serve", args.http_interface]
    cmd += [str(args.read_timeout), str(args.token_delay_ms)]
    os.sched_setaffinity(0, {0})
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    sink = open(args.frontend_log, "w") if args.frontend_log else None  # noqa: SIM115
    _common.pin_self(1)
    stream = proc.stderr
    assert stream is not None
    log: list[str] = []
    for raw in stream:
        log.append(raw.decode(errors="replace"))
        if sink is not None:
            sink.write(log[-1])
        match = READY.search(log[-1])
        if match:
            # Keep draining its log, so that it never blocks on a full pipe.
            threading.Thread(target=copy_log, args=(stream, sink), daemon=True).start()
            return proc, int(match.group(1).rsplit(":", 1)[1])
    raise RuntimeError("the frontend exited before it was ready:\n" + "".join(log))


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve_models(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--http-interface", default="rsgi", choices=["rsgi", "asgi"])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--loris", type=int, default=2_000)
    parser.add_argument("--vanish", type=int, default=5_000)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--read-timeout", type=float, default=10.0)
    parser.add_argument("--token-delay-ms", type=float, default=5000.0)
    parser.add_argument(
        "--drain-wait", type=float, default=60.0, help="seconds to wait for in-flight to be 0"
    )
    parser.add_argument(
        "--starve-drain",
        type=float,
        metavar="DUTY",
        help="while in-flight drains, let the frontend run only this share of each 100 ms",
    )
    parser.add_argument("--frontend-log", help="write the frontend's log to this file")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    _common.check_cores(0, 1)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    proc, port = start_frontend(args)
    print(f"client on core 1, frontend (pid {proc.pid}) on core 0, {args.http_interface}")
    try:
        results = {
            "interface": args.http_interface,
            "idle": server_state(proc.pid),
            "streams": asyncio.run(phase_streams(port, proc.pid, args)),
            "slow_loris": asyncio.run(phase_loris(port, args)),
            "connect_vanish": asyncio.run(phase_vanish(port, proc.pid, args)),
        }
    finally:
        proc.terminate()
        proc.wait(30)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    streams, loris, vanish = results["streams"], results["slow_loris"], results["connect_vanish"]
    ok = (
        streams["with_headers"] == args.streams
        and not streams["inflight_after_close"]
        and loris["closed_by_server"] == args.loris
        and vanish["fds_left_over"] <= 5
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
