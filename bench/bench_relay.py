"""The relay path alone, in-process: CPU time per relayed stream, whatever else the machine runs.

``bench_router.py`` measures the frontend as a whole, but its figure moves with the load on the
machine (a starved frontend finds more events per read). This script takes the sockets out: a
worker's streamed answer (``--tokens`` vLLM-shaped chat chunks, then the finish chunk, the usage
chunk and ``[DONE]``, each its own HTTP chunk as a worker writes them) is fed to aiohttp's real
response reader in ``--reads`` pieces, and the transport's :class:`RemoteStream` (the raw relay:
read, cut, relay or parse, rewrite) turns it into outputs, as in ``serve --upstream``. It reports
the CPU time (``time.process_time``) per stream over ``--streams`` streams, best of
``--repeat``. The feeding costs the same in every tree, so run it under two ``PYTHONPATH`` values
to compare two trees.

Run: ``PYTHONPATH=src .venv/bin/python bench/bench_relay.py`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import aiohttp
from aiohttp.base_protocol import BaseProtocol
from multidict import CIMultiDict, CIMultiDictProxy

import dynamo_llm
from dynamo_llm.runtime.context import EngineContext
from dynamo_llm.transport.stream import RemoteStream, StreamMode


def event(content: str | None, finish: str | None = None, **extra: Any) -> bytes:
    choices = [] if content is None else [
        {"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": finish}
    ]  # fmt: skip
    obj = {"id": "chatcmpl-3f9a1c0e6b7d4e2f8a5b9c1d0e2f3a4b", "object": "chat.completion.chunk",
           "created": 1764000000, "model": "meta-llama/Llama-3.1-8B-Instruct",
           "choices": choices, **extra}  # fmt: skip
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def answer(tokens: int) -> list[bytes]:
    """The worker's events, one HTTP chunk each."""
    usage = {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}
    return [
        event(""),
        *(event(f" word{i}") for i in range(tokens)),
        event("", "stop"),
        event(None, usage=usage),
        b"data: [DONE]\n\n",
    ]


class _Protocol(BaseProtocol):
    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._reading_paused = False


class _Transport(asyncio.Transport):
    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Response:
    """What RemoteStream uses of an aiohttp response, over a real StreamReader."""

    status = 200
    content_type = "text/event-stream"

    def __init__(self, content: aiohttp.StreamReader) -> None:
        self.content = content
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())

    def close(self) -> None:
        pass

    def release(self) -> None:
        pass


async def one_stream(groups: list[list[bytes]], session: Any) -> int:
    loop = asyncio.get_running_loop()
    protocol = _Protocol(loop)
    protocol.transport = _Transport()
    content = aiohttp.StreamReader(protocol, 2**16, loop=loop)
    content.begin_http_chunk_receiving()
    resp = _Response(content)
    stream = RemoteStream(
        session,
        "http://worker",
        resp,  # type: ignore[arg-type]
        EngineContext("c0ffee00-0000-4000-8000-000000000000"),
        request_id="c0ffee00-0000-4000-8000-000000000000",
        response_id="chatcmpl-ours",
        model="llama",
        mode=StreamMode.RELAY,
        is_ours=False,
        deadline=None,
    )
    # The stream is driven by hand, without the event loop: each read's chunks are fed, then
    # the stream is resumed until it waits for the next read (the reader's waiter), so every
    # tree sees exactly the same reads and nothing else is measured but feeding them.
    outputs = 0
    step: Any = None
    last = len(groups) - 1
    for k, group in enumerate(groups):
        for chunk in group:
            content.feed_data(chunk)
            content.end_http_chunk_receiving()
        if k == last:
            content.feed_eof()
        while True:
            if step is None:
                step = stream.__anext__().__await__()
            try:
                step.send(None)
            except StopIteration:
                outputs += 1
                step = None
                continue
            except StopAsyncIteration:
                return outputs
            break  # waiting for the next read
    raise AssertionError("the stream did not end")


async def run(args: argparse.Namespace) -> None:
    events = answer(args.tokens)
    per = -(-len(events) // args.reads)
    groups = [events[i : i + per] for i in range(0, len(events), per)]
    best = float("inf")
    outputs = 0
    for _ in range(args.repeat):
        t0 = time.process_time()
        for _ in range(args.streams):
            outputs = await one_stream(groups, None)
        best = min(best, (time.process_time() - t0) / args.streams)
    print(
        f"{dynamo_llm.__file__}: {args.tokens} tokens in {len(groups)} reads, {outputs} outputs "
        f"per stream: {1e6 * best:.1f} µs CPU per stream (best of {args.repeat} x "
        f"{args.streams} streams)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--reads", type=int, default=16, help="reads the answer arrives in")
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    asyncio.run(run(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
