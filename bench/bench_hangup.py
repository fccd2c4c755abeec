"""How fast the engine learns of a client hang-up, in every window of a request.

Runs a frontend in this process (granian by default) in front of a fake engine that hangs at a
chosen point, connects with raw sockets, hangs up (RST or FIN) in each window, and reports how
long after the hang-up the engine's own context was killed (from the engine's record, the same
monotonic clock). Optional background load (`--load N` clients streaming 100-token echo chats
through the same frontend, on the same core) shows the figure under pressure. Target: within
5 ms in every window.

    .venv/bin/python bench/bench_hangup.py --trials 200
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import statistics
import sys
import time

import msgspec

from dynamo_llm.engines.echo import EchoEngine
from dynamo_llm.http.app import ServedModel
from dynamo_llm.runtime import SystemClock
from dynamo_llm.testing import FakeEngine, running_frontend

WINDOWS = {
    "unary": (False, 0),
    "before-first-token": (True, 0),
    "mid-stream": (True, 3),
}


def request_bytes(stream: bool) -> bytes:
    body = msgspec.json.encode(
        {"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    )
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


async def one_trial(port: int, engine: FakeEngine, stream: bool, skip: int, how: str) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    before = len(engine.calls)
    writer.write(request_bytes(stream))
    await writer.drain()
    while len(engine.calls) == before:
        engine.called.clear()
        await engine.called.wait()
    call = engine.calls[-1]
    await call.waiting.wait()
    seen = 0
    while seen < skip:
        line = await reader.readline()
        if line.startswith(b"data: "):
            seen += 1
    sock = writer.get_extra_info("socket")
    t0 = time.perf_counter()
    if how == "rst":
        writer.transport.abort()
    else:
        sock.shutdown(socket.SHUT_RDWR)
        writer.close()
    await call.killed.wait()
    assert call.killed_at is not None
    return (call.killed_at - t0) * 1000


LOAD_PROMPT = " ".join(["word"] * 100)


async def load_client(port: int, stop: asyncio.Event, counter: list[int]) -> None:
    """Stream 100-token echo chats back to back until told to stop."""
    body = msgspec.json.encode(
        {"model": "load", "stream": True, "messages": [{"role": "user", "content": LOAD_PROMPT}]}
    )
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    while not stop.is_set():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await reader.read()  # until the server closes after [DONE]
        writer.close()
        counter[0] += 1


async def run(args: argparse.Namespace) -> int:
    worst = 0.0
    for interface in args.interface:
        for window, (stream, hang_after) in WINDOWS.items():
            engine = FakeEngine(tokens=["a"] * 8, hang_after=hang_after)
            models = [
                ServedModel("m", engine),
                ServedModel("load", EchoEngine(SystemClock(), delay_ms=args.load_delay_ms)),
            ]
            async with running_frontend(models=models, interface=interface) as fe:
                stop = asyncio.Event()
                done = [0]
                loaders = [
                    asyncio.create_task(load_client(fe.server.port, stop, done))
                    for _ in range(args.load)
                ]
                for _ in range(5):  # warm-up
                    await one_trial(fe.server.port, engine, stream, hang_after, args.how)
                samples = [
                    await one_trial(fe.server.port, engine, stream, hang_after, args.how)
                    for _ in range(args.trials)
                ]
                stop.set()
                await asyncio.gather(*loaders)
                await fe.app.wait_until_idle()
                leaked = fe.value("inflight_requests")
            samples.sort()
            p50 = statistics.median(samples)
            p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
            worst = max(worst, samples[-1])
            print(
                f"{interface:5s} {window:19s} {args.how}: p50 {p50:6.3f} ms  p99 {p99:6.3f} ms  "
                f"max {samples[-1]:6.3f} ms  (n={len(samples)}, load streams done={done[0]}, "
                f"inflight after={leaked:g})"
            )
    print(f"worst case over every window: {worst:.3f} ms (target 5 ms)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100, help="hang-ups per window")
    parser.add_argument(
        "--how", choices=("rst", "fin"), default="rst", help="how the client closes"
    )
    parser.add_argument(
        "--interface",
        nargs="+",
        default=["rsgi", "asgi"],
        choices=("rsgi", "asgi"),
        help="server interfaces to measure",
    )
    parser.add_argument(
        "--load", type=int, default=0, help="background 100-token echo streams while measuring"
    )
    parser.add_argument(
        "--load-delay-ms", type=float, default=10.0, help="echo delay per token of the load"
    )
    parser.add_argument("--cpu", type=int, default=0, help="pin this process to this core")
    args = parser.parse_args()
    logging.getLogger("dynamo_llm.http.disconnect").setLevel(logging.ERROR)  # one line per hang-up
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    print(
        f"client and frontend share core {args.cpu} (one process, one event loop)", file=sys.stderr
    )
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
