"""No request stalls the loop: the worst gap a concurrent stream sees while a large body is read,
decoded, validated and tokenized.

Starts the frontend of ``bench_connections.py`` with a ``mocker`` model added (pinned to core
0; the client on core 1), opens one stream to ``tick`` (an echo model sending a token every
2 ms), and then, one at a time, sends chat bodies of ``--sizes`` MB to the model ``--engine``
picks: ``sink`` (default; an engine that answers one token without looking at the prompt, so
what is measured is the HTTP layer: reading the body, decoding and validating it, building the
engine request), ``echo`` (the echo engine, which tokenizes the prompt) or ``mocker`` (its word
tokenizer, a 1M-token window, a 1000x speed-up). Two shapes: one user message holding the whole
size, and many 5 KB messages. For each it prints the status, the time to the answer, and the
longest gap between two tick events while the body was in the frontend's hands (and, as a
baseline, the longest gap in the second before).

    .venv/bin/python bench/bench_large_body.py [--sizes 1,4,16,44] [--http-interface asgi]
        [--engine sink|echo|mocker] [--repeat 5]

With ``--repeat`` each body is sent that many times and the medians are printed at the end (on
a shared machine one load spike can hide a single measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import _common
import bench_connections

MB = 1024 * 1024
SHAPES = ("one", "many")
MODELS = {"sink": "sink", "echo": "fast", "mocker": "mocker"}  # --engine: the model sent to


def serve(interface: str) -> None:
    """bench_connections' frontend, plus ``mocker``: a mocker that accepts a 4 MB prompt."""
    from dynamo_llm.engines.mocker import MockerConfig, MockerEngine
    from dynamo_llm.http import app

    create_app = app.create_app
    mocker = MockerConfig(context_length=1 << 20, speedup_ratio=1000.0)

    def with_mocker(config: Any, models: list[Any], *args: Any, **kwargs: Any) -> Any:
        models = [*models, app.ServedModel("mocker", MockerEngine(mocker))]
        return create_app(config, models, *args, **kwargs)

    app.create_app = with_mocker  # type: ignore[assignment]
    bench_connections.serve_models(interface, 30.0, 2.0)


def start_frontend(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], int]:
    """As ``bench_connections.start_frontend`` (core 0, client core 1), serving :func:`serve`."""
    cmd = [sys.executable, __file__, "--serve", args.http_interface]
    os.sched_setaffinity(0, {0})  # before the fork, so that all the frontend's threads inherit it
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    _common.pin_self(1)
    assert proc.stderr is not None
    for raw in proc.stderr:
        match = bench_connections.READY.search(raw.decode(errors="replace"))
        if match:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(match.group(1).rsplit(":", 1)[1])
    raise RuntimeError("the frontend exited before it was ready")


def body(size_mb: float, shape: str, model: str = "sink") -> bytes:
    size = int(size_mb * MB)
    if shape == "one":
        words = ("lorem ipsum dolor sit amet " * (size // 27 + 1))[: size - 120]
        messages = [{"role": "user", "content": words}]
    else:
        text = "lorem ipsum dolor sit amet " * 190
        count = max(1, size // (len(text) + 40))
        messages = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": text} for i in range(count)
        ]
    return json.dumps({"model": model, "max_tokens": 1, "messages": messages}).encode()


def post(data: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )


async def ticks(port: int, seen: list[float], started: asyncio.Event, count: int) -> None:
    words = " ".join(f"w{i}" for i in range(count))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(bench_connections.chat("tick", True, words))
    try:
        while line := await reader.readline():
            if line.startswith(b"data: "):
                seen.append(time.monotonic())
                started.set()
    finally:
        writer.close()


def worst_gap(seen: list[float], start: float, end: float) -> float:
    inside = [t for t in seen if start <= t <= end]
    after = next((t for t in seen if t > end), end)
    before = max((t for t in seen if t < start), default=start)
    points = [before, *inside, after]
    return max(b - a for a, b in itertools.pairwise(points))


async def run(port: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    # Built before the tick stream starts: building one takes the client's loop long enough
    # to show up as a gap of its own.
    model = MODELS[args.engine]
    bodies = {
        (shape, size): post(body(size, shape, model)) for shape in SHAPES for size in args.sizes
    }
    seen: list[float] = []
    started = asyncio.Event()
    # 2 ms a tick: enough words for the whole run.
    count = 20_000 * args.repeat
    ticker = asyncio.create_task(ticks(port, seen, started, count))
    await started.wait()
    results = []
    for shape, size, repeat in itertools.product(SHAPES, args.sizes, range(args.repeat)):
        data = bodies[shape, size]
        await asyncio.sleep(1.0)
        start = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        answer = await reader.read()
        end = time.monotonic()
        writer.close()
        status = int(answer.split(b" ", 2)[1]) if answer else 0
        await asyncio.sleep(0.1)
        results.append(
            {
                "shape": shape,
                "size_mb": size,
                "repeat": repeat,
                "status": status,
                "answer_ms": 1000 * (end - start),
                "worst_gap_ms": 1000 * worst_gap(seen, start, end),
                "baseline_gap_ms": 1000 * worst_gap(seen, start - 1.0, start - 0.001),
            }
        )
        row = results[-1]
        print(
            f"{shape:>4} message(s) {size:6.1f} MB: {status} in {row['answer_ms']:7.1f} ms, "
            f"worst gap {row['worst_gap_ms']:7.1f} ms "
            f"(before: {row['baseline_gap_ms']:.1f} ms)",
            flush=True,
        )
    ticker.cancel()
    if args.repeat > 1:
        print("medians over the repeats: worst gap (before)")
        for shape, size in itertools.product(SHAPES, args.sizes):
            rows = [r for r in results if (r["shape"], r["size_mb"]) == (shape, size)]
            gap = statistics.median(r["worst_gap_ms"] for r in rows)
            base = statistics.median(r["baseline_gap_ms"] for r in rows)
            print(f"{shape:>4} message(s) {size:6.1f} MB: {gap:7.1f} ms ({base:.1f} ms)")
    return results


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(sys.argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--http-interface", default="rsgi", choices=["rsgi", "asgi"])
    parser.add_argument(
        "--sizes", default="1,4,16,44", type=lambda s: [float(x) for x in s.split(",")]
    )
    parser.add_argument("--engine", default="sink", choices=sorted(MODELS))
    parser.add_argument("--repeat", type=int, default=1, help="send each body this many times")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    _common.check_cores(0, 1)
    proc, port = start_frontend(args)
    print(
        f"client on core 1, frontend (pid {proc.pid}) on core 0, {args.http_interface}, "
        f"bodies to {MODELS[args.engine]} ({args.engine})"
    )
    try:
        results = asyncio.run(run(port, args))
    finally:
        proc.terminate()
        proc.wait(30)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all(r["status"] == 200 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
