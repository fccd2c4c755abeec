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
