"""The mocker's scheduler state as Prometheus metrics, read when ``/metrics`` is scraped.

Nothing here runs on the per-token path: each family reads the engines' :class:`MockerSnapshot`
(a handful of ``len()`` calls and counters, O(1)) at collection time, so a scrape costs the same
whatever the load, and a request costs nothing extra. Every sample carries the ``model`` label
of the engine it describes; the names share one fixed prefix (default ``dynamo_mocker``),
independent of the frontend's ``DYN_METRICS_PREFIX``, so dashboards find a worker's scheduler
the same way behind any frontend.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ...metrics import Family, Metrics
from .scheduler import MockerSnapshot

PREFIX = "dynamo_mocker"

_Reader = Callable[[MockerSnapshot], float]

_GAUGES: tuple[tuple[str, str, _Reader], ...] = (
    ("running_requests", "Requests in the simulated running batch", lambda s: s.running),
    ("waiting_requests", "Requests queued for admission to the batch", lambda s: s.waiting),
    ("kv_blocks_used", "KV cache blocks in use", lambda s: s.kv_blocks_used),
    ("kv_blocks_total", "KV cache blocks in the pool", lambda s: s.kv_blocks_total),
    ("kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1)", lambda s: s.kv_usage),
    (
        "prefix_cache_hit_rate",
        "Fraction of looked-up prompt tokens found in the prefix cache, over the engine's life",
        lambda s: s.prefix_cache_hit_rate,
    ),
)
_COUNTERS: tuple[tuple[str, str, _Reader], ...] = (
    # vLLM's prefix_cache_queries / prefix_cache_hits, in tokens: a ratio of sums over any
    # window (or any set of workers) is a hit rate, which the lifetime gauge above is not.
    (
        "prefix_cache_queries_total",
        "Prompt tokens looked up in the prefix cache at admission (readmissions included)",
        lambda s: s.prefix_cache_queried_tokens,
    ),
    (
        "prefix_cache_hits_total",
        "Looked-up prompt tokens found in the prefix cache",
        lambda s: s.prefix_cache_hit_tokens,
    ),
    (
        "preemptions_total",
        "Requests preempted for lack of KV blocks",
        lambda s: s.preemptions_total,
    ),
    (
        "cancelled_requests_total",
        "Requests stopped or killed before they finished",
        lambda s: s.cancelled_total,
    ),
    ("finished_requests_total", "Requests that ran to completion", lambda s: s.finished_total),
    ("passes_total", "Scheduler passes (simulated forward steps) run", lambda s: s.passes_total),
)


class _SnapshotFamily(Family):
    """One metric, one sample per watched engine, computed from its snapshot at scrape time."""

    def __init__(
        self,
        name: str,
        documentation: str,
        read: _Reader,
        engines: dict[str, Callable[[], MockerSnapshot]],
        *,
        counter: bool,
    ) -> None:
        super().__init__(name, documentation, ("model",))
        self._read = read
        self._engines = engines
        self._counter = counter

    def collect(self) -> Metric:
        family: CounterMetricFamily | GaugeMetricFamily
        if self._counter:
            family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        else:
            family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for model, snapshot in self._engines.items():
            family.add_metric([model], float(self._read(snapshot())))
        return family


class MockerMetrics:
    """The ``dynamo_mocker_*`` families for every mocker a process serves.

    ``register(metrics)`` once, then ``watch(model, engine.snapshot)`` for each mocker.
    """

    def __init__(self, prefix: str = PREFIX) -> None:
        self._engines: dict[str, Callable[[], MockerSnapshot]] = {}
        self.families: list[Family] = []
        self.families += [
            _SnapshotFamily(f"{prefix}_{name}", doc, read, self._engines, counter=False)
            for name, doc, read in _GAUGES
        ]
        self.families += [
            _SnapshotFamily(f"{prefix}_{name}", doc, read, self._engines, counter=True)
            for name, doc, read in _COUNTERS
        ]

    def register(self, metrics: Metrics) -> None:
        for family in self.families:
            metrics.add_family(family)

    def watch(self, model: str, snapshot: Callable[[], MockerSnapshot]) -> None:
        self._engines[model] = snapshot
