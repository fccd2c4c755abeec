"""Lock-free metric families, exposed through prometheus_client.

Every update happens on the event loop thread, so these need no lock, and an update on the
per-token path is a few attribute operations instead of prometheus_client's locked ``observe()``
(about ten times cheaper, and a 100-token stream makes about 300 of them). Exposition still goes
through prometheus_client: :class:`FamiliesCollector` is a collector over any set of
:class:`Family` objects, registered on a ``CollectorRegistry``, and ``/metrics`` is that
registry's text.

Two kinds of family:

- :class:`Counter`, :class:`Gauge` and :class:`Histogram` hold values that requests update as
  they run: ``family.labels(*values)`` returns the child for one label-value tuple (created on
  first use; callers on hot paths keep the child), ``family.remove(*values)`` drops it.
- A direct subclass of :class:`Family` computes its samples when scraped (the mocker's scheduler
  gauges read an engine snapshot this way), so it costs nothing between scrapes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import ClassVar, Generic, TypeVar

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

# --- children: one labelled series each ----------------------------------------------------


class _Value:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class CounterChild(_Value):
    """One counter series; ``value`` only goes up (through :meth:`inc`)."""

    __slots__ = ()


class GaugeChild(_Value):
    """One gauge series; ``value`` goes up and down."""

    __slots__ = ()

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class HistogramChild:
    """One histogram series: a count per bucket (the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """Record ``value`` ``times`` times (inter-token latency observes Δt/n n times).

        :meth:`~.record.RequestRecord.on_tokens` does the same two lines inline on the per-token
        path: change them together."""
        self.counts[bisect_left(self.bounds, value)] += times
        self.sum += value * times

    @property
    def count(self) -> int:
        return sum(self.counts)


# --- families ------------------------------------------------------------------------------


class Family(ABC):
    """One metric family on ``/metrics``: a name, its help text, its label names.

    :meth:`collect` renders the family's current samples as a prometheus_client ``Metric``; it
    runs on every scrape. Subclass :class:`Family` directly for samples computed at scrape time
    and hand the object to ``Metrics.add_family``; use :class:`Counter`, :class:`Gauge` or
    :class:`Histogram` for values updated as requests run.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)

    @abstractmethod
    def collect(self) -> Metric:
        """The family's samples as they are now."""


ChildT = TypeVar("ChildT")


class LabelledFamily(Family, Generic[ChildT]):
    """A family whose series are children, one per label-value tuple, created on first use."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        self.children: dict[tuple[str, ...], ChildT] = {}

    @abstractmethod
    def _new_child(self) -> ChildT: ...

    def labels(self, *values: str) -> ChildT:
        """The child for ``values`` (one per label name, in order)."""
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self.children[values] = self._new_child()
        return child

    def remove(self, *values: str) -> None:
        """Drop the series for ``values``, if it exists (a worker that left, say)."""
        self.children.pop(values, None)


ValueT = TypeVar("ValueT", bound=_Value)


class _ValueFamily(LabelledFamily[ValueT]):
    _exposed_as: ClassVar[type[CounterMetricFamily] | type[GaugeMetricFamily]]

    def collect(self) -> Metric:
        family = self._exposed_as(self.name, self.documentation, labels=self.labelnames)
        for values, child in self.children.items():
            family.add_metric(list(values), child.value)
        return family


class Counter(_ValueFamily[CounterChild]):
    """A labelled counter (exposed with prometheus_client's ``_total`` naming)."""

    _exposed_as = CounterMetricFamily

    def _new_child(self) -> CounterChild:
        return CounterChild()


class Gauge(_ValueFamily[GaugeChild]):
    """A labelled gauge."""

    _exposed_as = GaugeMetricFamily

    def _new_child(self) -> GaugeChild:
        return GaugeChild()


class Histogram(LabelledFamily[HistogramChild]):
    """A labelled histogram over fixed ``buckets`` (upper bounds; +Inf is implied)."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: list[float]
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.bounds = [b for b in buckets if not math.isinf(b)]

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self.children.items():
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, n in zip([*self.bounds, math.inf], child.counts, strict=True):
                cumulative += n
                buckets.append((_fmt_bound(bound), cumulative))
            family.add_metric(list(values), buckets, child.sum)
        return family


def _fmt_bound(bound: float) -> str:
    if math.isinf(bound):
        return "+Inf"
    return repr(float(bound))


class FamiliesCollector(Collector):
    """A prometheus_client collector over whatever ``families()`` returns at scrape time."""

    def __init__(self, families: Callable[[], Iterable[Family]]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for family in self._families():
            yield family.collect()
