"""An engine's own load, read from its Prometheus ``/metrics``: running, queued, KV use.

Each engine names its scheduler state its own way; :func:`parse_engine_load` reads whichever of
these the text has, summing the series of a name (e.g. one per model or data-parallel rank):

- **vLLM**: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
  ``vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc`` before 0.10);
- **SGLang**: ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``, ``sglang:token_usage``;
- **llama.cpp** (``llama-server --metrics``): ``llamacpp:requests_processing``,
  ``llamacpp:requests_deferred``, ``llamacpp:kv_cache_usage_ratio`` where it has one;
- **our worker**: ``dynamo_mocker_running_requests``, ``dynamo_mocker_waiting_requests``,
  ``dynamo_mocker_kv_cache_usage_ratio``.

A text with neither a running nor a queued figure (an engine that exports none, e.g. our echo
worker) gives ``None``: the router then counts the requests it sent itself. Only the lines of
those names are parsed (a vLLM exposition is mostly histograms), so a scrape costs a scan of
the text and a few float conversions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import aiohttp

__all__ = ["EngineLoad", "parse_engine_load", "scrape_engine_load"]

_RUNNING = (
    "vllm:num_requests_running",
    "sglang:num_running_reqs",
    "llamacpp:requests_processing",
    "dynamo_mocker_running_requests",
)
_QUEUED = (
    "vllm:num_requests_waiting",
    "sglang:num_queue_reqs",
    "llamacpp:requests_deferred",
    "dynamo_mocker_waiting_requests",
)
_KV = (
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "sglang:token_usage",
    "llamacpp:kv_cache_usage_ratio",
    "dynamo_mocker_kv_cache_usage_ratio",
)
_KIND = {name: 0 for name in _RUNNING} | {name: 1 for name in _QUEUED} | {n: 2 for n in _KV}
_FIRST = tuple({name[0] for name in _KIND})
_MAX_BODY = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What an engine said about its own load at ``at`` (``time.monotonic()``)."""

    running: float
    queued: float
    kv_usage: float | None
    at: float

    @property
    def requests(self) -> float:
        """Requests the engine holds: running plus queued."""
        return self.running + self.queued


def parse_engine_load(text: str, at: float | None = None) -> EngineLoad | None:
    """The engine load in a Prometheus text exposition, or None when it reports none."""
    sums = [0.0, 0.0, 0.0]
    seen = [False, False, False]
    kv_name: str | None = None
    for line in text.splitlines():
        if not line.startswith(_FIRST):
            continue
        end = len(line)
        for stop in ("{", " "):
            i = line.find(stop)
            if 0 <= i < end:
                end = i
        kind = _KIND.get(line[:end])
        if kind is None:
            continue
        if kind == 2:
            # Two KV names in one text (vLLM's old and new): the first one seen wins.
            if kv_name is not None and kv_name != line[:end]:
                continue
            kv_name = line[:end]
        value = _sample_value(line, end)
        if value is None:
            continue
        sums[kind] += value
        seen[kind] = True
    if not (seen[0] or seen[1]):
        return None
    return EngineLoad(
        sums[0], sums[1], sums[2] if seen[2] else None, time.monotonic() if at is None else at
    )


def _sample_value(line: str, name_end: int) -> float | None:
    rest = line[name_end:]
    if rest.startswith("{"):
        close = rest.rfind("}")
        if close < 0:
            return None
        rest = rest[close + 1 :]
    parts = rest.split()
    if not parts:
        return None
    try:
        return float(parts[0])
    except ValueError:
        return None


async def scrape_engine_load(
    session: aiohttp.ClientSession, url: str, *, within: float
) -> EngineLoad | None:
    """``GET url`` (a worker's ``/metrics``) and parse it; raises ``aiohttp.ClientError``,
    ``TimeoutError`` or ``ValueError`` (an error status) when the scrape fails."""
    async with session.get(
        url, timeout=aiohttp.ClientTimeout(total=within), headers={"Accept": "text/plain"}
    ) as resp:
        if resp.status >= 400:
            raise ValueError(f"HTTP {resp.status}")
        parts: list[bytes] = []
        size = 0
        while size < _MAX_BODY and (part := await resp.content.read(_MAX_BODY - size)):
            parts.append(part)
            size += len(part)
    return parse_engine_load(b"".join(parts).decode(errors="replace"))
