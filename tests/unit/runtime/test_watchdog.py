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


async def test_with_a_first_token_limit_the_wait_for_the_first_item_is_not_cut_by_inactivity() -> (
    None
):
    # An engine's queue and prefill before its first token may well outlast any pause between
    # two tokens (SPEC §4: the inactivity limit is the silence between items).
    clock = FakeClock()
    _, dog, fired = make_watchdog(clock, inactivity=2.0, first_token=10.0)
    await clock.advance(9.9)
    assert fired == []
    dog.touch()
    await clock.advance(1.9)
    assert fired == []
    await clock.advance(0.1)  # 2 s after the first item
    assert fired == [pytest.approx(11.9)]
    assert dog.expired is not None and "sent nothing for 2 s" in dog.expired.message
    clock2 = FakeClock()
    _, dog2, fired2 = make_watchdog(clock2, inactivity=2.0, first_token=10.0)
    await clock2.advance(10.0)
    assert fired2 == [10.0]
    assert dog2.expired is not None and "within 10 s" in dog2.expired.message


async def test_a_first_item_soon_after_dispatch_starts_the_inactivity_window_at_once() -> None:
    # The wait for the first item is allowed 10 s, but an item at 1 s and then silence is
    # silent too long at 3 s, not at 10.
    clock = FakeClock()
    _, dog, fired = make_watchdog(clock, inactivity=2.0, first_token=10.0)
    await clock.advance(1.0)
    dog.touch()
    await clock.advance(5.0)
    assert fired == [pytest.approx(3.0)]
    assert clock.pending_timers() == 0


async def test_without_a_first_token_limit_the_inactivity_limit_bounds_the_first_wait() -> None:
    clock = FakeClock()
    _, dog, fired = make_watchdog(clock, inactivity=2.0)
    await clock.advance(2.0)
    assert fired == [2.0]
    assert dog.expired is not None and "sent nothing for 2 s" in dog.expired.message
