"""``--num-workers``: streamed requests/s and CPU per request with 1, 2 and ``auto`` processes.

The same fast fake worker and closed-loop load as ``bench_router.py`` (its ``FakeWorker`` and
``measure``), but nothing is pinned: the frontend's processes, the fake worker and this load
generator share every core, as they would on a small machine running everything. For each
``--workers`` value (default ``1,2,auto``) the script starts ``dynamo-llm serve --upstream
<worker> --num-workers N`` and measures, per round, the load sent **direct** to the worker and
then **through** each frontend: req/s, the ratio to direct, and the frontend's CPU per request
summed over its whole process tree (the supervising parent and every child, each read from
``/proc/<pid>/stat`` over the window; a child restarted during a window would be missed, and
the script says so if the set of children changed).

What it can show on a 2-core machine: with one process the frontend can use at most one core;
with two, the kernel may give it both, but the fake worker and the load generator need CPU too,
so the gain is bounded by what they leave. Read req/s with the cores' busy figures.

Run: ``.venv/bin/python bench/bench_num_workers.py`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import _common
import bench_router
from dynamo_llm.testing.process import ServerProcess


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (the supervisor's frontend processes)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


async def measure_tree(
    args: argparse.Namespace, url: str, root: int, worker: int
) -> dict[str, Any]:
    procs = [root, *children(root)]
    pids = {f"p{pid}": pid for pid in procs}
    pids["worker"] = worker
    r = await bench_router.measure(args, url, pids)
    after = [root, *children(root)]
    frontend_ms = sum(ms for name, ms in r["cpu_ms"].items() if name.startswith("p"))
    r["frontend_ms"] = frontend_ms
    r["processes"] = len(procs)
    r["changed"] = sorted(after) != sorted(procs)
    return r


async def run(
    args: argparse.Namespace, worker: bench_router.FakeWorker, fronts: dict[str, Any]
) -> int:
    failed = False
    rows: dict[str, list[tuple[float, float, float]]] = {n: [] for n in fronts}
    for k in range(1, args.rounds + 1):
        print(f"round {k}:")
        direct = await bench_router.measure(args, worker.url, {"worker": worker.pid})
        print(bench_router.describe("direct", direct, args.tokens), flush=True)
        failed = failed or bool(direct["errors"])
        for name, server in fronts.items():
            r = await measure_tree(args, server.url, server.pid, worker.pid)
            ratio = r["rps"] / direct["rps"] if direct["rps"] else float("nan")
            print(bench_router.describe(f"N={name}", r, args.tokens), flush=True)
            print(
                f"  --num-workers {name}: {r['processes']} processes, frontend CPU "
                f"{r['frontend_ms']:.3f} ms per request (whole tree), ratio to direct {ratio:.3f}"
                + ("; WARNING: its processes changed during the window" if r["changed"] else "")
            )
            rows[name].append((r["rps"], r["frontend_ms"], ratio))
            failed = failed or bool(r["errors"])
    print("summary (per round: req/s, frontend CPU ms/request, ratio to direct):")
    for name, cells in rows.items():
        text = " / ".join(f"{rps:.0f} req/s, {ms:.3f} ms, {ratio:.3f}" for rps, ms, ratio in cells)
        print(f"  --num-workers {name:<5} {text}")
    if failed:
        print("FAILED: some responses were wrong (see above)", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workers", default="1,2,auto", help="--num-workers values, comma-separated"
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=100, help="streamed tokens per request")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gap-ms", type=float, default=0.0, help="as bench_router.py's")
    # bench_router.measure reads its own options: streamed chats, as its default.
    parser.set_defaults(unary=False)
    args = parser.parse_args()
    cores = sorted(_common.AVAILABLE_CPUS)
    # bench_router.measure reports these cores' busy share: here, every core.
    args.frontend_cpu, args.worker_cpu = cores[0], cores[-1]
    worker = bench_router.FakeWorker(args.tokens, args.gap_ms)
    fronts: dict[str, Any] = {}
    try:
        for n in [w for w in args.workers.split(",") if w]:
            server = ServerProcess(
                [
                    *("serve", "--upstream", worker.url, "--http-port", "0"),
                    *("--log-level", "warning", "--num-workers", n),
                ]
            )
            fronts[n] = server
            server.wait_ready(60)
        print(
            f"cores: nothing pinned; the frontends (--num-workers {args.workers}, one loaded at "
            f"a time), the fake worker (bad_workers ok, {args.tokens} tokens) and this load "
            f"generator share cores {cores}\nmachine: {_common.cpu_model()}, {os.cpu_count()} "
            f"cores; Python {sys.version.split()[0]}; concurrency {args.concurrency}, warm-up "
            f"{args.warmup:g} s, window {args.duration:g} s"
        )
        return asyncio.run(run(args, worker, fronts))
    finally:
        for server in fronts.values():
            server.stop()
        worker.stop()


if __name__ == "__main__":
    sys.exit(main())
