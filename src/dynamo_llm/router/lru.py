"""Least-recently-used order in a plain ``dict``, which the garbage collector never walks.

The KV indexes hold up to 100 000 blocks per worker, ten million for a hundred workers. An
``OrderedDict`` is a container the collector tracks whatever it holds, and each collection that
reaches its generation visits every entry: measured (``bench/bench_kv_index.py``), about 50 ms
per million entries, so a full collection of a 10M-block index paused the event loop for about
half a second. A plain ``dict`` whose keys and values are ints or bytes is not tracked at all
(CPython untracks a dict of atomic values, and a new dict starts untracked), so the indexes
keep their entries in plain dicts:

- insertion order is the recency order: :func:`touch` moves a key to the end (pop and
  re-insert, as ``move_to_end``);
- :func:`trim_oldest` drops the oldest entries past a bound, a few percent below it at once
  (``bound // 32``), because finding the oldest entry scans past the holes earlier deletions
  left at the front of the dict's table: one scan per batch keeps that amortised.
"""

from __future__ import annotations

from itertools import islice
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def touch(mapping: dict[K, V], key: K, value: V) -> None:
    """Set ``mapping[key] = value`` as its most recent entry."""
    mapping.pop(key, None)
    mapping[key] = value


def trim_oldest(mapping: dict[K, V], bound: int) -> list[tuple[K, V]]:
    """Drop the oldest entries once there are more than ``bound``, down to ``bound`` less a
    ``bound // 32`` slack; the dropped pairs, oldest first."""
    excess = len(mapping) - bound
    if excess <= 0:
        return []
    oldest = list(islice(mapping, excess + bound // 32))
    return [(key, mapping.pop(key)) for key in oldest]
