"""What reading a worker's engine-reported load costs: one scrape of its ``/metrics``.

Starts a ``dynamo-llm worker --engine mocker`` child process, scrapes its ``/metrics`` the way
the frontend does (``transport.scrape.scrape_engine_load``) ``--scrapes`` times in a row, and
reports per scrape the frontend's CPU (this process), the worker's CPU (from ``/proc``) and the
wall time, then the parse alone on the worker's text and on a text 40 times larger (about a
vLLM exposition, which is mostly histograms). The frontend scrapes each worker once per
``--worker-metrics-interval-secs`` (1 s by default), whatever the request rate.

    .venv/bin/python bench/bench_scrape.py --scrapes 300
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import aiohttp

from dynamo_llm.testing.process import ServerProcess
from dynamo_llm.transport.scrape import parse_engine_load, scrape_engine_load


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_cost(text: str, times: int) -> float:
    start = time.process_time()
    for _ in range(times):
        parse_engine_load(text)
    return (time.process_time() - start) / times


async def scrape_cost(url: str, pid: int, scrapes: int) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            text = await resp.text()
        await scrape_engine_load(session, url, within=5)  # the pooled connection is open
        worker0, mine0, wall0 = cpu_seconds(pid), time.process_time(), time.perf_counter()
        for _ in range(scrapes):
            await scrape_engine_load(session, url, within=5)
        worker1, mine1, wall1 = cpu_seconds(pid), time.process_time(), time.perf_counter()
    print(f"worker /metrics: {len(text)} bytes; per scrape, over {scrapes}:")
    print(f"  frontend CPU {(mine1 - mine0) / scrapes * 1e3:.3f} ms")
    print(f"  worker CPU   {(worker1 - worker0) / scrapes * 1e3:.3f} ms (clock-tick resolution)")
    print(f"  wall         {(wall1 - wall0) / scrapes * 1e3:.3f} ms")
    print(f"parse alone: {parse_cost(text, 2000) * 1e6:.0f} us; ", end="")
    big = text * 40
    print(f"{len(big)} bytes: {parse_cost(big, 200) * 1e3:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scrapes", type=int, default=300)
    args = parser.parse_args()
    with ServerProcess(["worker", "--engine", "mocker", "--http-port", "0"]) as worker:
        url = worker.wait_ready(timeout=30) + "/metrics"
        asyncio.run(scrape_cost(url, worker.pid, args.scrapes))


if __name__ == "__main__":
    main()
