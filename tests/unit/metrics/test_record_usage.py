"""The request record takes from the final usage what the items could not say (issue 9, #8)."""

from __future__ import annotations

from dynamo_llm.engines.base import Usage
from dynamo_llm.metrics import Metrics
from dynamo_llm.metrics.record import RequestRecord
from dynamo_llm.runtime import FakeClock

MODEL = "m"


def admitted() -> tuple[Metrics, RequestRecord]:
    metrics = Metrics()
    record = metrics.begin("chat_completions", FakeClock())
    record.admit(MODEL)
    return metrics, record


def itl(metrics: Metrics) -> tuple[int, float]:
    child = metrics.inter_token_latency_seconds.labels(MODEL)
    return child.count, child.sum


def output_tokens(metrics: Metrics) -> float:
    return metrics.output_tokens_total.labels(MODEL).value


def test_events_that_packed_several_tokens_are_corrected_by_the_usage() -> None:
    metrics, record = admitted()
    for t in (1.0, 2.0, 4.0):  # three relayed events
        record.on_tokens(1, None, t)
    assert output_tokens(metrics) == 3
    record.on_usage(Usage(9, 7))
    assert output_tokens(metrics) == 7
    count, total = itl(metrics)
    assert count == 6, "one observation per token after the first"
    assert total == 3.0, "the packed tokens add no latency of their own"
    record.mark_ok()
    record.release()
    osl = metrics.output_sequence_tokens.labels(MODEL)
    assert (osl.count, osl.sum) == (1, 7)


def test_the_first_items_other_tokens_are_inter_token_latencies_of_zero() -> None:
    metrics, record = admitted()
    record.on_tokens(3, None, 1.0)
    record.on_tokens(2, None, 3.0)
    assert itl(metrics) == (4, 2.0)
    assert output_tokens(metrics) == 5


def test_the_prompt_size_reported_only_in_the_usage_is_recorded_once() -> None:
    metrics, record = admitted()
    record.on_tokens(1, None, 1.0)
    record.on_usage(Usage(42, 1))
    record.on_usage(Usage(42, 1))
    isl = metrics.input_sequence_tokens.labels(MODEL)
    assert (isl.count, isl.sum) == (1, 42)
    assert output_tokens(metrics) == 1 and itl(metrics) == (0, 0.0)


def test_a_prompt_size_from_the_first_item_is_not_recorded_again() -> None:
    metrics, record = admitted()
    record.on_tokens(1, 5, 1.0)
    record.on_usage(Usage(6, 1))
    isl = metrics.input_sequence_tokens.labels(MODEL)
    assert (isl.count, isl.sum) == (1, 5)


def test_unknown_counts_change_nothing_and_a_counter_is_never_taken_back() -> None:
    metrics, record = admitted()
    record.on_tokens(1, None, 1.0)
    record.on_tokens(1, None, 2.0)
    record.on_usage(Usage(None, None))
    assert output_tokens(metrics) == 2
    record.on_usage(Usage(None, 1))
    assert output_tokens(metrics) == 2, "a counter only goes up"
    assert record.output_tokens == 1, "but the request's own length is the engine's"
    assert metrics.input_sequence_tokens.labels(MODEL).count == 0
