"""Helpers that tests of both tiers use (``unit/`` and ``system/``)."""

import asyncio
import inspect
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_llm.router import Worker, WorkerSet


def registered(workers: WorkerSet, url: str) -> Worker:
    """The worker ``url`` of ``workers``; fails the test if it is not registered."""
    worker = workers.get(url)
    assert worker is not None, f"{url} is not registered"
    return worker


def write(path: Path, text: str) -> None:
    """Rewrite the file and move its mtime on by a second, whatever the file system's
    timestamp granularity, so that the change is visible to a reload."""
    stamp = path.stat().st_mtime if path.exists() else 1_000_000.0
    path.write_text(text)
    os.utime(path, (stamp + 1, stamp + 1))


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll another process's state until ``condition`` holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"safety net: {what} not seen within {timeout}s")
        time.sleep(0.02)


async def polled(
    condition: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 15.0
) -> float:
    """:func:`wait_for` for a test on an event loop: poll state another process changes (the
    condition may be a coroutine function) until it holds; the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return loop.time() - start
        if loop.time() - start > timeout:
            raise AssertionError(f"safety net: {what} not seen within {timeout}s")
        await asyncio.sleep(0.02)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """The samples of another process's ``/metrics`` (blocking: from a test on a loop, call it
    in a thread), by name and labels."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def environ_without_dyn() -> dict[str, str]:
    """This process's environment without ``DYN_*``, for a child that must see only its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DYN_")}


def chat_chunk_event(
    content: str | None,
    finish: str | None = None,
    *,
    chunk_id: str = "chatcmpl-up",
    model: str = "m",
    **extra: object,
) -> bytes:
    """One SSE event of a worker's streamed chat: a content delta (``None``: no choice, as in a
    usage chunk), with ``extra`` top-level keys."""
    choices = [] if content is None else [
        {"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": finish}
    ]  # fmt: skip
    obj = {"id": chunk_id, "object": "chat.completion.chunk", "created": 1, "model": model,
           "choices": choices, **extra}  # fmt: skip
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
