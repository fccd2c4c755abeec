"""The handler phase run in the handler's own task: whatever ends it early (a hang-up, a time
limit, a stop) cancels the work in place and raises what ended it; a cancellation from outside
stays the caller's. And the body read's time limit, a bare loop timer. No sockets."""

import asyncio
from collections.abc import Callable, Iterator

import pytest

from dynamo_llm.errors import Cancelled, RequestBodyTimeout, ResponseTimeout
from dynamo_llm.http.connection import DisconnectSignal
from dynamo_llm.http.disconnect import DisconnectMonitor
from dynamo_llm.http.exchange import ClientGone, Exchange, Waker
from dynamo_llm.http.inference import read_body_within
from dynamo_llm.metrics import Metrics, Outcome
from dynamo_llm.runtime import EngineContext, StopReason
from dynamo_llm.runtime.clock import FakeClock
from dynamo_llm.runtime.watchdog import Watchdog

SAFETY = 5.0  # seconds: a net for a wait that should end at once


class FakeConnection(DisconnectSignal):
    """Just what the handler phase reads of a connection: whether the client went away."""

    def on_disconnect(self, callback: Callable[[], None]) -> None:
        self._add_callback(callback)

    def hang_up(self) -> None:
        self._fire()


class Request:
    """One admitted request's exchange, as the inference handler builds it."""

    def __init__(self, *, deadline: float | None = None) -> None:
        self.clock = FakeClock()
        self.ctx = EngineContext("r")
        self.metrics = Metrics()
        self.conn = FakeConnection()
        self.record = self.metrics.begin("chat_completions", self.clock)
        self.monitor = DisconnectMonitor(self.ctx, self.metrics, "m", "chat_completions", "unary")
        waker = Waker()
        self.watchdog = Watchdog(
            self.clock,
            self.ctx,
            inactivity=None,
            first_token=None,
            deadline=deadline,
            on_expire=waker.wake,
        )
        self.exchange = Exchange(
            ctx=self.ctx,
            conn=self.conn,  # type: ignore[arg-type]  # only the disconnect side is used
            record=self.record,
            monitor=self.monitor,
            watchdog=self.watchdog,
            waker=waker,
        )
        self.conn.on_disconnect(waker.wake)
        self.ctx.on_stop(waker.wake)
        self.watchdog.start()

    def disconnects(self) -> float:
        return self.metrics.disconnected_clients.labels().value


@pytest.fixture
def new_request() -> Iterator[Callable[..., Request]]:
    """Requests whose handles are released at the end, as the handler's ``finally`` does."""
    made: list[Request] = []

    def make(**kwargs: float) -> Request:
        made.append(Request(**kwargs))
        return made[-1]

    yield make
    for req in made:
        req.monitor.release_all()


