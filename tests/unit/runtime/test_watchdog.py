"""The watchdog: one timer per request for the inactivity, first-token and deadline limits, in
simulated time."""

import pytest

from dynamo_llm.runtime import EngineContext, FakeClock, StopReason
from dynamo_llm.runtime.watchdog import Watchdog


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
