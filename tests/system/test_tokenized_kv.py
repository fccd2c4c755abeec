"""Precise ``kv`` routing with the model's own tokenizer (``--tokenizer FOLDER``, issue 13).

The workers here are two KV event publishers on real ZMQ sockets that say they cache the blocks
of a chat's ids as the model's chat template and tokenizer give them (what a vLLM worker with
that model publishes); the fleet's prediction must find them there, and for the conversation's
next turn the blocks of the prefix the two turns share.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dynamo_llm.config import Config
from dynamo_llm.engines.mocker.events import KvEventPublisher
from dynamo_llm.fleet import Fleet, build_routed_app
from dynamo_llm.http.app import create_app
from dynamo_llm.metrics import Metrics
from dynamo_llm.router.kv_blocks import KvEventSource
from dynamo_llm.runtime.clock import FakeClock
from tests.helpers import polled
from tests.unit.tokenization.helpers import chat, model_folder

pytestmark = pytest.mark.usefixtures("safety_net")

BLOCK = 4
_hashes = itertools.count(1000)


@pytest.fixture
async def publishers() -> AsyncIterator[list[KvEventPublisher]]:
    pubs = [KvEventPublisher(BLOCK), KvEventPublisher(BLOCK)]
    for pub in pubs:
        await pub.start()
    yield pubs
    for pub in pubs:
        await pub.aclose()


def publish_blocks(pub: KvEventPublisher, ids: list[int]) -> int:
    """Announce the full blocks of ``ids`` as cached; how many there are."""
    parent = None
    n = len(ids) // BLOCK
    for i in range(n):
        block = next(_hashes)
        pub.stored(block, parent, ids[i * BLOCK : (i + 1) * BLOCK])
        parent = block
    return n


def common_prefix(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


async def test_precise_kv_routing_predicts_from_the_models_own_token_ids(
    tmp_path: Path, publishers: list[KvEventPublisher]
) -> None:
    folder = model_folder(tmp_path / "model")
    config = Config(router_mode="kv", tokenizers=(str(folder),), upstreams=("http://w0",))
    clock = FakeClock()
    metrics = Metrics()
    fleet = Fleet(config, create_app(config, [], metrics, clock), clock, metrics)
    intake = fleet.kv_intake
    assert intake is not None
    sources = [
        (f"w{i}", KvEventSource(pub.endpoint or "", pub.replay_endpoint, BLOCK))
        for i, pub in enumerate(publishers)
    ]
    try:
        await intake.reconcile(sources)
        await polled(lambda: intake.precise_workers() == {"w0", "w1"}, "both workers precise")
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the weather in Paris today?"},
        ]
        first = chat({"messages": messages})
        ids = await fleet._prompt_ids(first)
        assert ids is not None and ids == fleet.tokenizers[None].chat_ids(first)
        blocks = publish_blocks(publishers[1], ids)
        await polled(
            lambda: (entry := intake.index.get("w1")) is not None and len(entry) == blocks,
            "w1's blocks in the index",
        )
        predicted = await fleet._predict_kv(first, ids, ["w0", "w1"])
        assert predicted is not None
        assert predicted.cached == {"w0": 0, "w1": blocks * BLOCK}

        messages += [
            {"role": "assistant", "content": "Sunny, 20 celsius."},
            {"role": "user", "content": "And in Rome?"},
        ]
        second = chat({"messages": messages}, rid="r2")
        later = await fleet._prompt_ids(second)
        assert later is not None
        shared = common_prefix(ids, later)
        assert shared >= len(ids) - 2  # all but the generation prompt's tail
        predicted = await fleet._predict_kv(second, later, ["w0", "w1"])
        assert predicted is not None
        assert predicted.cached == {"w0": 0, "w1": shared // BLOCK * BLOCK}

        image = chat({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
        assert await fleet._prompt_ids(image) is None
        # The model's own tokenizer could not say: no guess with the mocker's instead.
        assert await fleet._predict_kv(image, None, ["w0", "w1"]) is None
    finally:
        await intake.aclose()


def test_a_tokenizer_that_cannot_be_loaded_stops_the_frontend_at_start_up(tmp_path: Path) -> None:
    for path, reason in ((tmp_path / "nowhere", "no such folder"), (tmp_path, "tokenizer.json")):
        config = Config(upstreams=("http://w0",), tokenizers=(str(path),))
        with pytest.raises(ValueError, match=reason):
            build_routed_app(config, FakeClock())
