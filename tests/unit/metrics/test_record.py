"""The request record: the outcome labels on the wire, exactly-once release, the token metrics."""

import pytest

from dynamo_llm.metrics import Metrics, Outcome
from dynamo_llm.runtime import FakeClock

# SPEC §5: the requests_total{error_type} values, and which one means success; plus
# "unauthorized", the 401 of a missing or wrong API key (issue 10: its own error type).
SPEC_ERROR_TYPES = {
    "",
    "validation",
    "unauthorized",
    "not_found",
    "overload",
    "unavailable",
    "cancelled",
    "response_timeout",
    "not_implemented",
    "internal",
    "slow_client",  # beyond SPEC §5: a client that stopped reading (issue 11, backpressure)
}


def test_outcome_values_are_the_spec_error_type_labels() -> None:
    assert {o.value for o in Outcome} == SPEC_ERROR_TYPES
    assert Outcome.SUCCESS.status == "success"
    assert {o.status for o in Outcome if o is not Outcome.SUCCESS} == {"error"}
    # Still equal to the label string (mypy does not model a StrEnum member's str equality).
    assert Outcome.CANCELLED == "cancelled"  # type: ignore[comparison-overlap]


def test_mark_error_takes_an_outcome_or_its_label_string() -> None:
    metrics = Metrics()
    for outcome in (Outcome.OVERLOAD, "overload"):
        record = metrics.begin("completions", FakeClock())
        record.mark_error(outcome)
        assert record.outcome is Outcome.OVERLOAD
        record.release()
    key = ("unknown_model", "completions", "unary", "error", "overload")
    assert metrics.requests_total.children[key].value == 2
    (stored,) = metrics.requests_total.children  # plain strings, as the exposition expects
    assert all(type(v) is str for v in stored)


def test_request_record_defaults_to_internal_and_releases_once() -> None:
    metrics = Metrics()
    clock = FakeClock()
    record = metrics.begin("chat_completions", clock)
    record.admit("m")
    assert metrics.inflight_requests.labels("m").value == 1
    assert metrics.queued_requests.labels("m").value == 1
    record.release()
    record.release()
    assert (
        metrics.requests_total.labels("m", "chat_completions", "unary", "error", "internal").value
        == 1
    )
    assert metrics.inflight_requests.labels("m").value == 0
    assert metrics.queued_requests.labels("m").value == 0


def test_request_record_token_metrics() -> None:
    metrics = Metrics()
    clock = FakeClock(100.0)
    record = metrics.begin("completions", clock)
    record.request_type = "stream"
    record.admit("m")
    clock._now = 100.5
    record.on_tokens(1, 7)
    assert metrics.queued_requests.labels("m").value == 0
    clock._now = 100.7
    record.on_tokens(2, None)
    record.mark_ok()
    record.release()
    ttft = metrics.time_to_first_token_seconds.labels("m")
    assert ttft.count == 1 and ttft.sum == pytest.approx(0.5)
    itl = metrics.inter_token_latency_seconds.labels("m")
    assert itl.count == 2 and itl.sum == pytest.approx(0.2)
    assert metrics.input_sequence_tokens.labels("m").sum == 7
    assert metrics.output_tokens_total.labels("m").value == 3
    assert metrics.output_sequence_tokens.labels("m").sum == 3
    assert metrics.requests_total.labels("m", "completions", "stream", "success", "").value == 1


def test_unadmitted_record_touches_no_gauge() -> None:
    metrics = Metrics()
    record = metrics.begin("chat_completions", FakeClock())
    record.mark_error("validation")
    record.release()
    assert metrics.inflight_requests.children == {}
    assert (
        metrics.requests_total.labels(
            "unknown_model", "chat_completions", "unary", "error", "validation"
        ).value
        == 1
    )
