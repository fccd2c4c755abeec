"""The KV event intake against a scripted publisher on real ZMQ sockets: gaps are replayed, a
replay that cannot fill a gap resets the worker, a restart (sequence going back) clears it; a
publisher gone silent turns its worker approximate until it answers again (fake clock).

The publisher here is the test's own PUB + ROUTER pair speaking vLLM's format, so a test can
drop a batch from the live stream while keeping it for replay, as a slow subscriber's lost
message would be."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import zmq
import zmq.asyncio

from dynamo_llm.metrics import Metrics
from dynamo_llm.protocols.kv_events import (
    END_OF_REPLAY,
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    KvEvent,
    decode_sequence,
    encode_batch,
    encode_sequence,
)
from dynamo_llm.router.kv_blocks import KvBlockIndex, KvEventSource, block_keys
from dynamo_llm.router.kv_events import KvEventIntake
from dynamo_llm.runtime.clock import FakeClock
from dynamo_llm.runtime.tasks import cancel_and_wait
from tests.helpers import polled

pytestmark = pytest.mark.usefixtures("safety_net")

BS = 2
W = "w"
SILENCE = 5.0


class ScriptedPublisher:
    """PUB + ROUTER; ``publish`` numbers batches, ``drop`` keeps one out of the live stream."""

    def __init__(self, ctx: zmq.asyncio.Context) -> None:
        self.pub = ctx.socket(zmq.PUB)
        self.router = ctx.socket(zmq.ROUTER)
        for sock in (self.pub, self.router):
            sock.setsockopt(zmq.LINGER, 0)
        self.port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.replay_port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.buffer: list[tuple[int, bytes]] = []
        self.next_seq = 0
        self.replay_from = 0  # batches before this are gone from the replay buffer
        self.replays = 0
        self.topic_in_replays = False  # vLLM 0.32's framing: [b"", topic, seq, payload]

    @property
    def source(self) -> KvEventSource:
        return KvEventSource(
            f"tcp://127.0.0.1:{self.port}", f"tcp://127.0.0.1:{self.replay_port}", BS
        )

    async def publish(self, *events: KvEvent, drop: bool = False) -> None:
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        payload = encode_batch(0.0, list(events))
        self.buffer.append((seq, payload))
        if not drop:
            await self.pub.send_multipart((b"", encode_sequence(seq), payload))

    async def serve_replays(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            self.replays += 1
            first = decode_sequence(start)
            topic = (b"",) if self.topic_in_replays else ()
            for seq, payload in self.buffer:
                if seq >= max(first, self.replay_from):
                    frames = (client, b"", *topic, encode_sequence(seq), payload)
                    await self.router.send_multipart(frames)
            end = (client, b"", *topic, encode_sequence(END_OF_REPLAY), b"")
            await self.router.send_multipart(end)

    def start_serving(self) -> None:
        self.serving = asyncio.create_task(self.serve_replays())

    async def stop_serving(self) -> None:
        """Stop answering replay requests, as a hung publisher would."""
        await cancel_and_wait(self.serving)

    def close(self) -> None:
        self.pub.close()
        self.router.close()


def stored(tokens: list[int], hashes: list[int], parent: int | None = None) -> BlockStored:
    return BlockStored(list[BlockHash](hashes), parent, tokens, BS)


@contextlib.asynccontextmanager
async def following(
    *, clock: FakeClock | None = None, replay_timeout: float = 5.0, metrics: Metrics | None = None
) -> AsyncIterator[tuple[ScriptedPublisher, KvEventIntake]]:
    ctx = zmq.asyncio.Context()
    publisher = ScriptedPublisher(ctx)
    publisher.start_serving()
    intake = KvEventIntake(
        KvBlockIndex(), replay_timeout=replay_timeout, clock=clock, silence=SILENCE, metrics=metrics
    )
    try:
        await intake.reconcile([(W, publisher.source)])
        # The subscriber's opening replay (from 0) tells us it is connected and listening.
        await polled(lambda: publisher.replays >= 1, "the opening replay")
        sub = intake.subscriber(W)
        assert sub is not None
        yield publisher, intake
    finally:
        await intake.aclose()
        await publisher.stop_serving()
        publisher.close()
        ctx.term()


def cached(intake: KvEventIntake) -> int:
    entry = intake.index.get(W)
    return len(entry) if entry is not None else -1


async def settle(publisher: ScriptedPublisher, intake: KvEventIntake) -> None:
    """Wait until the subscriber has applied every batch published so far."""
    sub = intake.subscriber(W)
    assert sub is not None
    # The PUB socket may drop messages sent before the SUB joined: a marker batch is repeated
    # until it arrives (an empty batch changes nothing in the index).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while sub.expected != publisher.next_seq:
        if loop.time() > deadline:
            raise AssertionError(f"subscriber at {sub.expected}, publisher at {publisher.next_seq}")
        await publisher.publish()
        await asyncio.sleep(0.02)


async def test_a_dropped_batch_is_detected_and_replayed() -> None:
    async with following() as (publisher, intake):
        await settle(publisher, intake)
        await publisher.publish(stored([1, 2, 3, 4], [11, 12]))
        await publisher.publish(stored([5, 6], [13], parent=12), drop=True)
        await publisher.publish(BlockRemoved([11]))
        await settle(publisher, intake)
        sub = intake.subscriber(W)
        assert sub is not None and sub.gaps == 1 and sub.resets == 0
        entry = intake.index.get(W)
        assert entry is not None
        # 11 removed; 12 and the replayed 13 (keyed through 12) remain.
        assert set(entry.keys()) == set(block_keys([1, 2, 3, 4, 5, 6], BS)[1:])
        prediction = intake.predict([1, 2, 3, 4, 5, 6, 7], [W])
        assert prediction is not None and prediction.cached == {W: 0}  # its first block is gone


async def test_a_replay_framed_with_the_topic_as_vllm_0_32_sends_it_is_read() -> None:
    async with following() as (publisher, intake):
        publisher.topic_in_replays = True
        await settle(publisher, intake)
        await publisher.publish(stored([1, 2], [11]), drop=True)
        await publisher.publish(stored([3, 4], [12], parent=11))
        await settle(publisher, intake)
        sub = intake.subscriber(W)
        assert sub is not None and sub.gaps == 1 and sub.resets == 0 and sub.is_precise
        assert cached(intake) == 2


async def test_a_gap_the_replay_cannot_fill_resets_the_worker() -> None:
    async with following() as (publisher, intake):
        await settle(publisher, intake)
        await publisher.publish(stored([1, 2], [11]))
        await settle(publisher, intake)
        assert cached(intake) == 1
        await publisher.publish(stored([3, 4], [12], parent=11), drop=True)
        publisher.replay_from = publisher.next_seq  # the engine's buffer lost it
        await publisher.publish(stored([7, 8], [21]))
        await publisher.publish(stored([9, 9], [22], parent=21))
        await settle(publisher, intake)
        sub = intake.subscriber(W)
        assert sub is not None and sub.gaps == 1 and sub.resets == 1 and sub.is_precise
        entry = intake.index.get(W)
        assert entry is not None and set(entry.keys()) == set(block_keys([7, 8, 9, 9], BS))


async def test_a_sequence_going_back_clears_the_worker() -> None:
    async with following() as (publisher, intake):
        await publisher.publish(stored([1, 2, 3, 4], [11, 12]))
        await settle(publisher, intake)
        assert cached(intake) == 2
        # A restarted engine: numbering from 0 again, and an empty cache.
        publisher.buffer.clear()
        publisher.next_seq = 0
        await publisher.publish(AllBlocksCleared())
        await publisher.publish(stored([5, 6], [31]))
        entry = intake.index.get(W)
        assert entry is not None
        # (settle() cannot tell: the new numbering may already equal the old position.)
        await polled(
            lambda: set(entry.keys()) == set(block_keys([5, 6], BS)), "the restart applied"
        )


async def test_a_block_whose_parent_was_never_seen_is_not_keyed() -> None:
    async with following() as (publisher, intake):
        await publisher.publish(stored([5, 6], [13], parent=999))
        await settle(publisher, intake)
        entry = intake.index.get(W)
        assert entry is not None and len(entry) == 0 and entry.unkeyed == 1


def kv_mode_gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("dynamo_frontend_router_kv_mode", {"worker": W})


async def test_an_idle_publisher_that_answers_replays_stays_precise() -> None:
    clock = FakeClock()
    async with following(clock=clock) as (publisher, intake):
        await settle(publisher, intake)
        asked = publisher.replays
        await clock.advance(SILENCE)  # no batch for a silence: the subscriber asks
        await polled(lambda: publisher.replays == asked + 1, "the liveness replay request")
        sub = intake.subscriber(W)
        assert sub is not None
        await polled(lambda: sub.heard_at == clock.now(), "the answer to the check")
        assert sub.is_precise and not sub.is_silent and intake.mode(W) == "precise"
        await clock.advance(SILENCE - 0.1)  # the next check is one silence after the answer
        assert publisher.replays == asked + 1


async def test_a_silent_publisher_turns_its_worker_approximate_until_a_replay_resyncs_it() -> None:
    clock = FakeClock()
    metrics = Metrics()
    async with following(clock=clock, replay_timeout=0.2, metrics=metrics) as (publisher, intake):
        await publisher.publish(stored([1, 2], [11]))
        await settle(publisher, intake)
        sub = intake.subscriber(W)
        assert sub is not None and sub.is_precise and kv_mode_gauge(metrics) == 1
        await publisher.stop_serving()  # hung: it answers nothing
        await clock.advance(SILENCE)
        await polled(lambda: sub.is_silent, "the worker taken for silent")
        assert intake.mode(W) == "approximate" and kv_mode_gauge(metrics) == 0
        assert intake.predict([1, 2, 3], [W]) is None  # routing guesses for it now
        assert sub.silences == 1 and cached(intake) == 1  # its entries are kept for the re-sync
        silences = metrics.registry.get_sample_value(
            "dynamo_frontend_router_kv_event_silences_total", {"worker": W}
        )
        assert silences == 1
        # While it was taken for hung, its batches never reached the live stream.
        await publisher.publish(stored([3, 4], [12], parent=11), drop=True)
        await publisher.publish(BlockRemoved([11]), drop=True)
        publisher.start_serving()
        await clock.advance(SILENCE)
        await polled(lambda: sub.is_precise, "the worker precise again")
        assert kv_mode_gauge(metrics) == 1 and sub.resets == 0
        entry = intake.index.get(W)
        assert entry is not None and set(entry.keys()) == {block_keys([1, 2, 3, 4], BS)[1]}
