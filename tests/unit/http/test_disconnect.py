"""Unit tests of the disconnect handles and monitor, the outcome record, the watchdog and the
fake clock, in simulated time and without sockets."""

import asyncio
import gc

import pytest

from dynamo_llm.http.disconnect import DisconnectMonitor, HandleStatus
from dynamo_llm.metrics import Metrics, log_buckets, sanitize_prefix
from dynamo_llm.runtime import EngineContext, FakeClock, StopReason
from dynamo_llm.runtime.watchdog import Watchdog

LABELS = ("m", "chat_completions", "stream")


def counts(metrics: Metrics) -> tuple[float, float]:
    return (
        metrics.disconnected_clients.labels().value,
        metrics.model_cancellation_total.labels(*LABELS).value,
    )


def make_monitor() -> tuple[EngineContext, Metrics, DisconnectMonitor]:
    ctx = EngineContext("r")
    metrics = Metrics()
    return ctx, metrics, DisconnectMonitor(ctx, metrics, *LABELS)


def test_handles_start_armed_and_disabled() -> None:
    _, _, monitor = make_monitor()
    assert monitor.connection.status is HandleStatus.CLOSED_UNEXPECTEDLY
    assert monitor.stream.status is HandleStatus.DISABLED


def test_armed_connection_handle_release_kills_and_counts_once() -> None:
    ctx, metrics, monitor = make_monitor()
    monitor.connection.release()
    assert ctx.is_killed and ctx.reason is StopReason.CLIENT_DISCONNECT
    assert counts(metrics) == (1, 1)
    monitor.connection.release()
    monitor.stream.release()
    assert counts(metrics) == (1, 1)


def test_disarmed_connection_and_disabled_stream_do_nothing() -> None:
    ctx, metrics, monitor = make_monitor()
    monitor.connection.disarm()
    monitor.release_all()
    assert not ctx.is_stopped
    assert counts(metrics) == (0, 0)


def test_armed_stream_handle_fires_after_graceful_connection_handle() -> None:
    ctx, metrics, monitor = make_monitor()
    monitor.connection.disarm()
    monitor.connection.release()
    monitor.stream.arm()
    monitor.stream.release()
    assert ctx.is_killed
    assert counts(metrics) == (1, 1)


def test_stream_report_waits_for_the_connection_handle() -> None:
    ctx, metrics, monitor = make_monitor()
    monitor.stream.arm()
    monitor.stream.release()
    assert not ctx.is_stopped, "the stream handle is only looked at after the connection handle"
    monitor.connection.disarm()
    monitor.connection.release()
    assert ctx.is_killed
    assert counts(metrics) == (1, 1)


def test_client_leaving_between_phases_is_counted_once() -> None:
    ctx, metrics, monitor = make_monitor()
    monitor.stream.arm()
    monitor.connection.release()  # still armed
    monitor.stream.release()  # also armed
    assert counts(metrics) == (1, 1)
    assert ctx.is_killed


def test_disarmed_stream_handle_is_not_a_disconnect() -> None:
    ctx, metrics, monitor = make_monitor()
    monitor.connection.disarm()
    monitor.stream.arm()
    monitor.stream.disarm()
    monitor.release_all()
    assert counts(metrics) == (0, 0)
    assert not ctx.is_stopped


