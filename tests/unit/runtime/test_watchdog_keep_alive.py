"""A keep-alive of the request's context restarts the silence limits of its watchdog (SPEC §4, §9).

The router calls ``ctx.keep_alive()`` when it moves a request to another worker: the HTTP
layer's net (twice the router's limit) must then measure from the move, or it fires about when
the new attempt's own limit does and cuts a request the router was saving.
"""

import pytest

from dynamo_llm.errors import ResponseTimeout
from dynamo_llm.runtime import EngineContext, FakeClock
from dynamo_llm.runtime.watchdog import Watchdog


def watchdog(
    clock: FakeClock,
    ctx: EngineContext,
    *,
    inactivity: float | None = None,
    first_token: float | None = None,
    deadline: float | None = None,
) -> Watchdog:
    dog = Watchdog(clock, ctx, inactivity=inactivity, first_token=first_token, deadline=deadline)
    dog.start()
    return dog


def expired(dog: Watchdog) -> ResponseTimeout | None:
    """The watchdog's verdict now (a call, so the checker does not narrow it)."""
    return dog.expired


@pytest.mark.parametrize("limit", ["first_token", "inactivity"])
async def test_a_keep_alive_restarts_the_silence_window(limit: str) -> None:
    clock = FakeClock()
    ctx = EngineContext("r1")
    dog = watchdog(clock, ctx, **{limit: 2.0})
    await clock.advance(0.5)
    if limit == "inactivity":
        dog.touch()  # an item at 0.5 s: without the keep-alive, silent too long at 2.5 s
    await clock.advance(1.0)
    ctx.keep_alive()  # the router moved the request at 1.5 s
    await clock.advance(1.9)  # 3.4 s: past the original window, within 2 s of the move
    assert expired(dog) is None and not ctx.is_stopped
    await clock.advance(0.2)  # 3.6 s: 2 s after the move, silent all along
    assert isinstance(expired(dog), ResponseTimeout)
    assert ctx.is_killed


async def test_a_keep_alive_does_not_extend_the_request_deadline() -> None:
    clock = FakeClock()
    ctx = EngineContext("r1")
    dog = watchdog(clock, ctx, inactivity=2.0, deadline=3.0)
    await clock.advance(1.5)
    ctx.keep_alive()
    await clock.advance(1.6)
    verdict = expired(dog)
    assert verdict is not None and verdict.code == "deadline_exceeded"


async def test_a_sub_requests_keep_alive_reaches_the_requests_watchdog() -> None:
    # A batch: the router keeps the sub-request's context alive; the HTTP layer watches the
    # request's, its parent.
    clock = FakeClock()
    parent = EngineContext("r1")
    child = EngineContext("r1-0")
    parent.link_child(child)
    dog = watchdog(clock, parent, first_token=2.0)
    await clock.advance(1.5)
    child.keep_alive()
    await clock.advance(1.9)
    assert expired(dog) is None
    parent.unlink_child(child)
    await clock.advance(1.0)
    child.keep_alive()  # unlinked: no longer the parent's business
    assert expired(dog) is not None


async def test_a_cancelled_watchdog_stops_listening() -> None:
    clock = FakeClock()
    ctx = EngineContext("r1")
    dog = watchdog(clock, ctx, inactivity=1.0)
    dog.cancel()
    ctx.keep_alive()
    assert not ctx._keep_alive_callbacks
    assert clock.pending_timers() == 0


async def test_after_a_keep_alive_the_next_item_is_waited_for_like_a_first_one() -> None:
    # The router moved the request: the next item is the replay's first, after the new
    # worker's prefill of the prompt and everything generated so far. The HTTP layer's net
    # allows it the first-token limit, as the new attempt's own timer does.
    clock = FakeClock()
    ctx = EngineContext("r1")
    dog = watchdog(clock, ctx, inactivity=2.0, first_token=10.0)
    await clock.advance(1.0)
    dog.touch()
    await clock.advance(1.0)
    ctx.keep_alive()  # at 2 s
    await clock.advance(9.9)  # 11.9 s: far past the inactivity window, within the first-token one
    assert expired(dog) is None
    dog.touch()  # the replay's first item: from here on, pauses get the inactivity window
    await clock.advance(1.9)
    assert expired(dog) is None
    await clock.advance(0.1)
    verdict = expired(dog)
    assert verdict is not None and "sent nothing for 2 s" in verdict.message


async def test_a_keep_alive_with_a_shorter_first_token_limit_fires_on_time() -> None:
    clock = FakeClock()
    ctx = EngineContext("r1")
    dog = watchdog(clock, ctx, inactivity=10.0, first_token=2.0)
    await clock.advance(1.0)
    dog.touch()  # the timer is armed for 11 s
    await clock.advance(2.0)
    ctx.keep_alive()  # at 3 s: the wait for the next item ends at 5 s
    await clock.advance(1.9)
    assert expired(dog) is None
    await clock.advance(0.1)
    verdict = expired(dog)
    assert verdict is not None and "within 2 s" in verdict.message
