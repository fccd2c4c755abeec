"""Precise ``kv`` routing on vLLM's own KV events (issue 13): the reference publisher.

The ``vllm-kv`` pair runs vLLM with ``--kv-events-config`` (ZMQ PUB + replay ROUTER) and
``--enable-prompt-tokens-details``; a frontend in ``--router-mode kv`` with the model's
``--tokenizer`` folder follows both publishers (``--upstream-file``). Its index must fill from
the real events, and a follow-up turn of a conversation must go where its prefix is cached and
be told by the engine exactly the cached tokens the index predicted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from tests.engines.clients import only
from tests.engines.harness import (
    MODEL,
    VLLM_KV,
    Frontend,
    Pair,
    metric_sum,
    start_frontend,
    wait_until,
)
from tests.engines.tiny_model import TinyModel

WORDS = [
    "the",
    "weather",
    "in",
    "paris",
    "is",
    "sunny",
    "and",
    "warm",
    "with",
    "a",
    "light",
    "wind",
    "from",
    "the",
    "south",
]


def kv_frontend(fleet: Pair, tiny_model: TinyModel, tmp_path: Path) -> Frontend:
    upstream = tmp_path / "upstream.json"
    entries = [{"url": e.url, **e.kv_events} for e in fleet.engines]
    upstream.write_text(json.dumps({MODEL: entries}))
    flags = {
        "upstream_file": str(upstream),
        "router_mode": "kv",
        "tokenizer": str(tiny_model.path),
    }
    return start_frontend("frontend-vllm-kv", [], flags, fleet.log_dir)


def chat(fe: Frontend, messages: list[dict[str, Any]]) -> dict[str, Any]:
    body = {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0.0}
    response = httpx.post(fe.base_url + "/chat/completions", json=body, timeout=120.0)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def counters(fe: Frontend) -> tuple[float, float, float]:
    m = fe.metrics()
    return (
        metric_sum(m, "dynamo_frontend_router_kv_events_total", event="stored"),
        metric_sum(m, "dynamo_frontend_router_kv_predicted_cached_tokens_total"),
        metric_sum(m, "dynamo_frontend_router_kv_reported_cached_tokens_total"),
    )


@only(VLLM_KV)
def test_the_index_fills_from_vllms_events_and_predicts_its_cached_tokens(
    fleet: Pair, tiny_model: TinyModel, tmp_path: Path
) -> None:
    fe = kv_frontend(fleet, tiny_model, tmp_path)
    try:

        def precise() -> bool:
            workers = fe.health()["models"][0]["workers"]
            return len(workers) == 2 and all(w["kv_mode"] == "precise" for w in workers)

        # vLLM publishes nothing while idle: a first batch of events makes a worker precise.
        for i, engine in enumerate(fleet.engines):
            warm = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(200))
            body = {"model": MODEL, "prompt": f"{i} {warm}", "max_tokens": 1}
            assert engine.post("/v1/completions", body).status_code == 200
        wait_until(precise, 60.0, 0.2, "both vLLM workers' events followed")
        system = " ".join(WORDS[i % len(WORDS)] for i in range(600))
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": system},
            {"role": "user", "content": "What is the weather in Paris?"},
        ]
        stored, predicted, reported = counters(fe)
        chat(fe, messages)
        wait_until(lambda: counters(fe)[0] > stored, 30.0, 0.2, "BlockStored from vLLM")

        messages += [
            {"role": "assistant", "content": "Sunny."},
            {"role": "user", "content": "And tomorrow?"},
        ]
        result = chat(fe, messages)
        cached = (result["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        assert cached >= 512, result["usage"]  # the system prompt's blocks were found
        _, predicted_after, reported_after = counters(fe)
        assert reported_after - reported == cached
        assert predicted_after - predicted == cached, "the index predicted what vLLM reused"
    finally:
        fe.process.stop()