def test_handle_dropped_without_release_counts_as_unexpected() -> None:
    ctx, metrics, monitor = make_monitor()
    monitor.connection.disarm()
    monitor.connection.release()
    handle = monitor.stream
    monitor.stream = None  # type: ignore[assignment]
    handle.disarm()  # even a disarmed handle that vanishes is "sender dropped"
    del handle
    gc.collect()
    assert ctx.is_killed
    assert counts(metrics) == (1, 1)


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


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((1, 512, 10), [0, 2, 4, 8, 16, 32, 64, 130, 260, 510]),
        ((50, 128000, 12), [0, 100, 210, 430, 870, 1800, 3600, 7400, 15000, 31000, 63000, 130000]),
        ((50, 32000, 10), [0, 100, 210, 430, 880, 1800, 3700, 7600, 16000, 32000]),
        (
            (0.001, 480, 18),
            [
                0,
                0.0022,
                0.0047,
                0.01,
                0.022,
                0.047,
                0.1,
                0.22,
                0.47,
                1,
                2.2,
                4.7,
                10,
                22,
                48,
                100,
                220,
                480,
            ],
        ),
        (
            (0.001, 2, 13),
            [0, 0.0019, 0.0035, 0.0067, 0.013, 0.024, 0.045, 0.084, 0.16, 0.3, 0.56, 1.1, 2.0],
        ),
    ],
)
def test_log_buckets_match_the_spec(args: tuple[float, float, int], expected: list[float]) -> None:
    assert log_buckets(*args) == pytest.approx(expected)


def test_metrics_prefix_is_sanitised() -> None:
    assert sanitize_prefix("nv-llm/http service") == "nv_llm_http_service"
    assert sanitize_prefix(None) == "dynamo_frontend"
    assert sanitize_prefix("___") == "dynamo_frontend"
    assert sanitize_prefix("9lives") == "_9lives"


# --- watchdog ---------------------------------------------------------------------------------


def make_watchdog(clock: FakeClock, **limits: float) -> tuple[EngineContext, Watchdog, list[float]]:
    ctx = EngineContext()
    fired: list[float] = []
    dog = Watchdog(
        clock,
        ctx,
        inactivity=limits.get("inactivity"),
        first_token=limits.get("first_token"),
        deadline=limits.get("deadline"),
        on_expire=lambda: fired.append(clock.now()),
    )
    dog.start()
    return ctx, dog, fired


async def test_inactivity_window_restarts_on_every_item() -> None:
    clock = FakeClock()
    ctx, dog, fired = make_watchdog(clock, inactivity=2.0)
    for _ in range(5):
        await clock.advance(1.5)
        dog.touch()
    assert fired == []
    assert clock.pending_timers() == 1, "one timer per request, whatever the item count"
    await clock.advance(1.999)
    assert fired == []
    await clock.advance(0.001)
    assert fired == [pytest.approx(9.5)]
    assert ctx.is_killed and ctx.reason is StopReason.INACTIVITY_TIMEOUT
    assert dog.expired is not None and dog.expired.error_type == "response_timeout"


async def test_first_token_limit_only_applies_before_the_first_item() -> None:
    clock = FakeClock()
    _, dog, fired = make_watchdog(clock, first_token=3.0)
    await clock.advance(2.0)
    dog.touch()
    await clock.advance(100.0)
    assert fired == []
    clock2 = FakeClock()
    ctx2, _, fired2 = make_watchdog(clock2, first_token=3.0)
    await clock2.advance(3.0)
    assert fired2 == [3.0]
    assert ctx2.is_killed


async def test_deadline_fires_even_when_items_keep_coming() -> None:
    clock = FakeClock()
    ctx, dog, fired = make_watchdog(clock, inactivity=2.0, deadline=5.0)
    for _ in range(10):
        await clock.advance(1.0)
        dog.touch()
    assert fired == [5.0]
    assert ctx.reason is StopReason.DEADLINE


async def test_cancelled_watchdog_never_fires() -> None:
    clock = FakeClock()
    ctx, dog, fired = make_watchdog(clock, inactivity=1.0)
    dog.cancel()
    await clock.advance(10)
    assert fired == [] and not ctx.is_stopped


async def test_no_limits_means_no_timer() -> None:
    clock = FakeClock()
    make_watchdog(clock)
    assert clock.pending_timers() == 0


async def test_fake_clock_sleep_and_autojump_are_exact() -> None:
    clock = FakeClock()
    woke: list[tuple[float, float]] = []

    async def sleeper(d: float) -> None:
        await clock.sleep(d)
        woke.append((d, clock.now()))

    async with asyncio.timeout(5), clock.autojump():
        await asyncio.gather(sleeper(3), sleeper(1), sleeper(2))
    assert woke == [(1, 1), (2, 2), (3, 3)]
