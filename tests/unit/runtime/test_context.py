import asyncio

import pytest

from dynamo_llm.runtime import ContextState, EngineContext, StopReason


def test_new_context_is_live_with_given_id() -> None:
    ctx = EngineContext("req-1")
    assert ctx.id == "req-1"
    assert ctx.state is ContextState.LIVE
    assert not ctx.is_stopped
    assert not ctx.is_killed
    assert ctx.reason is None


def test_context_without_id_gets_a_uuid() -> None:
    import uuid

    uuid.UUID(EngineContext().id)


def test_stop_sets_stopped_but_not_killed() -> None:
    ctx = EngineContext()
    ctx.stop_generating(StopReason.DEADLINE)
    assert ctx.is_stopped
    assert not ctx.is_killed
    assert ctx.reason is StopReason.DEADLINE


def test_kill_is_also_stopped() -> None:
    ctx = EngineContext()
    ctx.kill(StopReason.CLIENT_DISCONNECT)
    assert ctx.is_stopped and ctx.is_killed


def test_stop_after_kill_does_not_unkill() -> None:
    ctx = EngineContext()
    ctx.kill(StopReason.CLIENT_DISCONNECT)
    ctx.stop(StopReason.EXPLICIT)
    assert ctx.is_killed
    assert ctx.state is ContextState.KILLED


def test_first_control_records_the_reason() -> None:
    ctx = EngineContext()
    ctx.stop(StopReason.SHUTDOWN)
    ctx.kill(StopReason.CLIENT_DISCONNECT)
    assert ctx.is_killed
    assert ctx.reason is StopReason.SHUTDOWN


def test_controls_are_idempotent_and_callbacks_see_each_forward_move_once() -> None:
    ctx = EngineContext()
    seen = []
    ctx.on_stop(lambda c: seen.append(c.state))
    ctx.stop()
    ctx.stop()
    ctx.kill()
    ctx.kill()
    assert seen == [ContextState.STOPPED, ContextState.KILLED]


def test_controls_reach_children_in_link_order_before_the_parent() -> None:
    parent = EngineContext("p")
    order = []
    children = [EngineContext(f"c{i}") for i in range(3)]
    for child in children:
        parent.link_child(child)
        child.on_stop(lambda c: order.append((c.id, parent.is_stopped)))
    parent.on_stop(lambda c: order.append((c.id, True)))
    parent.kill(StopReason.DEADLINE)
    assert order == [("c0", False), ("c1", False), ("c2", False), ("p", True)]
    assert all(c.is_killed and c.reason is StopReason.DEADLINE for c in children)


def test_stop_propagates_as_stop_and_a_later_kill_upgrades_children() -> None:
    parent, child = EngineContext(), EngineContext()
    parent.link_child(child)
    parent.stop()
    assert child.is_stopped and not child.is_killed
    parent.kill()
    assert child.is_killed


def test_linking_to_a_killed_parent_kills_the_child_at_once() -> None:
    parent = EngineContext()
    parent.kill(StopReason.CLIENT_DISCONNECT)
    child = EngineContext()
    parent.link_child(child)
    assert child.is_killed
    assert child.reason is StopReason.CLIENT_DISCONNECT


def test_linking_to_a_stopped_parent_stops_the_child_at_once() -> None:
    parent = EngineContext()
    parent.stop(StopReason.SHUTDOWN)
    child = EngineContext()
    parent.link_child(child)
    assert child.is_stopped and not child.is_killed


def test_unlinked_child_no_longer_follows() -> None:
    parent, child = EngineContext(), EngineContext()
    parent.link_child(child)
    parent.unlink_child(child)
    parent.kill()
    assert not child.is_stopped


def test_on_stop_fires_at_once_when_already_stopped_and_can_be_removed() -> None:
    ctx = EngineContext()
    ctx.stop()
    seen = []
    ctx.on_stop(lambda c: seen.append(1))
    assert seen == [1]
    other = EngineContext()
    remove = other.on_stop(lambda c: seen.append(2))
    remove()
    other.kill()
    assert seen == [1]


async def test_stopped_waiter_wakes_on_stop_and_killed_waiter_only_on_kill() -> None:
    ctx = EngineContext()
    stopped = asyncio.create_task(ctx.stopped())
    killed = asyncio.create_task(ctx.killed())
    await asyncio.sleep(0)
    ctx.stop()
    await asyncio.sleep(0)
    assert stopped.done()
    assert not killed.done()
    ctx.kill()
    async with asyncio.timeout(1):
        await killed


async def test_waiters_return_at_once_when_already_in_that_state() -> None:
    ctx = EngineContext()
    ctx.kill()
    async with asyncio.timeout(1):
        await ctx.stopped()
        await ctx.killed()


@pytest.mark.parametrize("control", ["stop", "stop_generating", "kill"])
def test_every_control_accepts_every_reason(control: str) -> None:
    for reason in StopReason:
        ctx = EngineContext()
        getattr(ctx, control)(reason)
        assert ctx.reason is reason
