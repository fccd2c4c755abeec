"""What the cases send and how they read answers: the official ``openai`` client, folded.

A case sends the same request to the frontend and to an engine reached directly, and compares
what each gives back. :func:`stream_chat` and :func:`stream_completion` fold a stream the way
the OpenAI SDK users do (text concatenated, tool-call deltas merged by index, logprob entries
concatenated) so a streamed answer compares with a unary one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from openai import OpenAI

from tests.engines.harness import MODEL

TIMEOUT = 180.0
# Long enough that an engine is still generating when a case hangs up, kills or pauses it
# after a few chunks, even when a loaded machine slows the client more than the engine: about
# ten seconds of generation for the llama.cpp engines (~3 000 tokens/s), and for vLLM, which
# did 3 000 tokens in under 7 s (a case acting on it after two chunks found it done), about
# ten to thirty seconds.
HANGUP_TOKENS = {"llama-server": 30000, "llama-cpp-python": 30000, "vllm": 12000}
# A stopped request is idle on the engine within this long after the hang-up: a deadline,
# generous for a loaded machine, and still shorter than the ~10 s (more under load) that
# HANGUP_TOKENS would keep an engine that did not stop generating.
STOPS_WITHIN = 8.0
# --backend-stream-timeout-secs for the silence cases: an engine (or the frontend) starved of
# CPU by a loaded machine (other test runs beside this one) can pause for seconds between
# tokens, and must not look silent; a SIGSTOPped one is silent for good. At 8 s a vLLM that took
# a migration's 4 400-token replay looked silent once, in a run where a 5 s probe deadline fired
# after 10.5 s (the frontend itself was starved).
SILENCE_LIMIT = {"llama-server": 4, "llama-cpp-python": 4, "vllm": 15}
# --first-token-timeout-secs for the silence cases that migrate: the replay's first token comes
# after the other instance prefilled the prompt and every token generated so far (thousands: a
# vLLM took over 15 s for such a replay on a loaded machine), a wait the silence limit above
# does not bound once this is set (SPEC §4), as an operator sizes it for the longest prefill.
FIRST_TOKEN_LIMIT = {"llama-server": 60, "llama-cpp-python": 60, "vllm": 120}
PROMPT = "The weather in Paris is"
MESSAGES = [{"role": "user", "content": "Tell me about the weather in Paris."}]
# Greedy decoding: the same request gets the same tokens from every instance of an engine.
GREEDY: dict[str, Any] = {"temperature": 0.0}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Tokyo"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def only(*kinds: str) -> pytest.MarkDecorator:
    """Run the case against these engine kinds only."""
    return pytest.mark.parametrize("pair", kinds, indirect=True)


_clients: dict[tuple[str, float], OpenAI] = {}


def client(base_url: str, timeout: float = TIMEOUT) -> OpenAI:
    """An OpenAI client (no retries) for ``base_url``, one per URL and timeout, closed by
    :func:`close_clients` at the end of the run."""
    c = _clients.get((base_url, timeout))
    if c is None:
        c = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=timeout)
        _clients[(base_url, timeout)] = c
    return c


_streams: list[Any] = []


def tracked(stream: Any) -> Any:
    """Register a stream a case reads by hand: it is closed when the case ends, however."""
    _streams.append(stream)
    return stream


def close_streams() -> None:
    while _streams:
        _streams.pop().close()


def close_clients() -> None:
    for c in _clients.values():
        c.close()
    _clients.clear()


@dataclass
class Folded:
    """A stream folded into what a unary answer holds, plus what only a stream shows."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    logprobs: list[Any] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    chunks: list[dict[str, Any]] = field(default_factory=list)
    id: str = ""


def _fold(chunks: Any, chat: bool) -> Folded:
    out = Folded()
    for chunk in chunks:
        d = chunk.model_dump()
        out.chunks.append(d)
        out.id = out.id or d.get("id", "")
        if d.get("usage"):
            out.usage = d["usage"]
        for choice in d.get("choices") or []:
            if chat:
                delta = choice.get("delta") or {}
                out.text += delta.get("content") or ""
                for tc in delta.get("tool_calls") or []:
                    slot = out.tool_calls.setdefault(
                        tc["index"], {"id": None, "name": "", "arguments": ""}
                    )
                    slot["id"] = slot["id"] or tc.get("id")
                    fn = tc.get("function") or {}
                    slot["name"] += fn.get("name") or ""
                    slot["arguments"] += fn.get("arguments") or ""
                lp = choice.get("logprobs") or {}
                out.logprobs += lp.get("content") or []
            else:
                out.text += choice.get("text") or ""
                lp = choice.get("logprobs") or {}
                out.logprobs += lp.get("tokens") or []
            out.token_ids += choice.get("token_ids") or []
            if choice.get("finish_reason"):
                out.finish_reason = choice["finish_reason"]
    return out


def stream_chat(c: OpenAI, max_tokens: int, **kw: Any) -> Folded:
    kw.setdefault("messages", MESSAGES)
    kw = {**GREEDY, **kw}
    chunks = c.chat.completions.create(model=MODEL, max_tokens=max_tokens, stream=True, **kw)
    return _fold(chunks, chat=True)


def stream_completion(c: OpenAI, max_tokens: int, **kw: Any) -> Folded:
    kw.setdefault("prompt", PROMPT)
    kw = {**GREEDY, **kw}
    chunks = c.completions.create(model=MODEL, max_tokens=max_tokens, stream=True, **kw)
    return _fold(chunks, chat=False)


def unary_chat(c: OpenAI, max_tokens: int, **kw: Any) -> dict[str, Any]:
    kw.setdefault("messages", MESSAGES)
    kw = {**GREEDY, **kw}
    r = c.chat.completions.create(model=MODEL, max_tokens=max_tokens, **kw)
    out: dict[str, Any] = r.model_dump()
    return out


def unary_completion(c: OpenAI, max_tokens: int, **kw: Any) -> dict[str, Any]:
    kw.setdefault("prompt", PROMPT)
    kw = {**GREEDY, **kw}
    r = c.completions.create(model=MODEL, max_tokens=max_tokens, **kw)
    out: dict[str, Any] = r.model_dump()
    return out


def completion_stream(base_url: str, max_tokens: int, **kw: Any) -> Any:
    """A streamed greedy completion of :data:`PROMPT` through ``base_url``, closed when the
    case ends (:func:`tracked`)."""
    kw = {"prompt": PROMPT, **GREEDY, **kw}
    c = client(base_url)
    return tracked(c.completions.create(model=MODEL, max_tokens=max_tokens, stream=True, **kw))


@dataclass
class Read:
    """A completion stream read to its end, with something done to it on the way."""

    text: str
    usage: dict[str, Any] | None
    before: str  # the text received before the action


def read_with(stream: Any, action: Callable[[], None], at: int = 2) -> Read:
    """Read ``stream`` to its end, calling ``action`` after its ``at``-th chunk (early: a
    busy vLLM packs many tokens into one chunk, so a stream may have few)."""
    text, before = "", ""
    usage = None
    acted = False
    for i, chunk in enumerate(stream):
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage:
            usage = chunk.usage.model_dump()
        if i == at:
            before = text
            action()
            acted = True
    if not acted:
        raise RuntimeError(f"the stream ended before chunk {at}: nothing was done to it")
    return Read(text, usage, before)
