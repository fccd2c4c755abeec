"""etcd discovery's reconciliation, over a scripted in-memory etcd on a fake clock.

The real etcd paths (kill and restart, a partition, compaction) are in
``tests/system/test_etcd_discovery.py``; here each step is exact: what the listing returns,
which watch batches arrive, when the watch breaks or says its revision was compacted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from dynamo_llm.discovery.etcd import EtcdDiscovery
from dynamo_llm.discovery.etcd_client import (
    EtcdClient,
    EtcdUnavailable,
    KeyValue,
    WatchCompacted,
    WatchEvent,
)
from dynamo_llm.discovery.instance import Instance, instances_prefix
from dynamo_llm.router import WorkerSet
from dynamo_llm.runtime import FakeClock
from dynamo_llm.runtime.clock import settle
from tests.helpers import registered
from tests.unit.router.helpers import probe_ok

PREFIX = instances_prefix("dynamo")
A, B = "http://10.0.0.1:8000", "http://10.0.0.2:8000"

WatchItem = list[WatchEvent] | BaseException | None


def record(iid: str, url: str, *models: str, owned_by: str = "dynamo-llm") -> bytes:
    return Instance(instance_id=iid, url=url, models=models, owned_by=owned_by).encode()


class ScriptedEtcd:
    """``range_prefix`` answers from ``kvs``; ``watch`` yields what the test queues (a batch, an
    exception to raise, or None to end the stream)."""

    endpoint = "http://etcd.test:2379"

    def __init__(self) -> None:
        self.kvs: dict[str, bytes] = {}
        self.revision = 10
        self.reachable = True
        self.lists = 0
        self.watches: list[int] = []
        self.items: asyncio.Queue[WatchItem] = asyncio.Queue()

    async def range_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        if not self.reachable:
            raise EtcdUnavailable("connection refused")
        self.lists += 1
        return self.revision, [KeyValue(k, v, self.revision, 1) for k, v in self.kvs.items()]

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        self.watches.append(start_revision)
        while True:
            item = await self.items.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def aclose(self) -> None:
        pass


@dataclass
class Watching:
    clock: FakeClock
    etcd: ScriptedEtcd
    workers: WorkerSet
    found: EtcdDiscovery

    async def deliver(self, item: WatchItem) -> None:
        """One watch message (or failure), and everything it sets off."""
        await self.etcd.items.put(item)
        await settle()


@contextlib.asynccontextmanager
async def watching(**records: bytes) -> AsyncIterator[Watching]:
    """Discovery started over a scripted etcd holding ``records`` (by instance id)."""
    clock, etcd = FakeClock(), ScriptedEtcd()
    etcd.kvs = {PREFIX + iid: value for iid, value in records.items()}
    workers = WorkerSet(clock=clock, probe=probe_ok)
    client: EtcdClient = etcd  # type: ignore[assignment]
    found = EtcdDiscovery(workers, client, "dynamo", clock)
    await found.start()
    await settle()
    try:
        yield Watching(clock, etcd, workers, found)
    finally:
        await found.aclose()


async def test_the_listing_is_applied_then_the_watch_starts_after_its_revision() -> None:
    async with watching(a1=record("a1", A, "m"), junk=b"not json") as w:
        assert [worker.url for worker in w.workers] == [A]
        assert w.etcd.watches == [11]
        await w.deliver([WatchEvent(PREFIX + "b1", record("b1", B, "m", "n"), 12)])
        assert {worker.url for worker in w.workers} == {A, B}
        assert w.found.models() == {"m", "n"}
        await w.deliver([WatchEvent(PREFIX + "a1", None, 13)])
        assert [worker.url for worker in w.workers] == [B]


async def test_a_compacted_watch_lists_again_and_drops_what_it_never_saw_deleted() -> None:
    async with watching(a1=record("a1", A, "m"), b1=record("b1", B, "m")) as w:
        assert len(w.workers) == 2
        # a1's delete and c1's put happen where the watch cannot see them
        del w.etcd.kvs[PREFIX + "a1"]
        w.etcd.kvs[PREFIX + "c1"] = record("c1", A, "n")
        w.etcd.revision = 40
        await w.deliver(WatchCompacted(30))
        assert w.etcd.lists == 2 and w.etcd.watches == [11, 41]
        assert set(w.found.instances) == {"b1", "c1"}
        assert registered(w.workers, A).models == {"n"}


async def test_while_etcd_is_unreachable_the_last_set_stays_and_a_relisting_reconciles() -> None:
    async with watching(a1=record("a1", A, "m"), b1=record("b1", B, "m")) as w:
        w.etcd.reachable = False
        await w.deliver(EtcdUnavailable("connection reset"))
        assert not w.found.connected
        assert w.found.status()["state"] == "unreachable"
        assert len(w.workers) == 2  # still routed to
        del w.etcd.kvs[PREFIX + "b1"]
        await w.clock.advance(5.0)  # back-off retries fail meanwhile
        assert len(w.workers) == 2
        w.etcd.reachable = True
        await w.clock.advance(5.0)
        assert w.found.status()["state"] == "connected"
        assert [worker.url for worker in w.workers] == [A]


async def test_two_instances_of_one_url_serve_the_union_until_the_last_goes() -> None:
    async with watching(old=record("old", A, "m"), new=record("new", A, "n")) as w:
        (worker,) = w.workers
        assert worker.models == {"m", "n"}
        assert worker.instance_ids == ("new", "old")
        await w.deliver([WatchEvent(PREFIX + "old", None, 12)])
        assert [worker.models for worker in w.workers] == [{"n"}]
        await w.deliver([WatchEvent(PREFIX + "new", None, 13)])
        assert len(w.workers) == 0


async def test_a_worker_is_owned_by_what_its_instances_agree_on_ours_when_any_is_ours() -> None:
    async with watching(
        a1=record("a1", A, "m", owned_by="vllm"), b1=record("b1", B, "m", owned_by="vllm")
    ) as w:
        assert registered(w.workers, A).owner == "vllm"
        assert not registered(w.workers, A).is_ours
        # A second engine's sidecar on the same URL says otherwise: nobody can tell which.
        await w.deliver([WatchEvent(PREFIX + "a2", record("a2", A, "n", owned_by="sglang"), 12)])
        assert registered(w.workers, A).owner == ""
        # Our own worker registered there understands our stop route whatever the others say.
        await w.deliver([WatchEvent(PREFIX + "a3", record("a3", A, "n"), 13)])
        assert registered(w.workers, A).is_ours and registered(w.workers, A).owner == "dynamo-llm"
        assert registered(w.workers, B).owner == "vllm"


async def test_a_silent_watch_is_repaired_by_the_periodic_listing() -> None:
    async with watching(a1=record("a1", A, "m"), b1=record("b1", B, "m")) as w:
        del w.etcd.kvs[PREFIX + "b1"]  # a delete the watch never reports
        await w.clock.advance(9.9)
        assert len(w.workers) == 2
        await w.clock.advance(0.1)
        assert [worker.url for worker in w.workers] == [A]
        assert w.etcd.watches == [11]  # the watch itself carried on
        # etcd stops answering (hung): the next listing fails, and the state says so.
        w.etcd.reachable = False
        await w.clock.advance(10.0)
        assert w.found.status()["state"] == "unreachable"
        assert [worker.url for worker in w.workers] == [A]
