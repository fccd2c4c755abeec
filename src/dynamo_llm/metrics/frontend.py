"""The frontend's metric set (SPEC §6): every family, its prefix and its buckets.

:class:`Metrics` builds every frontend family under one prefix (``DYN_METRICS_PREFIX``, made a
valid name by :func:`sanitize_prefix`), registers a collector for them on a
``CollectorRegistry`` owned by the app, and ``/metrics`` is that registry's text. Engines and
routers expose their own families through :meth:`Metrics.add_family`. ``begin()`` opens the
outcome record of one request (:mod:`.record`).

Histogram buckets are log-spaced (:func:`log_buckets`), with Dynamo's defaults.

The ``model`` label only ever holds a served model's canonical name or :data:`UNKNOWN_MODEL`,
so a client cannot create series with made-up names.
"""

from __future__ import annotations

import math
import re
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest

from .families import Counter, FamiliesCollector, Family, Gauge, Histogram
from .record import RequestRecord, TimeSource
from .shared import SharedMetrics

DEFAULT_PREFIX = "dynamo_frontend"
ENDPOINTS = ("chat_completions", "completions")
"""The endpoints whose series :meth:`Metrics.declare_model` makes (the ones served today)."""
REQUEST_TYPES = ("unary", "stream")
MIGRATION_TYPES = ("new_request", "ongoing_request")


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


# --- the frontend's metric set -------------------------------------------------------------


class SleepingTimeSource(TimeSource, Protocol):
    """Monotonic seconds and a sleep, for the event-loop canary (``runtime.clock.Clock`` is one)."""

    async def sleep(self, seconds: float) -> None: ...


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
        # What each worker's engine says of itself, read from its /metrics (issue 12).
        self.worker_engine_running_requests = Gauge(
            f"{p}_worker_engine_running_requests",
            "Requests the worker's engine reports running, at its last scrape",
            ("worker",),
        )
        self.worker_engine_queued_requests = Gauge(
            f"{p}_worker_engine_queued_requests",
            "Requests the worker's engine reports queued, at its last scrape",
            ("worker",),
        )
        self.worker_kv_usage = Gauge(
            f"{p}_worker_kv_usage",
            "Fraction of the worker's KV cache in use (0..1), at its last scrape",
            ("worker",),
        )
        self.worker_metrics_scrape_failures_total = Counter(
            f"{p}_worker_metrics_scrape_failures_total",
            "Scrapes of the worker's /metrics that failed",
            ("worker",),
        )
        # Precise KV routing (issue 13): the engines' KV events, and how well they predict.
        self.router_kv_mode = Gauge(
            f"{p}_router_kv_mode",
            "1 while the worker's KV events feed the kv router (precise), 0 when it guesses",
            ("worker",),
        )
        self.router_kv_events_total = Counter(
            f"{p}_router_kv_events_total",
            "KV cache events received from the worker",
            ("worker", "event"),
        )
        self.router_kv_event_gaps_total = Counter(
            f"{p}_router_kv_event_gaps_total",
            "Gaps in the worker's KV event sequence (missed batches)",
            ("worker",),
        )
        self.router_kv_event_silences_total = Counter(
            f"{p}_router_kv_event_silences_total",
            "Times the worker's KV event publisher fell silent and did not answer a replay "
            "request (the worker is routed approximately until it answers)",
            ("worker",),
        )
        self.router_kv_predicted_overlap_tokens = Histogram(
            f"{p}_router_kv_predicted_overlap_tokens",
            "Prompt tokens the chosen worker was predicted to have cached (precise mode)",
            (),
            ISL_BUCKETS,
        )
        self.router_kv_predicted_cached_tokens_total = Counter(
            f"{p}_router_kv_predicted_cached_tokens_total",
            "Prompt tokens predicted cached on the chosen worker (precise mode)",
        )
        self.router_kv_reported_cached_tokens_total = Counter(
            f"{p}_router_kv_reported_cached_tokens_total",
            "Prompt tokens the engine reported cached, for requests routed in precise mode",
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
        self._families: list[Family] = [v for v in vars(self).values() if isinstance(v, Family)]
        self.shared: SharedMetrics | None = None
        """Set by :meth:`share` when several processes serve one ``/metrics``."""
        self.registry.register(FamiliesCollector(lambda: self._families))
        # The unlabelled families have their one series from the start.
        self.disconnected_clients.labels()
        self.event_loop_stall_total.labels()
        self.router_kv_predicted_cached_tokens_total.labels()
        self.router_kv_reported_cached_tokens_total.labels()

    def forget_engine_load(self, worker: str) -> None:
        """Drop what ``worker``'s engine last reported (it reports nothing now, or it is gone)."""
        for family in (
            self.worker_engine_running_requests,
            self.worker_engine_queued_requests,
            self.worker_kv_usage,
        ):
            family.remove(worker)

    def declare_model(self, model: str) -> None:
        """Give every counter and gauge of ``model`` a sample at 0 before its first request.

        Dashboards and alerts (``rate()``, absence checks) need a series to exist from the
        start; a series that first appears at 1 hides that first event from ``rate()``. The
        success series of ``requests_total`` are made; error series appear when they happen.
        """
        self.inflight_requests.labels(model)
        self.queued_requests.labels(model)
        self.output_tokens_total.labels(model)
        for migration_type in MIGRATION_TYPES:
            self.model_migration_total.labels(model, migration_type)
        for endpoint in ENDPOINTS:
            self.model_rejection_total.labels(model, endpoint)
            for request_type in REQUEST_TYPES:
                self.requests_started_total.labels(model, endpoint, request_type)
                self.model_cancellation_total.labels(model, endpoint, request_type)
                self.requests_total.labels(model, endpoint, request_type, "success", "")

    def share(self, directory: str) -> None:
        """Expose the totals of every process writing to ``directory`` (``--num-workers``):
        this process's values are written there (:mod:`.shared`) and ``/metrics`` reads them
        all."""
        self.shared = SharedMetrics(
            directory,
            {
                self.model_ready.name: "livemax",
                self.worker_quarantined.name: "livemax",
                self.disconnected_clients.name: "sum",
            },
        )

    def render(self) -> bytes:
        """The ``/metrics`` text: this process's families, or every process's when shared."""
        if self.shared is None:
            return generate_latest(self.registry)
        self.publish()
        return generate_latest(self.shared.registry)

    def publish(self) -> None:
        """While shared, write this process's values now (before a scrape, before exiting)."""
        if self.shared is not None:
            self.shared.write(self._families)

    def close(self) -> None:
        """Write the last values and close the shared files (the app is closing)."""
        if self.shared is not None:
            self.shared.write(self._families)
            self.shared.close()

    async def run_sharing(self, clock: SleepingTimeSource) -> None:
        """While shared, write this process's values for the others to read, forever."""
        if self.shared is not None:
            await self.shared.run(lambda: self._families, clock)

    def add_family(self, family: Family) -> None:
        """Expose another family (engines and routers add their own)."""
        self._families.append(family)

    def begin(self, endpoint: str, clock: TimeSource) -> RequestRecord:
        """The outcome record of a request a handler has just accepted."""
        return RequestRecord(self, endpoint, clock)

    async def run_event_loop_canary(
        self, clock: SleepingTimeSource, interval: float = 0.010
    ) -> None:
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