class Work:
    """A handler phase's work: waits on ``release``, records how it ended."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = False
        self.task: asyncio.Task[object] | None = None

    async def __call__(self) -> str:
        self.task = asyncio.current_task()
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return "answer"


async def test_the_work_runs_in_the_handlers_task_and_its_result_disarms_the_handle(
    new_request: Callable[..., Request],
) -> None:
    req = new_request()
    work = Work()
    work.release.set()
    assert await req.exchange.handler_phase(work()) == "answer"
    assert work.task is asyncio.current_task()
    assert req.monitor.connection.is_released and not req.monitor.connection.is_armed
    assert not req.ctx.is_stopped and req.disconnects() == 0


async def test_a_hang_up_cancels_the_work_in_place_kills_the_context_and_counts_once(
    new_request: Callable[..., Request],
) -> None:
    req = new_request()
    work = Work()
    phase = asyncio.create_task(req.exchange.handler_phase(work()))
    await asyncio.wait_for(work.started.wait(), SAFETY)
    req.conn.hang_up()
    with pytest.raises(ClientGone):
        await asyncio.wait_for(phase, SAFETY)
    assert work.cancelled
    assert req.ctx.is_killed and req.ctx.reason is StopReason.CLIENT_DISCONNECT
    assert req.record.outcome is Outcome.CANCELLED
    assert req.disconnects() == 1
    assert phase.cancelling() == 0  # the interrupt's own cancellation was taken back


async def test_a_client_gone_before_the_phase_never_starts_the_work(
    new_request: Callable[..., Request],
) -> None:
    req = new_request()
    req.conn.hang_up()
    work = Work()
    with pytest.raises(ClientGone):
        await req.exchange.handler_phase(work())
    assert not work.started.is_set()
    assert req.disconnects() == 1


async def test_a_deadline_ends_the_work_with_a_timeout_not_a_disconnect(
    new_request: Callable[..., Request],
) -> None:
    req = new_request(deadline=10.0)
    work = Work()
    phase = asyncio.create_task(req.exchange.handler_phase(work()))
    await asyncio.wait_for(work.started.wait(), SAFETY)
    await req.clock.advance(10.0)
    with pytest.raises(ResponseTimeout):
        await asyncio.wait_for(phase, SAFETY)
    assert work.cancelled
    assert not req.monitor.connection.is_armed and req.disconnects() == 0


async def test_a_stop_from_inside_the_work_ends_the_phase_once_the_work_waits(
    new_request: Callable[..., Request],
) -> None:
    req = new_request()
    work = Work()

    async def stops_then_waits() -> str:
        req.ctx.stop()  # in the handler's own task: cancelling it here would be too early
        return await work()

    phase = asyncio.create_task(req.exchange.handler_phase(stops_then_waits()))
    with pytest.raises(Cancelled):
        await asyncio.wait_for(phase, SAFETY)
    assert work.started.is_set() and work.cancelled
    assert req.disconnects() == 0


async def test_a_work_that_stops_the_context_and_returns_at_once_keeps_its_result(
    new_request: Callable[..., Request],
) -> None:
    req = new_request()

    async def stops_and_returns() -> str:
        req.ctx.stop()
        return "answer"

    assert await req.exchange.handler_phase(stops_and_returns()) == "answer"
    await asyncio.sleep(0)  # the scheduled look runs, after the phase: it must do nothing
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_cancellation_from_outside_propagates_and_leaves_the_handle_armed(
    new_request: Callable[..., Request],
) -> None:
    req = new_request()
    work = Work()
    phase = asyncio.create_task(req.exchange.handler_phase(work()))
    await asyncio.wait_for(work.started.wait(), SAFETY)
    phase.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(phase, SAFETY)
    assert work.cancelled
    assert req.monitor.connection.is_armed  # the handler's finally releases it: a disconnect


async def test_a_hang_up_racing_a_cancellation_from_outside_still_propagates_it(
    new_request: Callable[..., Request],
) -> None:
    req = new_request()
    work = Work()
    phase = asyncio.create_task(req.exchange.handler_phase(work()))
    await asyncio.wait_for(work.started.wait(), SAFETY)
    req.conn.hang_up()
    await asyncio.sleep(0)  # the interrupt looks and cancels the phase
    phase.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(phase, SAFETY)
    assert req.disconnects() == 1


class SlowBody:
    """A connection whose body arrives when told (never, unless told)."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()

    async def read_body(self, limit: int) -> bytes:
        await self.arrived.wait()
        return b"{}"


async def test_a_body_within_the_limit_is_read_and_no_cancellation_is_left_behind() -> None:
    conn = SlowBody()
    conn.arrived.set()
    assert await read_body_within(conn, 100, 0.001) == b"{}"  # type: ignore[arg-type]
    await asyncio.sleep(0.01)  # past the limit: the timer was cancelled
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_body_that_does_not_arrive_is_a_body_timeout() -> None:
    with pytest.raises(RequestBodyTimeout):
        await asyncio.wait_for(read_body_within(SlowBody(), 100, 0.01), SAFETY)  # type: ignore[arg-type]
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_cancellation_from_outside_during_the_body_read_propagates() -> None:
    conn = SlowBody()
    reading = asyncio.create_task(read_body_within(conn, 100, 60.0))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(reading, SAFETY)
