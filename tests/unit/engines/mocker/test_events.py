"""The mocker's block pool tells its listener what it caches and evicts."""

from __future__ import annotations

from collections.abc import Sequence

from dynamo_llm.engines.mocker.kv import BlockPool


class Heard:
    def __init__(self) -> None:
        self.events: list[tuple[str, int, int | None, list[int]]] = []

    def stored(self, block_hash: int, parent_hash: int | None, token_ids: Sequence[int]) -> None:
        self.events.append(("stored", block_hash, parent_hash, list(token_ids)))

    def removed(self, block_hash: int) -> None:
        self.events.append(("removed", block_hash, None, []))


def test_the_pool_reports_registrations_and_evictions_but_not_duplicates() -> None:
    pool = BlockPool(2)
    heard = Heard()
    pool.listener = heard
    a, b = pool.allocate(2)
    pool.register(a, 10, None, [1, 2])
    pool.register(b, 10, None, [1, 2])  # the same hash again: first registration wins
    pool.free([a, b])
    pool.allocate(2)  # evicts the cached block
    assert heard.events == [("stored", 10, None, [1, 2]), ("removed", 10, None, [])]
