"""Routing policies and the KV prefix index: pure, socket-free, seeded."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest

from dynamo_llm.errors import AllWorkersBusy, InvalidRequest, NoWorkersAvailable
from dynamo_llm.router import (
    WORKER_ID_HEADER,
    KvIndex,
    RoundRobin,
    RouterMode,
    RoutingPolicy,
    Worker,
    WorkerSet,
    WorkerView,
    block_hashes,
    choose_worker,
    free_workers,
    kv_scores,
)
from dynamo_llm.runtime import FakeClock
from tests.unit.router.helpers import (
    probe_ok,
)


def view(
    wid: str,
    inflight: int = 0,
    *,
    active_blocks: int = 0,
    available: bool = True,
    free: bool | None = None,
) -> WorkerView:
    return WorkerView(wid, inflight, active_blocks, available, available if free is None else free)


def views(n: int) -> list[WorkerView]:
    return [view(f"w{i}") for i in range(n)]


def simulate(mode: RouterMode, start: dict[str, int], requests: int, seed: int = 7) -> Counter[str]:
    """Choose ``requests`` times, each choice staying in flight; count the choices per worker."""
    inflight = dict(start)
    rng, rr = random.Random(seed), RoundRobin()
    chosen: Counter[str] = Counter()
    for _ in range(requests):
        snapshot = [view(w, n) for w, n in inflight.items()]
        wid = choose_worker(mode, snapshot, rng=rng, model="m", round_robin=rr)
        inflight[wid] += 1
        chosen[wid] += 1
    return chosen


# ---- modes ------------------------------------------------------------------------------------


def test_router_mode_values_are_dynamos_flag_values() -> None:
    assert [m.value for m in RouterMode] == [
        "round-robin",
        "random",
        "power-of-two",
        "least-loaded",
        "kv",
        "direct",
    ]
    assert RoutingPolicy("power-of-two").mode is RouterMode.POWER_OF_TWO
    with pytest.raises(ValueError):
        RoutingPolicy("device-aware-weighted")


def test_round_robin_spreads_requests_evenly() -> None:
    chosen = simulate(RouterMode.ROUND_ROBIN, {f"w{i}": 0 for i in range(4)}, 400)
    assert chosen == {"w0": 100, "w1": 100, "w2": 100, "w3": 100}


def test_round_robin_cycles_in_snapshot_order_with_a_counter_per_model() -> None:
    rr, rng = RoundRobin(), random.Random(0)
    ws = views(3)
    a = [choose_worker(RouterMode.ROUND_ROBIN, ws, rng=rng, model="a", round_robin=rr)]
    b = [choose_worker(RouterMode.ROUND_ROBIN, ws, rng=rng, model="b", round_robin=rr)]
    a += [
        choose_worker(RouterMode.ROUND_ROBIN, ws, rng=rng, model="a", round_robin=rr)
        for _ in range(3)
    ]
    assert a == ["w0", "w1", "w2", "w0"]
    assert b == ["w0"]


def test_round_robin_skips_workers_that_are_not_free() -> None:
    rr, rng = RoundRobin(), random.Random(0)
    ws = [view("w0"), view("w1", available=False), view("w2", 3, free=False), view("w3")]
    picks = [
        choose_worker(RouterMode.ROUND_ROBIN, ws, rng=rng, model="m", round_robin=rr)
        for _ in range(4)
    ]
    assert picks == ["w0", "w3", "w0", "w3"]


def test_random_uses_only_free_workers_and_is_reproducible_with_a_seed() -> None:
    ws = [view("w0"), view("w1", available=False), view("w2"), view("w3", free=False)]
    rng_a, rng_b = random.Random(42), random.Random(42)
    a = [choose_worker(RouterMode.RANDOM, ws, rng=rng_a) for _ in range(200)]
    b = [choose_worker(RouterMode.RANDOM, ws, rng=rng_b) for _ in range(200)]
    assert a == b
    assert set(a) == {"w0", "w2"}


def test_least_loaded_avoids_a_loaded_worker() -> None:
    chosen = simulate(RouterMode.LEAST_LOADED, {"w0": 10, "w1": 0, "w2": 0}, 20)
    assert chosen == {"w1": 10, "w2": 10}
    # Once every worker is level, the load is shared exactly.
    chosen = simulate(RouterMode.LEAST_LOADED, {"w0": 10, "w1": 0, "w2": 0}, 50)
    assert chosen == {"w0": 10, "w1": 20, "w2": 20}


def test_least_loaded_breaks_ties_with_the_rng_not_always_the_first() -> None:
    ws = views(4)
    rng = random.Random(1)
    picks = Counter(choose_worker(RouterMode.LEAST_LOADED, ws, rng=rng) for _ in range(400))
    assert set(picks) == {"w0", "w1", "w2", "w3"}


def test_power_of_two_never_picks_the_loaded_worker_over_an_idle_one() -> None:
    ws = [view("w0", 10), view("w1"), view("w2"), view("w3")]
    rng = random.Random(5)
    picks = Counter(choose_worker(RouterMode.POWER_OF_TWO, ws, rng=rng) for _ in range(300))
    assert "w0" not in picks
    assert set(picks) == {"w1", "w2", "w3"}


def test_power_of_two_avoids_a_loaded_worker_under_accumulating_load() -> None:
    chosen = simulate(RouterMode.POWER_OF_TWO, {"w0": 10, "w1": 0, "w2": 0, "w3": 0}, 24)
    assert chosen["w0"] == 0
    assert sum(chosen.values()) == 24
    assert max(chosen.values()) - min(chosen.values()) <= 3


def test_power_of_two_tie_goes_to_the_first_candidate() -> None:
    class Fixed(random.Random):
        def sample(self, population: Sequence[int], k: int, **_: object) -> list[int]:  # type: ignore[override]
            return [1, 0]

    ws = views(2)
    assert choose_worker(RouterMode.POWER_OF_TWO, ws, rng=Fixed()) == "w1"


def test_a_single_free_worker_is_chosen_in_every_mode() -> None:
    ws = [view("w0", available=False), view("w1", 4)]
    index = KvIndex()
    for mode in RouterMode:
        if mode is RouterMode.DIRECT:
            continue
        wid = choose_worker(
            mode, ws, rng=random.Random(0), round_robin=RoundRobin(), kv_index=index
        )
        assert wid == "w1"


# ---- load shedding and no workers ------------------------------------------------------------


@pytest.mark.parametrize("mode", [m for m in RouterMode if m is not RouterMode.DIRECT])
def test_no_live_worker_is_no_workers_available(mode: RouterMode) -> None:
    with pytest.raises(NoWorkersAvailable):
        choose_worker(mode, [], rng=random.Random(0), round_robin=RoundRobin())


@pytest.mark.parametrize("mode", [m for m in RouterMode if m is not RouterMode.DIRECT])
def test_every_worker_quarantined_is_no_workers_available(mode: RouterMode) -> None:
    ws = [view("w0", available=False), view("w1", available=False)]
    with pytest.raises(NoWorkersAvailable) as info:
        choose_worker(mode, ws, rng=random.Random(0), round_robin=RoundRobin())
    assert info.value.status == 503
    assert info.value.code == "no_workers_available"


@pytest.mark.parametrize("mode", [m for m in RouterMode if m is not RouterMode.DIRECT])
def test_every_available_worker_busy_is_all_workers_busy(mode: RouterMode) -> None:
    ws = [view("w0", 2, free=False), view("w1", available=False), view("w2", 2, free=False)]
    with pytest.raises(AllWorkersBusy) as info:
        choose_worker(mode, ws, rng=random.Random(0), round_robin=RoundRobin())
    assert info.value.status == 503
    assert info.value.code == "all_workers_busy"


def test_free_workers_returns_the_free_rows_in_order() -> None:
    ws = [view("w0", free=False), view("w1"), view("w2", available=False), view("w3")]
    assert [v.id for v in free_workers(ws)] == ["w1", "w3"]


# ---- direct ------------------------------------------------------------------------------------


def test_direct_routes_to_the_named_worker() -> None:
    ws = views(3)
    assert choose_worker(RouterMode.DIRECT, ws, rng=random.Random(0), direct_id="w2") == "w2"


@pytest.mark.parametrize("direct_id", [None, ""])
def test_direct_without_the_header_is_a_400_naming_it(direct_id: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        choose_worker(RouterMode.DIRECT, views(2), rng=random.Random(0), direct_id=direct_id)
    assert info.value.status == 400
    assert WORKER_ID_HEADER in info.value.message


def test_direct_to_an_unknown_or_quarantined_worker_is_no_workers_available() -> None:
    ws = [view("w0"), view("w1", available=False)]
    for wid in ("w1", "w9"):
        with pytest.raises(NoWorkersAvailable) as info:
            choose_worker(RouterMode.DIRECT, ws, rng=random.Random(0), direct_id=wid)
        assert wid in info.value.message


def test_direct_to_a_worker_at_its_limit_is_all_workers_busy() -> None:
    ws = [view("w0"), view("w1", 4, free=False)]
    with pytest.raises(AllWorkersBusy):
        choose_worker(RouterMode.DIRECT, ws, rng=random.Random(0), direct_id="w1")


# ---- kv ------------------------------------------------------------------------------------------


def test_kv_score_is_weighted_blocks_to_prefill_plus_active_blocks() -> None:
    index = KvIndex()
    hashes = block_hashes("x" * 256 * 10)
    index.record("w0", hashes[:6])
    ws = [view("w0", active_blocks=3), view("w1", active_blocks=1)]
    assert kv_scores(ws, hashes, index, 1.0) == [4 + 3, 10 + 1]
    assert kv_scores(ws, hashes, index, 2.0) == [8 + 3, 20 + 1]
    assert kv_scores(ws, hashes, None, 1.0) == [10 + 3, 10 + 1]


def test_kv_prefers_the_cached_prefix_and_falls_back_to_the_lighter_worker() -> None:
    index = KvIndex()
    hashes = block_hashes("p" * 256 * 8)
    index.record("w1", hashes)
    ws = views(3)
    picks = {
        choose_worker(RouterMode.KV, ws, rng=random.Random(s), hashes=hashes, kv_index=index)
        for s in range(20)
    }
    assert picks == {"w1"}
    # Enough load on w1 outweighs the cache: 8 cached blocks < 9 active blocks.
    ws = [view("w0"), view("w1", active_blocks=9), view("w2", active_blocks=1)]
    assert choose_worker(
        RouterMode.KV, ws, rng=random.Random(0), hashes=hashes, kv_index=index
    ) == ("w0")


def test_kv_ties_are_broken_at_random() -> None:
    hashes = block_hashes("q" * 1000)
    rng = random.Random(9)
    picks = Counter(
        choose_worker(RouterMode.KV, views(3), rng=rng, hashes=hashes, kv_index=KvIndex())
        for _ in range(300)
    )
    assert set(picks) == {"w0", "w1", "w2"}


def test_kv_temperature_samples_but_still_prefers_the_best_worker() -> None:
    index = KvIndex()
    hashes = block_hashes("t" * 256 * 10)
    index.record("w0", hashes)
    ws = views(3)  # scores: w0 0, w1 10, w2 10
    cold = {
        choose_worker(
            RouterMode.KV, ws, rng=random.Random(s), hashes=hashes, kv_index=index, temperature=0
        )
        for s in range(50)
    }
    assert cold == {"w0"}
    rng = random.Random(2024)
    warm = Counter(
        choose_worker(RouterMode.KV, ws, rng=rng, hashes=hashes, kv_index=index, temperature=1.0)
        for _ in range(1000)
    )
    # softmax(-score / (max - min) / T): w0 weight 1, the others e^-1 each -> p(w0) = 0.576.
    assert warm["w0"] > 500
    assert warm["w1"] > 150
    assert warm["w2"] > 150

    def sample(rng: random.Random) -> list[str]:
        return [
            choose_worker(
                RouterMode.KV, ws, rng=rng, hashes=hashes, kv_index=index, temperature=1.0
            )
            for _ in range(50)
        ]

    assert sample(random.Random(5)) == sample(random.Random(5))


def test_kv_routing_keeps_shared_prefixes_together_and_balances_the_rest() -> None:
    """Simulated traffic through a WorkerSet: choose, acquire (records the blocks), finish."""
    index = KvIndex()
    workers = WorkerSet(clock=FakeClock(), probe=probe_ok, kv_index=index)
    for i in range(4):
        workers.add(Worker(f"http://w{i}", ["m"]))
    policy = RoutingPolicy("kv", rng=random.Random(11), kv_index=index)
    rng = random.Random(12)

    def unrelated() -> str:
        return "".join(rng.choice("abcdefghij ") for _ in range(256 * 3))

    # Eight unrelated long requests that stay in flight spread two to a worker.
    background = []
    for _ in range(8):
        hashes = block_hashes(unrelated())
        worker = workers.select("m", policy, hashes=hashes)
        background.append(workers.acquire(worker.id, hashes=hashes))
    assert Counter(s.worker.id for s in background) == {f"http://w{i}": 2 for i in range(4)}

    # Two conversations, each a long shared system prompt plus a new turn, interleaved; each
    # request finishes before that conversation's next one arrives.
    prefixes = {name: name * 256 * 12 for name in ("A", "B")}
    seen: dict[str, set[str]] = {"A": set(), "B": set()}
    for turn in range(10):
        for name, prefix in prefixes.items():
            hashes = block_hashes(f"{prefix} turn {turn}: {unrelated()[:100]}")
            worker = workers.select("m", policy, hashes=hashes)
            with workers.acquire(worker.id, hashes=hashes):
                seen[name].add(worker.id)
    assert len(seen["A"]) == 1
    assert len(seen["B"]) == 1

    for slot in background:
        slot.release()
    assert all(w.inflight == 0 and w.active_blocks == 0 for w in workers)

    # Unrelated requests finishing one by one stay spread over every worker.
    spread: Counter[str] = Counter()
    for _ in range(40):
        hashes = block_hashes(unrelated())
        worker = workers.select("m", policy, hashes=hashes)
        with workers.acquire(worker.id, hashes=hashes):
            spread[worker.id] += 1
    assert len(spread) == 4
    assert min(spread.values()) >= 5
