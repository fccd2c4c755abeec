"""The mocker's KV cache events, published as vLLM publishes its own (``--kv-events-port``).

:class:`KvEventPublisher` is the :class:`~.kv.KvListener` of a mocker's block pool. Every
registration and eviction the pool makes is queued, and the queue is sent as one
``KVEventBatch`` (:mod:`dynamo_llm.protocols.kv_events`) per turn of the event loop, so a
scheduler pass's changes travel together, as vLLM batches an engine step's. Consecutive
blocks of one sequence are coalesced into one ``BlockStored`` (parent of the first, the
blocks' tokens in order), as vLLM does.

Sockets: a PUB socket numbers the batches 0, 1, 2, ... and a ROUTER socket replays the last
``buffer_steps`` batches from any sequence a subscriber asks for. The first batch a publisher
sends is ``AllBlocksCleared``: a restarted worker starts numbering from 0 again and its cache is
empty, and both say so to a frontend that was following the previous process.

Sending never waits: a PUB socket drops what a slow subscriber cannot take (its high-water
mark), and the subscriber sees the gap in the sequence and asks for a replay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence

import zmq
import zmq.asyncio

from ...protocols.kv_events import (
    END_OF_REPLAY,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    decode_sequence,
    encode_batch,
    encode_sequence,
)
from ...runtime.tasks import cancel_and_wait

log = logging.getLogger("dynamo_llm.mocker.events")

DEFAULT_BUFFER_STEPS = 10_000


class KvEventPublisher:
    """Publishes a block pool's changes on a PUB socket, with a ROUTER replay socket.

    ``KvEventPublisher(block_size, host=..., port=0, replay_port=0)``: port 0 lets the OS
    choose; :attr:`endpoint` and :attr:`replay_endpoint` name the bound sockets once
    :meth:`start` has run (with ``advertise_host`` in place of the bind address).
    """

    def __init__(
        self,
        block_size: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        replay_port: int = 0,
        advertise_host: str | None = None,
        buffer_steps: int = DEFAULT_BUFFER_STEPS,
        topic: str = "",
    ) -> None:
        self.block_size = block_size
        self._host = host
        self._port = port
        self._replay_port = replay_port
        self._advertise_host = advertise_host or host
        self._topic = topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._pending: list[KvEvent] = [AllBlocksCleared()]
        self._next_seq = 0
        self._flush_scheduled = False
        self._ctx = zmq.asyncio.Context()
        self._pub: zmq.asyncio.Socket | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self.endpoint: str | None = None
        self.replay_endpoint: str | None = None
        self.batches_sent = 0

    # ---- the pool's listener ------------------------------------------------------------------

    def stored(self, block_hash: int, parent_hash: int | None, token_ids: Sequence[int]) -> None:
        pending = self._pending
        last = pending[-1] if pending else None
        if (
            isinstance(last, BlockStored)
            and parent_hash is not None
            and last.block_hashes[-1] == parent_hash
        ):
            last.block_hashes.append(block_hash)
            last.token_ids.extend(token_ids)
        else:
            pending.append(BlockStored([block_hash], parent_hash, list(token_ids), self.block_size))
        self._schedule_flush()

    def removed(self, block_hash: int) -> None:
        pending = self._pending
        last = pending[-1] if pending else None
        if isinstance(last, BlockRemoved):
            last.block_hashes.append(block_hash)
        else:
            pending.append(BlockRemoved([block_hash]))
        self._schedule_flush()

    # ---- sockets -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind both sockets, send what is queued (the opening ``AllBlocksCleared``)."""
        pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, 100_000)
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        try:
            self.endpoint = _bind(pub, self._host, self._port, self._advertise_host)
            self.replay_endpoint = _bind(
                router, self._host, self._replay_port, self._advertise_host
            )
        except zmq.ZMQError:
            pub.close()
            router.close()
            raise
        self._pub, self._router = pub, router
        self._task = asyncio.get_running_loop().create_task(self._serve_replay())
        log.info("KV events on %s (replay on %s)", self.endpoint, self.replay_endpoint)
        self._schedule_flush()

    async def aclose(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        for sock in (self._pub, self._router):
            if sock is not None:
                sock.close()
        self._pub = self._router = None
        self._ctx.term()

    def _schedule_flush(self) -> None:
        if self._flush_scheduled or self._pub is None:
            return
        self._flush_scheduled = True
        asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending or self._pub is None:
            return
        events, self._pending = self._pending, []
        # A wall-clock stamp, as vLLM's: it is for the reader's logs, not for any decision.
        payload = encode_batch(time.time(), events)
        seq = self._next_seq
        self._next_seq += 1
        self._buffer.append((seq, payload))
        # zmq.asyncio's send on a PUB socket completes at once (it drops past the HWM).
        self._pub.send_multipart((self._topic, encode_sequence(seq), payload), zmq.NOBLOCK)
        self.batches_sent += 1

    async def _serve_replay(self) -> None:
        router = self._router
        assert router is not None
        while True:
            frames = await router.recv_multipart()
            if len(frames) != 3:
                log.warning("ignoring a replay request of %d frames", len(frames))
                continue
            client, _, start = frames
            try:
                first = decode_sequence(start)
            except ValueError:
                log.warning("ignoring a replay request with a malformed sequence")
                continue
            for seq, payload in list(self._buffer):
                if seq >= first:
                    await router.send_multipart((client, b"", encode_sequence(seq), payload))
            await router.send_multipart((client, b"", encode_sequence(END_OF_REPLAY), b""))


def _bind(sock: zmq.asyncio.Socket, host: str, port: int, advertise_host: str) -> str:
    bind_host = "*" if host in ("0.0.0.0", "::", "") else host
    if port:
        sock.bind(f"tcp://{bind_host}:{port}")
    else:
        port = sock.bind_to_random_port(f"tcp://{bind_host}")
    return f"tcp://{advertise_host}:{port}"
