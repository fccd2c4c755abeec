"""Prometheus metrics of the frontend (SPEC §5-§6).

The metric objects here are single-threaded: every update happens on the event loop thread, so
they need no lock, and an update on the per-token path is a few attribute operations instead of
prometheus_client's locked ``observe()`` (about ten times cheaper, and a 100-token stream makes
about 300 of them). Exposition still goes through prometheus_client: :class:`Metrics` registers a
collector on a ``CollectorRegistry`` owned by the app, and ``/metrics`` is that registry's text.

:class:`RequestRecord` is the exactly-once outcome guard (Dynamo's ``InflightGuard``): created
when a handler accepts a request, it starts as ``error/internal`` and must be marked; ``admit()``
takes the in-flight and queued gauges; ``release()`` settles everything and is called in exactly
one place, the handler's ``finally``. A second ``release()`` is a no-op.

The ``model`` label only ever holds a served model's canonical name or :data:`UNKNOWN_MODEL`,
so a client cannot create series with made-up names.
"""

from __future__ import annotations

import logging
import math
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .runtime.clock import Clock

log = logging.getLogger("dynamo_llm.metrics")

DEFAULT_PREFIX = "dynamo_frontend"
UNKNOWN_MODEL = "unknown_model"


def sanitize_prefix(prefix: str | None) -> str:
    """``DYN_METRICS_PREFIX`` made a valid metric name prefix (Dynamo's rule)."""
    if not prefix:
        return DEFAULT_PREFIX
    cleaned = re.sub(r"[^a-zA-Z0-9_:]", "_", prefix)
    if cleaned.strip("_") == "":
        return DEFAULT_PREFIX
    if not (cleaned[0].isalpha() or cleaned[0] in "_:"):
        cleaned = "_" + cleaned
    return cleaned


def _round_2sf(x: float) -> float:
    """Round to 2 significant figures, half away from zero (Rust's ``f64::round``)."""
    if x == 0:
        return 0.0
    magnitude = math.floor(math.log10(abs(x)))
    scale = 10 ** (1 - magnitude)
    return math.copysign(math.floor(abs(x) * scale + 0.5) / scale, x)


def log_buckets(low: float, high: float, count: int) -> list[float]:
    """0, then ``count-1`` log-spaced points from ``low`` to ``high`` rounded to 2 s.f., deduped."""
    out = [0.0]
    for i in range(1, count):
        value = _round_2sf(
            math.exp(math.log(low) + (math.log(high) - math.log(low)) * i / (count - 1))
        )
        if value != out[-1]:
            out.append(value)
    return out


DURATION_BUCKETS = log_buckets(1, 512, 10)
ISL_BUCKETS = log_buckets(50, 128000, 12)
OSL_BUCKETS = log_buckets(50, 32000, 10)
TTFT_BUCKETS = log_buckets(0.001, 480, 18)
ITL_BUCKETS = log_buckets(0.001, 2, 13)
LOOP_DELAY_BUCKETS = [0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]


# --- lock-free metric families -------------------------------------------------------------


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class GaugeChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += times
        self.sum += value * times

    @property
    def count(self) -> int:
        return sum(self.counts)


class _Family:
    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.children: dict[tuple[str, ...], Any] = {}

    def _new_child(self) -> Any:
        raise NotImplementedError

    def collect(self) -> Metric:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self.children[values] = self._new_child()
        return child

    def remove(self, *values: str) -> None:
        self.children.pop(values, None)


class Counter(_Family):
    def _new_child(self) -> CounterChild:
        return CounterChild()

    def labels(self, *values: str) -> CounterChild:
        child: CounterChild = super().labels(*values)
        return child

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self.children.items():
            family.add_metric(list(values), child.value)
        return family


class Gauge(_Family):
    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def labels(self, *values: str) -> GaugeChild:
        child: GaugeChild = super().labels(*values)
        return child

    def collect(self) -> Metric:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self.children.items():
            family.add_metric(list(values), child.value)
        return family


