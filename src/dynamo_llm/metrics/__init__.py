"""Prometheus metrics: lock-free families, the frontend's set, the request outcome record.

- :mod:`.families`: :class:`Counter`, :class:`Gauge` and :class:`Histogram` (single-threaded,
  about ten times cheaper per update than prometheus_client's own), and :class:`Family`, the
  base a scrape-time family (the mocker's) subclasses.
- :mod:`.frontend`: :class:`Metrics`, every metric of SPEC §6 under one sanitised prefix, with
  log-spaced buckets; the event-loop canary records into it.
- :mod:`.record`: :class:`RequestRecord`, the exactly-once outcome guard of one request, and
  :class:`Outcome`, how a request ended (its ``status`` and ``error_type`` labels).
- :mod:`.shared`: one ``/metrics`` for the ``--num-workers`` processes (prometheus_client's
  multiprocess files, written from the families every 50 ms).

A leaf: nothing here imports another ``dynamo_llm`` module; time comes in as a
:class:`TimeSource`, which the runtime's clock satisfies.
"""

from .families import (
    Counter,
    CounterChild,
    Family,
    Gauge,
    GaugeChild,
    Histogram,
    HistogramChild,
    LabelledFamily,
)
from .frontend import (
    DEFAULT_PREFIX,
    DURATION_BUCKETS,
    ISL_BUCKETS,
    ITL_BUCKETS,
    LOOP_DELAY_BUCKETS,
    OSL_BUCKETS,
    TTFT_BUCKETS,
    Metrics,
    SleepingTimeSource,
    log_buckets,
    sanitize_prefix,
)
from .record import UNKNOWN_MODEL, Outcome, RequestMetrics, RequestRecord, TimeSource

__all__ = [
    "DEFAULT_PREFIX",
    "DURATION_BUCKETS",
    "ISL_BUCKETS",
    "ITL_BUCKETS",
    "LOOP_DELAY_BUCKETS",
    "OSL_BUCKETS",
    "TTFT_BUCKETS",
    "UNKNOWN_MODEL",
    "Counter",
    "CounterChild",
    "Family",
    "Gauge",
    "GaugeChild",
    "Histogram",
    "HistogramChild",
    "LabelledFamily",
    "Metrics",
    "Outcome",
    "RequestMetrics",
    "RequestRecord",
    "SleepingTimeSource",
    "TimeSource",
    "log_buckets",
    "sanitize_prefix",
]
