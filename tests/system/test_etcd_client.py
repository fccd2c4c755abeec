"""The etcd client against a real etcd: keys, leases, watches, compaction, failover."""

from __future__ import annotations

import asyncio
import socket

import pytest

from dynamo_llm.discovery.etcd_client import (
    EtcdClient,
    EtcdUnavailable,
    WatchCompacted,
    prefix_range_end,
)
from dynamo_llm.testing.etcd import EtcdServer

pytestmark = pytest.mark.usefixtures("safety_net")


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_prefix_range_end_covers_exactly_the_prefix() -> None:
    assert prefix_range_end("v1/a/") == b"v1/a0"
    assert prefix_range_end("") == b"\0"  # every key


async def test_put_range_and_delete_round_trip(etcd: EtcdServer) -> None:
    client = EtcdClient([etcd.url])
    try:
        await client.put("p/one", b"1")
        await client.put("p/two", b"2")
        await client.put("q/other", b"3")
        revision, kvs = await client.range_prefix("p/")
        assert {kv.key: kv.value for kv in kvs} == {"p/one": b"1", "p/two": b"2"}
        assert revision >= 4
        assert await client.delete("p/one") == 1
        assert [kv.key for kv in (await client.range_prefix("p/"))[1]] == ["p/two"]
    finally:
        await client.aclose()


async def test_a_key_on_a_lease_goes_when_the_lease_is_revoked(etcd: EtcdServer) -> None:
    client = EtcdClient([etcd.url])
    try:
        lease = await client.grant(30)
        assert lease.ttl == 30
        await client.put("k", b"v", lease=lease.id)
        assert 0 < await client.keepalive(lease.id) <= 30
        await client.revoke(lease.id)
        assert (await client.range_prefix("k"))[1] == []
        assert await client.keepalive(lease.id) == 0  # gone: the caller registers again
    finally:
        await client.aclose()


async def test_watch_reports_puts_and_deletes_from_the_revision(etcd: EtcdServer) -> None:
    client = EtcdClient([etcd.url])
    try:
        revision, _ = await client.range_prefix("w/")
        await client.put("w/a", b"1")  # after the listing: the watch must replay it
        seen: list[tuple[str, bytes | None]] = []
        done = asyncio.Event()

        async def watch() -> None:
            async for batch in client.watch("w/", revision + 1):
                seen.extend((e.key, e.value) for e in batch)
                if len(seen) == 3:
                    done.set()
                    return

        task = asyncio.create_task(watch())
        await client.put("w/b", b"2")
        await client.delete("w/a")
        await done.wait()
        await task
        assert seen == [("w/a", b"1"), ("w/b", b"2"), ("w/a", None)]
    finally:
        await client.aclose()


async def test_watch_from_a_compacted_revision_says_so(etcd: EtcdServer) -> None:
    client = EtcdClient([etcd.url])
    try:
        first = await client.put("c/a", b"1")
        latest = await client.put("c/a", b"2")
        await client.compact(latest)
        with pytest.raises(WatchCompacted) as caught:
            async for _ in client.watch("c/", first):
                pass
        assert caught.value.compact_revision == latest
    finally:
        await client.aclose()


async def test_an_unreachable_endpoint_is_skipped_for_the_next(etcd: EtcdServer) -> None:
    client = EtcdClient([dead_url(), etcd.url])
    try:
        await client.put("f", b"1")
        assert client.endpoint == etcd.url  # tried first from now on
    finally:
        await client.aclose()
    alone = EtcdClient([dead_url()])
    try:
        with pytest.raises(EtcdUnavailable):
            await alone.range_prefix("f")
    finally:
        await alone.aclose()