class Histogram(_Family):
    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: list[float]
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.bounds = [b for b in buckets if not math.isinf(b)]

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def labels(self, *values: str) -> HistogramChild:
        child: HistogramChild = super().labels(*values)
        return child

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


class _FamiliesCollector(Collector):
    def __init__(self, families: Callable[[], Iterable[_Family]]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for family in self._families():
            yield family.collect()


# --- the frontend's metric set -------------------------------------------------------------


class Metrics:
    """Every frontend metric of SPEC §6, registered on ``registry``."""

    def __init__(
        self, registry: CollectorRegistry | None = None, prefix: str | None = None
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.prefix = p = sanitize_prefix(prefix)
        model = ("model",)
        cancel_labels = ("model", "endpoint", "request_type")
        self.requests_total = Counter(
            f"{p}_requests_total",
            "Requests that reached a handler, counted once at their end",
            ("model", "endpoint", "request_type", "status", "error_type"),
        )
        self.requests_started_total = Counter(
            f"{p}_requests_started_total", "Requests accepted by a handler", cancel_labels
        )
        self.inflight_requests = Gauge(f"{p}_inflight_requests", "Requests in flight", model)
        self.queued_requests = Gauge(
            f"{p}_queued_requests", "Requests admitted that have not produced a token yet", model
        )
        # A gauge that only ever goes up, as in Dynamo: a counter would be exposed as
        # ``..._disconnected_clients_total`` and break dashboards built on Dynamo's name.
        self.disconnected_clients = Gauge(
            f"{p}_disconnected_clients", "Clients that went away before the response was complete"
        )
        self.model_cancellation_total = Counter(
            f"{p}_model_cancellation_total",
            "Requests cancelled because the client went away",
            cancel_labels,
        )
        self.request_duration_seconds = Histogram(
            f"{p}_request_duration_seconds", "Request duration", model, DURATION_BUCKETS
        )
        self.time_to_first_token_seconds = Histogram(
            f"{p}_time_to_first_token_seconds", "Time to the first token", model, TTFT_BUCKETS
        )
        self.inter_token_latency_seconds = Histogram(
            f"{p}_inter_token_latency_seconds", "Time between tokens", model, ITL_BUCKETS
        )
        self.input_sequence_tokens = Histogram(
            f"{p}_input_sequence_tokens", "Prompt length in tokens", model, ISL_BUCKETS
        )
        self.output_sequence_tokens = Histogram(
            f"{p}_output_sequence_tokens", "Output length in tokens", model, OSL_BUCKETS
        )
        self.output_tokens_total = Counter(f"{p}_output_tokens_total", "Tokens generated", model)
        self.model_migration_total = Counter(
            f"{p}_model_migration_total", "Migrations attempted", ("model", "migration_type")
        )
        self.model_rejection_total = Counter(
            f"{p}_model_rejection_total",
            "Requests rejected because every worker was busy",
            ("model", "endpoint"),
        )
        self.worker_inflight_requests = Gauge(
            f"{p}_worker_inflight_requests", "Requests in flight per worker", ("worker",)
        )
        self.worker_quarantined = Gauge(
            f"{p}_worker_quarantined", "1 while the worker is quarantined", ("worker",)
        )
        self.worker_time_to_first_token_seconds = Histogram(
            f"{p}_worker_time_to_first_token_seconds",
            "Time to the first token, per worker",
            ("worker",),
            TTFT_BUCKETS,
        )
        self.model_ready = Gauge(
            f"{p}_model_ready", "1 while at least one worker can take a request", model
        )
        self.event_loop_delay_seconds = Histogram(
            f"{p}_event_loop_delay_seconds",
            "How late a 10 ms canary sleep woke up",
            (),
            LOOP_DELAY_BUCKETS,
        )
        self.event_loop_stall_total = Counter(
            f"{p}_event_loop_stall_total", "Canary wake-ups more than 5 ms late"
        )
        self._families: list[_Family] = [v for v in vars(self).values() if isinstance(v, _Family)]
        self.registry.register(_FamiliesCollector(lambda: self._families))

    def add_family(self, family: _Family) -> None:
        """Expose another family (engines and routers add their own)."""
        self._families.append(family)

    def begin(self, endpoint: str, clock: Clock) -> RequestRecord:
        return RequestRecord(self, endpoint, clock)

    async def run_event_loop_canary(self, clock: Clock, interval: float = 0.010) -> None:
        """Sleep ``interval`` forever and record how late each wake-up was."""
        delay = self.event_loop_delay_seconds.labels()
        stalls = self.event_loop_stall_total.labels()
        while True:
            before = clock.now()
            await clock.sleep(interval)
            late = max(0.0, clock.now() - before - interval)
            delay.observe(late)
            if late > 0.005:
                stalls.inc()


class RequestRecord:
    """The outcome guard of one request: counted exactly once, released in one place."""

    __slots__ = (
        "_clock",
        "_itl",
        "_last_token_at",
        "_metrics",
        "_output_tokens",
        "_queued",
        "_released",
        "admitted",
        "endpoint",
        "error_type",
        "first_token_at",
        "model",
        "output_tokens",
        "prompt_tokens",
        "request_type",
        "started_at",
        "status",
    )

    def __init__(self, metrics: Metrics, endpoint: str, clock: Clock) -> None:
        self._metrics = metrics
        self._clock = clock
        self.endpoint = endpoint
        self.model = UNKNOWN_MODEL
        self.request_type = "unary"
        self.status = "error"
        self.error_type = "internal"
        self.started_at = clock.now()
        self.admitted = False
        self._queued = False
        self._released = False
        self.first_token_at: float | None = None
        self._last_token_at = 0.0
        self.output_tokens = 0
        self.prompt_tokens: int | None = None

    def admit(self, model: str) -> None:
        """The request passed validation and found its model: it is now in flight."""
        m = self._metrics
        self.model = model
        self.admitted = True
        self._queued = True
        m.inflight_requests.labels(model).inc()
        m.queued_requests.labels(model).inc()
        m.requests_started_total.labels(model, self.endpoint, self.request_type).inc()
        self._itl = m.inter_token_latency_seconds.labels(model)
        self._output_tokens = m.output_tokens_total.labels(model)

    def mark_ok(self) -> None:
        self.status = "success"
        self.error_type = ""

    def mark_error(self, error_type: str) -> None:
        self.status = "error"
        self.error_type = error_type

    def on_tokens(
        self, num_tokens: int, prompt_tokens: int | None, now: float | None = None
    ) -> None:
        """An item carrying ``num_tokens`` tokens reached the client path (at ``now``)."""
        if num_tokens <= 0:
            return
        if now is None:
            now = self._clock.now()
        if self.first_token_at is not None:
            # The per-token path: children looked up once, at admission.
            self._itl.observe((now - self._last_token_at) / num_tokens, num_tokens)
            self._last_token_at = now
            self.output_tokens += num_tokens
            self._output_tokens.value += num_tokens
            return
        m = self._metrics
        self.first_token_at = now
        if self._queued:
            self._queued = False
            m.queued_requests.labels(self.model).dec()
        m.time_to_first_token_seconds.labels(self.model).observe(now - self.started_at)
        if prompt_tokens is not None:
            self.prompt_tokens = prompt_tokens
            m.input_sequence_tokens.labels(self.model).observe(prompt_tokens)
        self._last_token_at = now
        self.output_tokens += num_tokens
        m.output_tokens_total.labels(self.model).inc(num_tokens)

    def release(self) -> None:
        """Settle the request: counted once, gauges given back. Idempotent."""
        if self._released:
            return
        self._released = True
        m = self._metrics
        m.requests_total.labels(
            self.model, self.endpoint, self.request_type, self.status, self.error_type
        ).inc()
        if self.admitted:
            if self._queued:
                self._queued = False
                m.queued_requests.labels(self.model).dec()
            m.inflight_requests.labels(self.model).dec()
            m.request_duration_seconds.labels(self.model).observe(
                self._clock.now() - self.started_at
            )
            if self.output_tokens > 0:
                m.output_sequence_tokens.labels(self.model).observe(self.output_tokens)
        if self.status == "success":
            log.debug("request completed: %s %s", self.endpoint, self.model)
