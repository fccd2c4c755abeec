"""The active probe that decides whether a quarantined worker may come back (SPEC §8.2).

A worker's HTTP server answering is not the same as its engine generating: a vLLM whose
EngineCore hung still answers ``GET /health`` 200, and llama_cpp.server has no ``/health`` at all
(404). So the probe asks for what the router will ask for, a **1-token completion** with the
worker's own model name (``max_tokens: 1``, a tiny prompt, ``stream: false``), and passes only
when a completion comes back. It falls back across what the engine offers:

=============================  ==================================================================
probe                          passes when
=============================  ==================================================================
``POST /v1/completions``       2xx with a non-empty ``choices`` list
``POST /v1/chat/completions``  the same (one user message, ``max_tokens: 1``)
``GET /health``                2xx (an engine that offers neither generation route)
``GET /v1/models``             2xx
=============================  ==================================================================

A probe answered 404, 405 or 501 is one the engine does not offer: the next one is tried. Any
other answer decides: a timeout, a refused connection, a 5xx, a 2xx without a completion, or a
4xx other than those fails the probe, and the ones below it are *not* tried, so a hung engine
behind a live HTTP server stays out. The caller remembers which probe decided
(:attr:`ProbeResult.path`) and passes it back as ``first`` the next time, so an engine without
completions is not asked for them on every probe.

A probe whose connection the worker closes before any answer is asked once more: the connection
was most likely a pooled one the worker closed just as the probe went out on it (uvicorn closes
the connection of a request its app failed, llama_cpp.server's empty 200 among them, a moment
after the body ended), which says nothing about the engine; the second attempt gets a fresh
connection, and a worker that closes that one too fails the probe. One deadline (``within``)
bounds the whole probe; a probe that runs out of it closes its
connection, so a hung worker sees the request abandoned. The request id is a fresh UUID (some
engines, llama_cpp.server among them, refuse any other). A probe is not a client request: it
goes to the worker directly, past the frontend's request metrics.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import aiohttp
import msgspec

from .errors import describe, is_closed_unanswered, summarize_body

__all__ = [
    "CHAT_PROBE",
    "COMPLETIONS_PROBE",
    "HEALTH_PROBE",
    "MODELS_PROBE",
    "ProbeResult",
    "probe_worker",
]

COMPLETIONS_PROBE = "/v1/completions"
CHAT_PROBE = "/v1/chat/completions"
HEALTH_PROBE = "/health"
MODELS_PROBE = "/v1/models"

_GENERATION = (COMPLETIONS_PROBE, CHAT_PROBE)
_ORDER = (COMPLETIONS_PROBE, CHAT_PROBE, HEALTH_PROBE, MODELS_PROBE)
# Statuses that say "this server has no such route", not "this engine is broken".
_NOT_OFFERED = frozenset({404, 405, 501})
_PROMPT = "Hi"
_MAX_BODY = 65536


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What a probe found: truthy when the worker may come back.

    ``path`` is the probe that decided (to try first next time); None when the worker offered
    none of them. ``summary`` is for the log: each probe tried, its answer and latency.
    """

    ok: bool
    path: str | None
    summary: str

    def __bool__(self) -> bool:
        return self.ok


async def probe_worker(
    session: aiohttp.ClientSession,
    url: str,
    *,
    within: float,
    model: str | None,
    first: str | None = None,
) -> ProbeResult:
    """Probe the worker at ``url`` (see the module doc) within ``within`` seconds.

    ``model`` is the worker's own name for a model it serves; without one only ``/health`` and
    ``/v1/models`` can be asked. ``first`` is the probe that decided last time.
    """
    order = [p for p in _ORDER if model is not None or p not in _GENERATION]
    if first in order:
        order.remove(first)
        order.insert(0, first)
    base = url.rstrip("/")
    steps: list[str] = []
    deadline = time.monotonic() + within
    for path in order:
        started = time.monotonic()
        left = deadline - started
        if left <= 0:
            steps.append(f"{_method(path)} {path}: no time left")
            return ProbeResult(False, path, "; ".join(steps))
        try:
            try:
                status, body = await _ask(session, base, path, model, left)
            except aiohttp.ClientError as exc:
                # Closed before any answer: most likely a pooled connection the worker closed
                # just as the probe went out on it (see the module doc). Once more, afresh.
                left = deadline - time.monotonic()
                if not is_closed_unanswered(exc) or left <= 0:
                    raise
                steps.append(f"{_method(path)} {path}: {describe(exc)}, asked again")
                status, body = await _ask(session, base, path, model, left)
        except (TimeoutError, aiohttp.ClientError) as exc:
            elapsed = time.monotonic() - started
            if isinstance(exc, TimeoutError):
                what = "no answer"
            elif isinstance(exc, aiohttp.InvalidURL):
                what = "invalid URL"  # its text is the URL, which may hold credentials
            else:
                what = describe(exc)
            what = f"{what} after {_ms(elapsed)}"
            steps.append(f"{_method(path)} {path}: {what}")
            return ProbeResult(False, path, "; ".join(steps))
        elapsed = time.monotonic() - started
        step = f"{_method(path)} {path}: {status} in {_ms(elapsed)}"
        if status in _NOT_OFFERED:
            steps.append(f"{step} (not offered)")
            continue
        if not 200 <= status < 300:
            summary = summarize_body(body)
            steps.append(f"{step}: {summary}" if summary else step)
            return ProbeResult(False, path, "; ".join(steps))
        if path in _GENERATION and not _has_choices(body):
            summary = summarize_body(body) or "an empty body"
            steps.append(f"{step} but no completion: {summary}")
            return ProbeResult(False, path, "; ".join(steps))
        steps.append(step)
        return ProbeResult(True, path, "; ".join(steps))
    return ProbeResult(False, None, "; ".join(steps) + "; no probe offered")


async def _ask(
    session: aiohttp.ClientSession, base: str, path: str, model: str | None, within: float
) -> tuple[int, bytes]:
    timeout = aiohttp.ClientTimeout(total=within)
    headers = {"X-Request-Id": str(uuid.uuid4()), "Accept": "application/json"}
    if path in _GENERATION:
        assert model is not None
        body: dict[str, object] = {"model": model, "max_tokens": 1, "stream": False}
        if path == COMPLETIONS_PROBE:
            body["prompt"] = _PROMPT
        else:
            body["messages"] = [{"role": "user", "content": _PROMPT}]
        headers["Content-Type"] = "application/json"
        request = session.post(
            base + path, data=msgspec.json.encode(body), headers=headers, timeout=timeout
        )
    else:
        request = session.get(base + path, headers=headers, timeout=timeout)
    async with request as resp:
        parts: list[bytes] = []
        size = 0
        while size < _MAX_BODY and (part := await resp.content.read(_MAX_BODY - size)):
            parts.append(part)
            size += len(part)
        return resp.status, b"".join(parts)


def _has_choices(body: bytes) -> bool:
    try:
        answer = msgspec.json.decode(body)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return False
    if not isinstance(answer, dict):
        return False
    choices = answer.get("choices")
    return isinstance(choices, list) and bool(choices)


def _method(path: str) -> str:
    return "POST" if path in _GENERATION else "GET"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"
