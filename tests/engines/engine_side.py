"""What an engine says about itself: the evidence each case checks beside the client's view.

The three engines expose different things, so each question has one answer per kind:

================  =======================  ======================  ===========================
question          vLLM                     llama-server            llama_cpp.server
================  =======================  ======================  ===========================
tokens generated  ``vllm:generation_       ``llamacpp:tokens_      its log: ``llama_perf_
                  tokens_total``           predicted_total``       context_print`` eval runs
still generating  ``vllm:num_requests_     ``/slots``              (no view: its log says
                  running``                ``is_processing``       ``Disconnected``)
requests served   uvicorn access log       ``log_server_r``        uvicorn access log
                                           request lines
prefix cache hit  ``vllm:prefix_cache_     ``/slots`` ``n_past``   its log: ``prefix-match
                  hits_total``             / log ``n_past``        hit``
================  =======================  ======================  ===========================
"""

from __future__ import annotations

import re

from harness import Engine, metric_sum

_ACCESS = re.compile(r'"POST /v1/(?:chat/)?completions HTTP/1\.1" (\d+)')
_LLAMA_SERVER_REQUEST = re.compile(r"request: POST /v1/(?:chat/)?completions \S+ (\d+)")
_EVAL_RUNS = re.compile(r"llama_perf_context_print:\s+eval time =.*?/\s*(\d+) runs")
_PREFIX_HIT = re.compile(r"Llama\.generate: (\d+) prefix-match hit")


def generated_tokens(e: Engine, since: int = 0) -> float:
    """Tokens the engine has generated (its own counter; for llama_cpp.server, since ``since``
    in its log, the others count from their start)."""
    if e.kind == "vllm":
        return metric_sum(e.metrics(), "vllm:generation_tokens_total")
    if e.kind == "llama-server":
        return metric_sum(e.metrics(), "llamacpp:tokens_predicted_total")
    # One eval run per generated token after the first (the first comes out of the prompt).
    return sum(int(n) + 1 for n in _EVAL_RUNS.findall(e.log_text(since)))


def is_generating(e: Engine) -> bool | None:
    """Whether the engine is working on a request now (None: the engine cannot tell)."""
    if e.kind == "vllm":
        return metric_sum(e.metrics(), "vllm:num_requests_running") > 0
    if e.kind == "llama-server":
        return any(s.get("is_processing") for s in e.get("/slots").json())
    return None


def served_requests(e: Engine, since: int) -> list[int]:
    """The statuses of the completion requests the engine logged since the mark."""
    pattern = _LLAMA_SERVER_REQUEST if e.kind == "llama-server" else _ACCESS
    return [int(s) for s in pattern.findall(e.log_text(since))]


def prefix_cache_hits(e: Engine, since: int = 0) -> float:
    """Prompt tokens the engine took from its prefix cache (vLLM: since its start)."""
    if e.kind == "vllm":
        return metric_sum(e.metrics(), "vllm:prefix_cache_hits_total")
    if e.kind == "llama-cpp-python":
        return sum(int(n) for n in _PREFIX_HIT.findall(e.log_text(since)))
    return sum(int(s.get("n_past", 0) or 0) for s in e.get("/slots").json())
