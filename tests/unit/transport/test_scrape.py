"""Reading an engine's own load from its Prometheus text, for each engine's names."""

from __future__ import annotations

import pytest

from dynamo_llm.transport.scrape import parse_engine_load

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_running{engine="1",model_name="tiny"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
vllm:gpu_cache_usage_perc{engine="0",model_name="tiny"} 0.9
vllm:num_requests_running_total{model_name="tiny"} 99.0
vllm:e2e_request_latency_seconds_bucket{le="0.3",model_name="tiny"} 4.0
"""
SGLANG = """\
sglang:num_running_reqs{model_name="m"} 5
sglang:num_queue_reqs{model_name="m"} 7
sglang:token_usage{model_name="m"} 0.5
"""
LLAMA_CPP = """\
llamacpp:requests_processing 2
llamacpp:requests_deferred 1
llamacpp:prompt_tokens_total 100
"""
MOCKER = """\
dynamo_mocker_running_requests{model="w"} 4.0
dynamo_mocker_waiting_requests{model="w"} 6.0
dynamo_mocker_kv_cache_usage_ratio{model="w"} 0.125
"""


@pytest.mark.parametrize(
    ("text", "running", "queued", "kv"),
    [
        (VLLM, 4.0, 2.0, 0.25),
        (SGLANG, 5.0, 7.0, 0.5),
        (LLAMA_CPP, 2.0, 1.0, None),
        (MOCKER, 4.0, 6.0, 0.125),
    ],
    ids=["vllm", "sglang", "llama.cpp", "mocker"],
)
def test_each_engines_names_are_read_and_summed_over_their_series(
    text: str, running: float, queued: float, kv: float | None
) -> None:
    load = parse_engine_load(text, at=1.0)
    assert load is not None
    assert (load.running, load.queued, load.kv_usage) == (running, queued, kv)
    assert load.requests == running + queued


def test_metrics_without_load_figures_give_none() -> None:
    assert parse_engine_load("dynamo_frontend_requests_total 3\n# EOF\n") is None
    assert parse_engine_load("") is None


def test_a_label_value_with_braces_and_spaces_does_not_confuse_the_value() -> None:
    text = 'vllm:num_requests_running{model_name="a } b",x="y"} 2.5 1700000000000\n'
    load = parse_engine_load(text)
    assert load is not None and load.running == 2.5
