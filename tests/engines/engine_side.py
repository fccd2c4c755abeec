"""What an engine says about itself: the evidence each case checks beside the client's view.

The three engines expose different things, so each question has one answer per kind:

================  =======================  ======================  ===========================
question          vLLM                     llama-server            llama_cpp.server
================  =======================  ======================  ===========================
tokens generated  ``vllm:generation_       ``llamacpp:tokens_      its log: ``llama_perf_
                  tokens_total``           predicted_total``       context_print`` eval runs
still generating  ``vllm:num_requests_     ``/slots``              (no view: its log says
                  running``                ``is_processing``       ``Disconnected``)
requests served   uvicorn access log       log: ``processing       uvicorn access log
                  (at a stream's start)    task`` (at the start)   (at a stream's start)
prefix cache hit  ``vllm:prefix_cache_     ``llamacpp:prompt_      its log: ``prefix-match
                  hits_total``             tokens_cached_total``   hit``
================  =======================  ======================  ===========================
"""

from __future__ import annotations

import re

from tests.engines.harness import Engine, Pair, metric_sum, wait_until

_ACCESS = re.compile(r'"POST /v1/(?:chat/)?completions HTTP/1\.1" (\d+)')
_LLAMA_SERVER_TASK = re.compile(r"launch_slot_: .* processing task")
_PERF = re.compile(
    r"prompt eval time =[^/]*/\s*(\d+) tokens.*?\n"
    r"llama_perf_context_print:\s+eval time =[^/]*/\s*(\d+) runs"
)
_PREFIX_HIT = re.compile(r"Llama\.generate: (\d+) prefix-match hit")


def generated_tokens(e: Engine, since: int = 0) -> float:
    """Tokens the engine has generated (its own counter; for llama_cpp.server, since ``since``
    in its log, the others count from their start)."""
    if e.kind == "vllm":
        return metric_sum(e.metrics(), "vllm:generation_tokens_total")
    if e.kind == "llama-server":
        return metric_sum(e.metrics(), "llamacpp:tokens_predicted_total")
    # llama.cpp's perf counters, printed after each request: one eval run per generated token
    # after the first, which comes out of the prompt's eval; a one-token prompt eval is
    # counted among the runs instead.
    pairs = _PERF.findall(e.log_text(since))
    return sum(int(runs) + (1 if int(prompt) > 1 else 0) for prompt, runs in pairs)


def is_generating(e: Engine) -> bool | None:
    """Whether the engine is working on a request now (None: the engine cannot tell)."""
    if e.kind == "vllm":
        return metric_sum(e.metrics(), "vllm:num_requests_running") > 0
    if e.kind == "llama-server":
        return any(s.get("is_processing") for s in e.get("/slots").json())
    return None


def served_requests(e: Engine, since: int) -> list[int]:
    """The statuses of the completion requests the engine logged since the mark (llama-server
    logs no status: 200 stands for each task it started)."""
    if e.kind == "llama-server":
        return [200 for _ in _LLAMA_SERVER_TASK.findall(e.log_text(since))]
    return [int(s) for s in _ACCESS.findall(e.log_text(since))]


def prefix_cache_hits(e: Engine, since: int = 0) -> float:
    """Prompt tokens the engine took from its prefix cache (a counter: subtract an earlier
    reading taken at the same ``since``)."""
    if e.kind == "vllm":
        return metric_sum(e.metrics(), "vllm:prefix_cache_hits_total")
    if e.kind == "llama-server":
        return metric_sum(e.metrics(), "llamacpp:prompt_tokens_cached_total")
    return sum(int(n) for n in _PREFIX_HIT.findall(e.log_text(since)))


def serving_engine(fleet: Pair, marks: list[int]) -> Engine:
    """The instance that took the request sent since ``marks``: the one that logged it
    (each engine logs a request when it starts)."""

    def which() -> Engine | None:
        for e, m in zip(fleet.engines, marks, strict=True):
            # vLLM's running gauge may still show a request that just ended: logs only.
            if served_requests(e, m) or (e.kind == "llama-server" and is_generating(e)):
                return e
        return None

    found: Engine = wait_until(which, 30.0, 0.05, "an instance takes the request")
    return found
