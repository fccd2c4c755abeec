"""The relay path alone, in-process: CPU time per relayed stream, whatever else the machine runs.

``bench_router.py`` measures the frontend as a whole, but its figure moves with the load on the
machine (a starved frontend finds more events per read). This script takes the sockets out: a
worker's streamed answer (``--tokens`` vLLM-shaped chat chunks, then the finish chunk, the usage
chunk and ``[DONE]``, each its own HTTP chunk as a worker writes them) arrives as the bytes of
``--reads`` socket reads, after the response head, at the client's protocol
(``data_received``), and the transport's :class:`RemoteStream` (the raw relay: read, cut, relay
or parse, rewrite) turns it into outputs, as in ``serve --upstream``. It reports the CPU time
(``time.process_time``) per stream over ``--streams`` streams, best of ``--repeat``, for each
client the tree has (``--client``), alternating: this tree's ``h1``
(:mod:`dynamo_llm.transport.h1`) or, in a tree from before it, aiohttp's client protocol and C
parser (``aiohttp``). ``chain`` (trees with ``h1``) drives the whole per-event path of a routed
stream up to granian: the h1 client, the stream, the router's attempt and the HTTP layer's pump
(watchdogs, metrics record, SSE response and its flush) into a writer that drops the bytes.
The feeding costs the same in every tree, so run it under two ``PYTHONPATH`` values to compare
two trees. ``--reads`` N cuts the answer's events into reads of ceil(events / N) each: a
100-token answer is 104 events, so ``--reads 104`` is one event per read (a paced worker).

Run: ``PYTHONPATH=src .venv/bin/python bench/bench_relay.py`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import sys
import time
from typing import Any

import dynamo_llm
from dynamo_llm.runtime.context import EngineContext


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


def wire(events: list[bytes]) -> bytes:
    """The events as a worker writes them: one HTTP chunk each."""
    return b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)


HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\nDate: Wed, 02 Dec 2026 03:31:05 GMT\r\n"
    b"Server: Python/3.11 aiohttp/3.14.5\r\n\r\n"
)
REQUEST_ID = "c0ffee00-0000-4000-8000-000000000000"


class _Transport(asyncio.Transport):
    def write(self, data: Any) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def _drive(stream: Any, feed: Any, reads: list[bytes]) -> int:
    """Feed each read, then resume the stream until it waits for the next one, so every tree
    sees exactly the same reads and nothing else is measured but handling them."""
    outputs = 0
    step: Any = None
    for data in reads:
        feed(data)
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


def _stream(resp: Any, ctx: EngineContext | None = None) -> Any:
    from dynamo_llm.transport.stream import RemoteStream, StreamMode

    return RemoteStream(
        None,  # type: ignore[arg-type]
        "http://worker",
        resp,
        EngineContext(REQUEST_ID) if ctx is None else ctx,
        request_id=REQUEST_ID,
        response_id="chatcmpl-ours",
        model="llama",
        mode=StreamMode.RELAY,
        is_ours=False,
        deadline=None,
    )


def stream_h1(reads: list[bytes]) -> int:
    """This tree's client: :class:`dynamo_llm.transport.h1.Connection` over a fake transport."""
    from dynamo_llm.transport.h1 import Connection

    conn = Connection()
    conn.connection_made(_Transport())
    sent = conn.request(b"").__await__()
    sent.send(None)  # the request is written; waiting for the head
    conn.data_received(HEAD)
    with contextlib.suppress(StopIteration):
        sent.send(None)
    return _drive(_stream(conn), conn.data_received, reads)


class _Writer:
    closed_errors = (ConnectionError,)

    async def send(self, data: bytes) -> None:
        pass


class _Conn:
    is_disconnected = False

    async def start_stream(self, status: int, headers: Any) -> _Writer:
        return _Writer()


_METRICS: Any = None


