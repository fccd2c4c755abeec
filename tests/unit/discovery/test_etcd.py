"""etcd discovery's reconciliation, over a scripted in-memory etcd on a fake clock.

The real etcd paths (kill and restart, a partition, compaction) are in
``tests/system/test_etcd_discovery.py``; here each step is exact: what the listing returns,
which watch batches arrive, when the watch breaks or says its revision was compacted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

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
from tests.unit.router.helpers import probe_ok

PREFIX = instances_prefix("dynamo")
A, B = "http://10.0.0.1:8000", "http://10.0.0.2:8000"

WatchItem = list[WatchEvent] | BaseException | None


def record(iid: str, url: str, *models: str) -> bytes:
    return Instance(instance_id=iid, url=url, models=models, owned_by="dynamo-llm").encode()


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


def discovery(etcd: ScriptedEtcd, clock: FakeClock) -> tuple[WorkerSet, EtcdDiscovery]:
    workers = WorkerSet(clock=clock, probe=probe_ok)
    client: EtcdClient = etcd  # type: ignore[assignment]
    return workers, EtcdDiscovery(workers, client, "dynamo", clock)


async def test_the_listing_is_applied_then_the_watch_starts_after_its_revision() -> None:
    clock, etcd = FakeClock(), ScriptedEtcd()
    etcd.kvs = {PREFIX + "a1": record("a1", A, "m"), PREFIX + "junk": b"not json"}
    workers, found = discovery(etcd, clock)
    await found.start()
    await settle()
    try:
        assert [w.url for w in workers] == [A]
        assert etcd.watches == [11]
        await etcd.items.put([WatchEvent(PREFIX + "b1", record("b1", B, "m", "n"), 12)])
        await settle()
        assert {w.url for w in workers} == {A, B}
        assert found.models() == {"m", "n"}
        await etcd.items.put([WatchEvent(PREFIX + "a1", None, 13)])
        await settle()
        assert [w.url for w in workers] == [B]
    finally:
        await found.aclose()


async def test_a_compacted_watch_lists_again_and_drops_what_it_never_saw_deleted() -> None:
    clock, etcd = FakeClock(), ScriptedEtcd()
    etcd.kvs = {PREFIX + "a1": record("a1", A, "m"), PREFIX + "b1": record("b1", B, "m")}
    workers, found = discovery(etcd, clock)
    await found.start()
    await settle()
    try:
        assert len(workers) == 2
        # a1's delete and c1's put happen where the watch cannot see them
        del etcd.kvs[PREFIX + "a1"]
        etcd.kvs[PREFIX + "c1"] = record("c1", A, "n")
        etcd.revision = 40
        await etcd.items.put(WatchCompacted(30))
        await settle()
        assert etcd.lists == 2 and etcd.watches == [11, 41]
        assert set(found.instances) == {"b1", "c1"}
        assert workers.get(A) is not None and workers.get(A).models == {"n"}  # type: ignore[union-attr]
    finally:
        await found.aclose()


async def test_while_etcd_is_unreachable_the_last_set_stays_and_a_relisting_reconciles() -> None:
    clock, etcd = FakeClock(), ScriptedEtcd()
    etcd.kvs = {PREFIX + "a1": record("a1", A, "m"), PREFIX + "b1": record("b1", B, "m")}
    workers, found = discovery(etcd, clock)
    await found.start()
    await settle()
    try:
        etcd.reachable = False
        await etcd.items.put(EtcdUnavailable("connection reset"))
        await settle()
        assert not found.connected
        assert found.status()["state"] == "unreachable"
        assert len(workers) == 2  # still routed to
        del etcd.kvs[PREFIX + "b1"]
        await clock.advance(5.0)  # back-off retries fail meanwhile
        assert len(workers) == 2
        etcd.reachable = True
        await clock.advance(5.0)
        assert found.status()["state"] == "connected"
        assert [w.url for w in workers] == [A]
    finally:
        await found.aclose()


async def test_two_instances_of_one_url_serve_the_union_until_the_last_goes() -> None:
    clock, etcd = FakeClock(), ScriptedEtcd()
    etcd.kvs = {PREFIX + "old": record("old", A, "m"), PREFIX + "new": record("new", A, "n")}
    workers, found = discovery(etcd, clock)
    await found.start()
    await settle()
    try:
        (worker,) = workers
        assert worker.models == {"m", "n"}
        assert worker.instance_ids == ("new", "old")
        await etcd.items.put([WatchEvent(PREFIX + "old", None, 12)])
        await settle()
        assert [w.models for w in workers] == [{"n"}]
        await etcd.items.put([WatchEvent(PREFIX + "new", None, 13)])
        await settle()
        assert len(workers) == 0
    finally:
        await found.aclose()
