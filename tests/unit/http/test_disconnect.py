"""The disconnect handles and their monitor: a hang-up in either phase kills the request's
context and is counted exactly once, without sockets."""

import gc

from dynamo_llm.http.disconnect import DisconnectMonitor, HandleStatus
from dynamo_llm.metrics import Metrics
from dynamo_llm.runtime import EngineContext, StopReason

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
