"""A replay answered in vLLM's own frames is understood (``router/kv_events.py``).

vLLM 0.32's ROUTER answers a replay request with ``[delimiter, topic, sequence, payload]``
frames (``ZmqEventPublisher._service_replay``), where the mocker's publisher sends no topic
frame; the subscriber takes both. A raw ROUTER socket here plays vLLM: a frontend that starts
after the engine cached blocks learns them from the replay alone.
"""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from dynamo_llm.protocols.kv_events import (
    END_OF_REPLAY,
    BlockStored,
    encode_batch,
    encode_sequence,
)
from dynamo_llm.router.kv_blocks import KvBlockIndex, KvEventSource
from dynamo_llm.router.kv_events import KvEventIntake
from tests.helpers import polled

pytestmark = pytest.mark.usefixtures("safety_net")


async def serve_one_replay_as_vllm(router: zmq.asyncio.Socket, payload: bytes) -> None:
    client, _empty, start = await router.recv_multipart()
    assert int.from_bytes(start, "big") == 0
    await router.send_multipart((client, b"", b"", encode_sequence(0), payload))
    await router.send_multipart((client, b"", b"", encode_sequence(END_OF_REPLAY), b""))


async def test_a_replay_in_vllms_frames_fills_the_index() -> None:
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    router = ctx.socket(zmq.ROUTER)
    for sock in (pub, router):
        sock.setsockopt(zmq.LINGER, 0)
    pub_port = pub.bind_to_random_port("tcp://127.0.0.1")
    router_port = router.bind_to_random_port("tcp://127.0.0.1")
    payload = encode_batch(0.0, [BlockStored([11, 12], None, list(range(8)), 4)])
    server = asyncio.create_task(serve_one_replay_as_vllm(router, payload))
    intake = KvEventIntake(KvBlockIndex())
    source = KvEventSource(f"tcp://127.0.0.1:{pub_port}", f"tcp://127.0.0.1:{router_port}", 4)
    try:
        await intake.reconcile([("w", source)])
        await polled(lambda: intake.precise_workers() == {"w"}, "the replay applied")
        await server
        predicted = intake.predict(list(range(10)), ["w"])
        assert predicted is not None and predicted.cached == {"w": 8}
    finally:
        server.cancel()
        await intake.aclose()
        pub.close()
        router.close()
        ctx.term()
