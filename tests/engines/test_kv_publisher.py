"""The KV event intake against vLLM's own publisher (``vllm.distributed.kv_events``), run alone
with the vLLM venv's python: its batches are read live and by replay, an idle publisher stays
precise (it sends nothing, but answers the liveness check's replay request), a stopped one
(SIGSTOP) turns approximate and comes back precise, its entries kept, when it continues."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dynamo_llm.router.kv_blocks import KvBlockIndex, KvEventSource, block_keys
from dynamo_llm.router.kv_events import KvEventIntake, KvEventSubscriber
from tests.engines.harness import free_port
from tests.helpers import polled

pytestmark = pytest.mark.usefixtures("safety_net")

SILENCE = 1.0
W = "vllm"


@pytest.fixture
def safety_net_seconds() -> float:
    return 240.0  # importing vllm takes 30-60 s on a loaded machine


class Publisher:
    def __init__(self) -> None:
        python = os.environ.get("DYN_ENGINES_VLLM_PYTHON")
        if not python:
            pytest.skip("DYN_ENGINES_VLLM_PYTHON is not set: run scripts/test-engines")
        self.port, self.replay_port = free_port(), free_port()
        script = Path(__file__).with_name("vllm_kv_publisher.py")
        self.proc = subprocess.Popen(
            [python, str(script), str(self.port), str(self.replay_port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    async def line(self) -> str:
        assert self.proc.stdout is not None
        return (await asyncio.to_thread(self.proc.stdout.readline)).strip()

    async def store(self) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write("store\n")
        self.proc.stdin.flush()
        return await self.line()

    @property
    def source(self) -> KvEventSource:
        return KvEventSource(f"tcp://127.0.0.1:{self.port}", f"tcp://127.0.0.1:{self.replay_port}")


@pytest.fixture
async def publisher() -> AsyncIterator[Publisher]:
    pub = Publisher()
    try:
        assert await pub.line() == "ready", "vLLM's publisher did not start"
        yield pub
    finally:
        pub.proc.kill()
        await asyncio.to_thread(pub.proc.communicate)  # reaped, its pipes closed


async def test_vllms_publisher_is_followed_idle_and_taken_for_silent_only_when_stopped(
    publisher: Publisher,
) -> None:
    assert await publisher.store() == "stored 1"  # before the subscriber: learned by replay
    intake = KvEventIntake(KvBlockIndex(), silence=SILENCE, replay_timeout=2.0)
    try:
        await intake.reconcile([(W, publisher.source)])
        sub = intake.subscriber(W)
        assert isinstance(sub, KvEventSubscriber)
        await polled(lambda: sub.is_precise, "the opening replay applied", timeout=20)
        assert await publisher.store() == "stored 2"  # live
        entry = intake.index.get(W)
        assert entry is not None
        await polled(lambda: len(entry) == 2, "the live batch applied")
        assert set(entry.keys()) == set(block_keys([1, 1, 2, 2], 2))
        # Idle: vLLM sends nothing; three liveness checks answered, still precise.
        heard = sub.heard_at
        await polled(lambda: sub.heard_at >= heard + 3 * SILENCE, "three answered checks")
        assert sub.is_precise and sub.silences == 0
        os.kill(publisher.proc.pid, signal.SIGSTOP)
        try:
            try:
                await polled(lambda: sub.is_silent, "the stopped publisher taken for silent", 30)
            except AssertionError as exc:
                state = f"heard at {sub.heard_at}, silences {sub.silences}, gaps {sub.gaps}"
                raise AssertionError(f"{exc} ({state})") from None
            assert intake.mode(W) == "approximate" and len(entry) == 2
        finally:
            os.kill(publisher.proc.pid, signal.SIGCONT)
        await polled(lambda: sub.is_precise, "precise again once it answers")
        assert sub.resets == 0 and len(entry) == 2
    finally:
        await intake.aclose()
