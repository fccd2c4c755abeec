"""The process: ``python -m dynamo_llm.testing.bad_workers --behaviour B --port P`` serves one
behaviour on ``127.0.0.1`` and announces ``listening on http://127.0.0.1:<port>`` (flushed) on
stdout once it accepts connections."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys

from aiohttp import web

from .behaviours import BEHAVIOURS, Options, WorkerApp

__all__ = ["main", "serve"]


def _announce(port: int) -> None:
    sys.stdout.write(f"listening on http://127.0.0.1:{port}\n")
    sys.stdout.flush()


async def serve(options: Options, port: int) -> None:
    """Run one bad worker on ``127.0.0.1:port`` until the process is stopped."""
    if options.behaviour == "refuse":
        # Bound but not listening: the kernel answers every SYN with a reset.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        try:
            _announce(sock.getsockname()[1])
            await asyncio.Event().wait()
        finally:
            sock.close()
        return
    worker = WorkerApp(options)
    runner = web.AppRunner(worker.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        _announce(runner.addresses[0][1])
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dynamo_llm.testing.bad_workers")
    parser.add_argument("--behaviour", choices=BEHAVIOURS, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=5)
    parser.add_argument("--gap", type=float, default=0.0)
    parser.add_argument("--model", default="bad-model")
    parser.add_argument(
        "--foreign-ids", action="store_true", help="use its own response ids, as vLLM may"
    )
    parser.add_argument(
        "--owned-by",
        default="bad",
        help="its /v1/models' owned_by (dynamo-llm: the frontend takes it for one of its own)",
    )
    args = parser.parse_args(argv)
    options = Options(
        args.behaviour, args.tokens, args.gap, args.model, args.foreign_ids, args.owned_by
    )
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(options, args.port))