def stream_chain(reads: list[bytes]) -> int:
    """The whole per-event chain of ``serve --upstream``, as far as granian: the h1 client,
    :class:`RemoteStream`, the router's attempt (its watchdog, TTFT) and the HTTP layer's pump
    (request watchdog, metrics record, SSE response, flush), into a writer that drops the bytes.
    Returns the number of tokens the request's record counted (one per content event)."""
    from types import SimpleNamespace

    from dynamo_llm.engines.base import OwnedStream
    from dynamo_llm.http import stream as http_stream
    from dynamo_llm.http.sse import ChunkRenderer
    from dynamo_llm.metrics import Metrics
    from dynamo_llm.metrics.record import RequestRecord
    from dynamo_llm.router.attempt import Attempt, AttemptLimits
    from dynamo_llm.router.membership import Worker
    from dynamo_llm.router.slot import InflightSlot
    from dynamo_llm.runtime.clock import SystemClock
    from dynamo_llm.runtime.watchdog import Watchdog
    from dynamo_llm.transport.h1 import Connection

    global _METRICS
    if _METRICS is None:
        _METRICS = Metrics()
    clock = SystemClock()
    ctx = EngineContext(REQUEST_ID)
    record = RequestRecord(_METRICS, "chat_completions", clock)
    record.admit("llama")
    exchange = SimpleNamespace(
        ctx=ctx,
        watchdog=Watchdog(clock, ctx, inactivity=60.0, first_token=None, deadline=None),
        record=record,
        conn=_Conn(),
        request_id=REQUEST_ID,
    )
    worker = Worker("http://worker", ["llama"])
    workers = SimpleNamespace(report_ok=lambda *a: None, report_down=lambda *a: None)
    attempt = Attempt(
        worker,
        InflightSlot(worker, 0, lambda n: None),
        ctx,
        workers=workers,  # type: ignore[arg-type]
        clock=clock,
        limits=AttemptLimits(inactivity=30.0),
    )
    ctx.link_child(attempt.context)
    attempt._started = clock.now()
    attempt._dog.start()

    conn = Connection()
    conn.connection_made(_Transport())
    sent = conn.request(b"").__await__()
    sent.send(None)
    conn.data_received(HEAD)
    with contextlib.suppress(StopIteration):
        sent.send(None)
    remote = _stream(conn, attempt.context)
    attempt._stream = remote
    owned = OwnedStream(attempt._relay(remote), attempt.aclose)
    response = http_stream.SseResponse(exchange, [])  # type: ignore[arg-type]
    try:
        state = http_stream._PumpState(response)
    except TypeError:  # trees before the pump's state held its response
        state = http_stream._PumpState()  # type: ignore[call-arg]
    renderer = ChunkRenderer("chat", "chatcmpl-ours", "llama", 0)
    pump = http_stream._pump(owned, response, renderer, exchange, state)  # type: ignore[arg-type]
    for data in reads:
        conn.data_received(data)
        try:
            pump.send(None)
        except StopIteration as end:
            if end.value != "ended":
                raise AssertionError(f"the pump ended with {end.value!r}") from None
            return record.output_tokens
    raise AssertionError("the pump did not end")


def stream_aiohttp(reads: list[bytes]) -> int:
    """aiohttp's client (trees before ``transport/h1.py``): its protocol and C parser."""
    from aiohttp.client_proto import ResponseHandler

    class _Response:
        status = 200
        content_type = "text/event-stream"

        def __init__(self, content: Any, headers: Any) -> None:
            self.content = content
            self.headers = headers

        def close(self) -> None:
            pass

        def release(self) -> None:
            pass

    loop = asyncio.get_running_loop()
    proto = ResponseHandler(loop)
    proto.connection_made(_Transport())
    proto.set_response_params(read_bufsize=2**16)
    proto.data_received(HEAD)
    entry = proto._buffer.popleft()
    message, payload = entry[0] if isinstance(entry[0], tuple) else entry
    return _drive(_stream(_Response(payload, message.headers)), proto.data_received, reads)


def clients() -> dict[str, Any]:
    """The clients this tree can run, by name."""
    if importlib.util.find_spec("dynamo_llm.transport.h1") is None:
        return {"aiohttp": stream_aiohttp}
    return {"h1": stream_h1, "chain": stream_chain}


async def run(args: argparse.Namespace) -> None:
    events = answer(args.tokens)
    per = -(-len(events) // args.reads)
    reads = [wire(events[i : i + per]) for i in range(0, len(events), per)]
    reads[-1] += b"0\r\n\r\n"
    available = clients()
    chosen = args.client or list(available)
    best = dict.fromkeys(chosen, float("inf"))
    outputs = dict.fromkeys(chosen, 0)
    for _ in range(args.repeat):
        for name in chosen:  # alternating, so a change in the machine's load hits all alike
            one = available[name]
            t0 = time.process_time()
            for _ in range(args.streams):
                outputs[name] = one(reads)
            best[name] = min(best[name], (time.process_time() - t0) / args.streams)
    for name in chosen:
        print(
            f"{dynamo_llm.__file__} [{name}]: {args.tokens} tokens in {len(reads)} reads, "
            f"{outputs[name]} {'tokens counted' if name == 'chain' else 'outputs'} per stream: "
            f"{1e6 * best[name]:.1f} µs CPU per stream (best of "
            f"{args.repeat} x {args.streams} streams)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--reads", type=int, default=16, help="reads the answer arrives in")
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--client",
        action="append",
        help="aiohttp (trees before transport/h1.py), h1, or chain (h1 through the attempt and "
        "the HTTP layer's pump; default: what the tree has)",
    )
    asyncio.run(run(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
