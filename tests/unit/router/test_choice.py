"""Choosing a worker for a request: its route key and the chosen worker's slot, without sockets."""

from collections.abc import Sequence

import msgspec
import pytest

from dynamo_llm.engines.base import EngineRequest
from dynamo_llm.engines.endpoints import CHAT, COMPLETIONS
from dynamo_llm.errors import NoWorkersAvailable
from dynamo_llm.metrics import Metrics
from dynamo_llm.protocols.chat import decode_chat_request
from dynamo_llm.protocols.completions import CompletionRequest
from dynamo_llm.router import RoutingPolicy, Worker, WorkerSet, block_hashes
from dynamo_llm.router.choice import RouteKey, acquire_worker, prompt_text, route_key
from dynamo_llm.router.policies import PreciseOverlap, RouterMode
from dynamo_llm.runtime import FakeClock
from tests.unit.router.helpers import MODEL, inflight, probe_ok

ROUND_ROBIN = RoutingPolicy(RouterMode.ROUND_ROBIN)
KV = RoutingPolicy(RouterMode.KV)


def completion(prompt: str | list[int]) -> EngineRequest:
    params = CompletionRequest(
        model=MODEL,
        prompt=prompt if isinstance(prompt, str) else list[str | int | list[int]](prompt),
    )
    return COMPLETIONS.request(params, prompt, id="r", model=MODEL, max_tokens=4)


def chat(*turns: tuple[str, str]) -> EngineRequest:
    messages = [{"role": role, "content": text} for role, text in turns]
    params = decode_chat_request(msgspec.json.encode({"model": MODEL, "messages": messages}))
    return CHAT.request(params, id="r", model=MODEL, max_tokens=4)


def worker_set(*urls: str) -> tuple[WorkerSet, Metrics]:
    metrics = Metrics()
    workers = WorkerSet(clock=FakeClock(), probe=probe_ok, metrics=metrics)
    for url in urls:
        workers.add(Worker(url, [MODEL]))
    return workers, metrics


def test_a_completions_prompt_is_routed_on_its_text_or_its_ids_joined() -> None:
    assert prompt_text(completion("once upon")) == "once upon"
    assert prompt_text(completion([5, 6, 7])) == "5 6 7"


def test_a_chat_prompt_is_routed_on_its_turns_one_a_line() -> None:
    text = prompt_text(chat(("system", "be brief"), ("user", "hi")))
    assert text == "system: be brief\nuser: hi"


async def test_a_mode_that_ignores_prefixes_routes_on_nothing() -> None:
    workers, _ = worker_set("http://a")

    async def predictor(
        request: EngineRequest, ids: list[int] | None, worker_ids: Sequence[str]
    ) -> PreciseOverlap | None:
        raise AssertionError("round-robin must not ask for a KV prediction")

    key = await route_key(completion("hi"), None, ROUND_ROBIN, workers, predictor)
    assert key == RouteKey([])


async def test_the_kv_mode_routes_on_the_prompts_block_hashes() -> None:
    workers, _ = worker_set("http://a")
    request = completion("a prompt long enough to fill more than one block " * 8)
    key = await route_key(request, None, KV, workers, None)
    assert key.hashes == block_hashes(prompt_text(request))
    assert key.hashes
    assert key.precise is None


async def test_the_kv_predictor_is_asked_about_the_models_live_workers_with_the_ids() -> None:
    workers, _ = worker_set("http://a", "http://b")
    workers.add(Worker("http://other", ["another-model"]))
    asked: list[tuple[list[int] | None, list[str]]] = []
    prediction = PreciseOverlap(tokens=3, cached={"http://b": 2})

    async def predictor(
        request: EngineRequest, ids: list[int] | None, worker_ids: Sequence[str]
    ) -> PreciseOverlap | None:
        asked.append((ids, list(worker_ids)))
        return prediction

    key = await route_key(completion("hi"), [1, 2, 3], KV, workers, predictor)
    assert asked == [([1, 2, 3], ["http://a", "http://b"])]
    assert key.precise == prediction
    assert key.predicted("http://b") == 2
    assert key.predicted("http://a") is None
    assert RouteKey([]).predicted("http://b") is None


def test_the_chosen_workers_slot_is_taken_in_the_same_step() -> None:
    workers, _ = worker_set("http://a", "http://b")
    worker, slot = acquire_worker(workers, ROUND_ROBIN, completion("hi"), RouteKey([]), set())
    assert inflight(workers)[worker.id] == 1
    slot.release()
    assert inflight(workers)[worker.id] == 0


def test_a_worker_gone_between_choice_and_slot_is_excluded_and_another_chosen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    workers, _ = worker_set("http://a", "http://b")
    select = workers.select
    lost: list[str] = []

    def select_then_lose_the_first(*args: object, **kwargs: object) -> Worker:
        worker = select(*args, **kwargs)  # type: ignore[arg-type]
        if not lost:
            lost.append(worker.id)
            workers.remove(worker.id)
        return worker

    monkeypatch.setattr(workers, "select", select_then_lose_the_first)
    exclude: set[str] = set()
    worker, slot = acquire_worker(workers, ROUND_ROBIN, completion("hi"), RouteKey([]), exclude)
    assert exclude == set(lost)
    assert worker.id not in lost
    assert inflight(workers) == {worker.id: 1}
    slot.release()


def test_the_choice_is_made_again_only_once(monkeypatch: pytest.MonkeyPatch) -> None:
    workers, _ = worker_set("http://a", "http://b", "http://c")
    select = workers.select
    chosen: list[str] = []

    def select_then_lose_it(*args: object, **kwargs: object) -> Worker:
        worker = select(*args, **kwargs)  # type: ignore[arg-type]
        chosen.append(worker.id)
        workers.remove(worker.id)
        return worker

    monkeypatch.setattr(workers, "select", select_then_lose_it)
    with pytest.raises(NoWorkersAvailable):
        acquire_worker(workers, ROUND_ROBIN, completion("hi"), RouteKey([]), set())
    assert len(chosen) == 2


def test_the_prediction_for_the_chosen_worker_is_counted() -> None:
    workers, metrics = worker_set("http://a", "http://b")
    key = RouteKey([], PreciseOverlap(tokens=100, cached={"http://a": 64}))
    first, slot_a = acquire_worker(
        workers, ROUND_ROBIN, completion("hi"), key, set(), metrics=metrics
    )
    second, slot_b = acquire_worker(
        workers, ROUND_ROBIN, completion("hi"), key, set(), metrics=metrics
    )
    assert (first.id, second.id) == ("http://a", "http://b")
    overlap = metrics.router_kv_predicted_overlap_tokens.labels()
    assert (overlap.count, overlap.sum) == (1, 64)  # b had no prediction: nothing observed
    assert metrics.router_kv_predicted_cached_tokens_total.labels().value == 64
    slot_a.release()
    slot_b.release()
