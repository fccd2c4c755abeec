"""The worker set: in-flight slots, quarantine with back-off and probe, structured shutdown.

Quarantine timing runs on a FakeClock moved by hand, so every back-off is exact.
"""

from __future__ import annotations

import random

import pytest

from dynamo_llm.errors import (
    AllWorkersBusy,
    InvalidRequest,
    NoWorkersAvailable,
    WorkerUnreachable,
)
from dynamo_llm.router import (
    RoutingPolicy,
    Worker,
    WorkerState,
)
from dynamo_llm.runtime import FakeClock
from tests.unit.router.helpers import (
    ScriptedProbe,
    make_set,
)

# ---- membership -------------------------------------------------------------------------------


def test_workers_are_indexed_by_model_in_registration_order() -> None:
    clock = FakeClock()
    workers, _ = make_set(clock, ScriptedProbe(clock))
    workers.add(Worker("http://a", ["m1", "m2"]))
    workers.add(Worker("http://b", ["m2"]))
    assert [w.id for w in workers.workers_for("m2")] == ["http://a", "http://b"]
    assert [w.id for w in workers.workers_for("m1")] == ["http://a"]
    assert workers.workers_for("nope") == []
    assert workers.models() == {"m1", "m2"}
    assert len(workers) == 2
    assert "http://a" in workers
    workers.remove("http://a")
    assert workers.models() == {"m2"}
    assert workers.get("http://a") is None
    assert workers.remove("http://a") is None


def test_adding_a_known_worker_again_keeps_its_state_and_takes_new_models() -> None:
    clock = FakeClock()
    workers, _ = make_set(clock, ScriptedProbe(clock))
    changes: list[frozenset[str]] = []
    workers.on_change(changes.append)
    first = workers.add(Worker("http://a", ["m1"]))
    slot = workers.acquire("http://a")
    again = workers.add(Worker("http://a", ["m1", "m2"], is_ours=True))
    assert again is first
    assert first.inflight == 1
    assert first.is_ours and first.owner == "dynamo-llm"
    vllm = workers.add(Worker("http://a", ["m1", "m2"], owner="vllm"))
    assert vllm is first and (vllm.owner, vllm.is_ours) == ("vllm", False)
    assert workers.models() == {"m1", "m2"}
    assert changes == [frozenset({"m1"}), frozenset({"m1", "m2"})]
    slot.release()
    assert first.inflight == 0


def test_worker_id_defaults_to_the_url() -> None:
    assert Worker("http://h:1").id == "http://h:1"
    assert Worker("http://h:1", worker_id="w7").id == "w7"


# ---- selection, load shedding ----------------------------------------------------------------


def test_select_sheds_load_when_every_available_worker_is_at_its_limit() -> None:
    clock = FakeClock()
    workers, _ = make_set(clock, ScriptedProbe(clock), max_inflight=2)
    for name in "ab":
        workers.add(Worker(f"http://{name}", ["m"]))
    policy = RoutingPolicy("round-robin")
    slots = [workers.acquire(workers.select("m", policy).id) for _ in range(4)]
    assert [w.state for w in workers] == [WorkerState.BUSY, WorkerState.BUSY]
    with pytest.raises(AllWorkersBusy):
        workers.select("m", policy)
    slots[0].release()
    assert workers.select("m", policy).id == slots[0].worker.id


def test_a_per_worker_limit_overrides_the_set_default() -> None:
    clock = FakeClock()
    workers, _ = make_set(clock, ScriptedProbe(clock), max_inflight=5)
    a = workers.add(Worker("http://a", ["m"], max_inflight=1))
    b = workers.add(Worker("http://b", ["m"]))
    assert (a.max_inflight, b.max_inflight) == (1, 5)
    workers.acquire("http://a")
    assert [v.free for v in workers.snapshot("m")] == [False, True]


def test_select_excludes_the_given_workers() -> None:
    clock = FakeClock()
    workers, _ = make_set(clock, ScriptedProbe(clock))
    for name in "abc":
        workers.add(Worker(f"http://{name}", ["m"]))
    policy = RoutingPolicy("random", rng=random.Random(3))
    picks = {workers.select("m", policy, exclude={"http://a", "http://c"}).id for _ in range(20)}
    assert picks == {"http://b"}
    with pytest.raises(NoWorkersAvailable):
        workers.select("m", policy, exclude={"http://a", "http://b", "http://c"})
    with pytest.raises(NoWorkersAvailable):
        workers.select("unknown-model", policy)


def test_direct_mode_goes_through_select() -> None:
    clock = FakeClock()
    workers, _ = make_set(clock, ScriptedProbe(clock))
    for name in "ab":
        workers.add(Worker(f"http://{name}", ["m"]))
    policy = RoutingPolicy("direct")
    assert workers.select("m", policy, direct_id="http://b").id == "http://b"
    with pytest.raises(InvalidRequest):
        workers.select("m", policy)
    workers.report_down("http://b", WorkerUnreachable())
    with pytest.raises(NoWorkersAvailable):
        workers.select("m", policy, direct_id="http://b")


async def test_on_change_reports_the_models_and_can_unsubscribe(safety_net: None) -> None:
    clock = FakeClock()
    workers, _ = make_set(clock, ScriptedProbe(clock, [True]))
    changes: list[frozenset[str]] = []

    def broken(models: frozenset[str]) -> None:
        raise RuntimeError("a broken listener does not break the worker set")

    workers.on_change(broken)
    unsubscribe = workers.on_change(changes.append)
    workers.add(Worker("http://a", ["m1", "m2"]))
    workers.report_down("http://a", WorkerUnreachable())
    await clock.advance(1)
    workers.remove("http://a")
    assert changes == [frozenset({"m1", "m2"})] * 4
    unsubscribe()
    workers.add(Worker("http://a", ["m1"]))
    assert len(changes) == 4
    await workers.aclose()
