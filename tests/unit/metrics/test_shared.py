"""Metrics shared by several processes: each writes its families, any one renders the totals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_llm.metrics import Metrics
from dynamo_llm.metrics.shared import SharedMetrics, forget_process

_opened: list[SharedMetrics] = []


@pytest.fixture(autouse=True)
def _close_files() -> Iterator[None]:
    yield
    while _opened:
        _opened.pop().close()


def _process(directory: Path, pid: int) -> Metrics:
    """A process's metrics, writing under ``pid`` (two processes in one test)."""
    metrics = Metrics()
    metrics.share(str(directory))
    assert metrics.shared is not None
    metrics.shared = SharedMetrics(str(directory), metrics.shared._gauge_modes, pid=pid)
    _opened.append(metrics.shared)
    metrics.declare_model("m")
    return metrics


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _ok(model: str = "m") -> tuple[str, tuple[tuple[str, str], ...]]:
    labels = {
        "model": model,
        "endpoint": "chat_completions",
        "request_type": "unary",
        "status": "success",
        "error_type": "",
    }
    return "dynamo_frontend_requests_total", tuple(sorted(labels.items()))


def test_counters_and_histograms_add_up_across_processes_whichever_renders(tmp_path: Path) -> None:
    one, two = _process(tmp_path, 101), _process(tmp_path, 102)
    one.requests_total.labels("m", "chat_completions", "unary", "success", "").inc(3)
    two.requests_total.labels("m", "chat_completions", "unary", "success", "").inc(4)
    one.request_duration_seconds.labels("m").observe(0.5)
    two.request_duration_seconds.labels("m").observe(3.0)
    two.request_duration_seconds.labels("m").observe(3.0)
    one.publish()
    two.publish()
    for renderer in (one, two):
        samples = _samples(renderer)
        assert samples[_ok()] == 7
        duration = "dynamo_frontend_request_duration_seconds"
        assert samples[(f"{duration}_count", (("model", "m"),))] == 3
        assert samples[(f"{duration}_sum", (("model", "m"),))] == 6.5
        # Cumulative buckets over both processes: 0.5 is in le=2, the two 3.0s from le=4 on.
        bucket = f"{duration}_bucket"
        assert samples[(bucket, (("le", "0.0"), ("model", "m")))] == 0
        assert samples[(bucket, (("le", "2.0"), ("model", "m")))] == 1
        assert samples[(bucket, (("le", "4.0"), ("model", "m")))] == 3
        assert samples[(bucket, (("le", "+Inf"), ("model", "m")))] == 3


def test_a_dead_process_keeps_its_counts_and_its_live_gauges_leave_with_it(
    tmp_path: Path,
) -> None:
    one, two = _process(tmp_path, 201), _process(tmp_path, 202)
    one.inflight_requests.labels("m").inc(2)
    two.inflight_requests.labels("m").inc(1)
    one.requests_total.labels("m", "chat_completions", "unary", "success", "").inc(5)
    one.disconnected_clients.labels().inc(1)
    one.publish()
    inflight = ("dynamo_frontend_inflight_requests", (("model", "m"),))
    assert _samples(two)[inflight] == 3
    forget_process(str(tmp_path), 201)
    samples = _samples(two)
    assert samples[inflight] == 1
    assert samples[_ok()] == 5
    assert samples[("dynamo_frontend_disconnected_clients", ())] == 1  # counts up, stays


def test_flags_take_the_largest_value_rather_than_the_sum(tmp_path: Path) -> None:
    one, two = _process(tmp_path, 301), _process(tmp_path, 302)
    one.publish()
    ready = ("dynamo_frontend_model_ready", (("model", "m"),))
    one.model_ready.labels("m").set(1)
    two.model_ready.labels("m").set(1)
    one.publish()
    assert _samples(two)[ready] == 1


def test_unshared_metrics_render_this_process_alone(tmp_path: Path) -> None:
    metrics = Metrics()
    metrics.requests_total.labels("m", "chat_completions", "unary", "success", "").inc()
    assert metrics.render() == generate_latest(metrics.registry)
    assert not list(tmp_path.iterdir())
