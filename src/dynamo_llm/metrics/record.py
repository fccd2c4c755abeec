"""The outcome record of one request: exactly-once accounting (SPEC §5).

:class:`RequestRecord` is the exactly-once outcome guard (Dynamo's ``InflightGuard``): created
when a handler accepts a request, it starts as :attr:`Outcome.INTERNAL` and must be marked;
``admit()`` takes the in-flight and queued gauges; ``release()`` settles everything and is called
in exactly one place, the handler's ``finally``. A second ``release()`` is a no-op.

:class:`Outcome` is how a request ended. Its value is the ``requests_total{error_type}`` label
exactly as it goes on the wire (``""`` for success), and :attr:`Outcome.status` the
``status`` label, so a record can never say ``success`` with an error type. It is a ``StrEnum``:
the errors carry one as their ``error_type``, and the label strings still compare equal.

The record measures time with whatever :class:`TimeSource` it is given (the runtime's clock is
one), so this package imports nothing else of ours.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from enum import StrEnum
from typing import Literal, Protocol

from .families import Counter, Gauge, Histogram

log = logging.getLogger("dynamo_llm.metrics")

UNKNOWN_MODEL = "unknown_model"
"""The ``model`` label of a request for a model not served (or whose body did not parse)."""


class Outcome(StrEnum):
    """How a request ended; the value is its ``requests_total{error_type}`` label."""

    SUCCESS = ""
    VALIDATION = "validation"  # 400/413/415/422 request problems
    NOT_FOUND = "not_found"  # unknown model or route
    UNAUTHORIZED = "unauthorized"  # 401: a missing or wrong API key
    OVERLOAD = "overload"  # 429, or 503 because every worker is busy
    UNAVAILABLE = "unavailable"  # 503 because no worker can serve the model
    CANCELLED = "cancelled"  # the client went away
    SLOW_CLIENT = "slow_client"  # the client stopped reading its stream
    RESPONSE_TIMEOUT = "response_timeout"  # inactivity / first-token / total timeout
    NOT_IMPLEMENTED = "not_implemented"  # 501
    INTERNAL = "internal"  # anything else

    @property
    def status(self) -> Literal["success", "error"]:
        """The ``requests_total{status}`` label."""
        return "success" if self is Outcome.SUCCESS else "error"


class TimeSource(Protocol):
    """Monotonic seconds (``runtime.clock.Clock`` is one)."""

    def now(self) -> float: ...


class UsageCounts(Protocol):
    """A request's final token counts as the engine reports them (None: not known)."""

    @property
    def prompt_tokens(self) -> int | None: ...
    @property
    def completion_tokens(self) -> int | None: ...


class RequestMetrics(Protocol):
    """The families a record updates (the frontend's ``Metrics`` has them all)."""

    requests_total: Counter
    requests_started_total: Counter
    inflight_requests: Gauge
    queued_requests: Gauge
    request_duration_seconds: Histogram
    time_to_first_token_seconds: Histogram
    inter_token_latency_seconds: Histogram
    input_sequence_tokens: Histogram
    output_sequence_tokens: Histogram
    output_tokens_total: Counter


class RequestRecord:
    """The outcome guard of one request: counted exactly once, released in one place."""

    __slots__ = (
        "_itl",
        "_last_token_at",
        "_metrics",
        "_now",
        "_output_tokens",
        "_queued",
        "_released",
        "admitted",
        "endpoint",
        "first_token_at",
        "model",
        "outcome",
        "output_tokens",
        "prompt_tokens",
        "request_type",
        "started_at",
    )

    def __init__(self, metrics: RequestMetrics, endpoint: str, clock: TimeSource) -> None:
        self._metrics = metrics
        self._now = clock.now
        self.endpoint = endpoint
        self.model = UNKNOWN_MODEL
        self.request_type = "unary"
        self.outcome = Outcome.INTERNAL
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
        self.outcome = Outcome.SUCCESS

    def mark_error(self, outcome: Outcome | str) -> None:
        """The request is failing with ``outcome`` (a label string is accepted for it too)."""
        # A member as is: Outcome(member) still goes through the enum's metaclass call.
        self.outcome = outcome if type(outcome) is Outcome else Outcome(outcome)

    def on_tokens(
        self, num_tokens: int, prompt_tokens: int | None, now: float | None = None
    ) -> None:
        """An item carrying ``num_tokens`` tokens reached the client path (at ``now``)."""
        if num_tokens <= 0:
            return
        if now is None:
            now = self._now()
        if self.first_token_at is not None:
            # The per-token path: children looked up once, at admission, and the inter-token
            # latency's HistogramChild.observe inlined (a Python call fewer per item).
            itl = self._itl
            gap = (now - self._last_token_at) / num_tokens
            itl.counts[bisect_left(itl.bounds, gap)] += num_tokens
            itl.sum += gap * num_tokens
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
        if num_tokens > 1:
            # The first item's other tokens came with the first one: no latency between them.
            self._itl.observe(0.0, num_tokens - 1)
        if prompt_tokens is not None:
            self.prompt_tokens = prompt_tokens
            m.input_sequence_tokens.labels(self.model).observe(prompt_tokens)
        self._last_token_at = now
        self.output_tokens += num_tokens
        m.output_tokens_total.labels(self.model).inc(num_tokens)

    def on_usage(self, usage: UsageCounts) -> None:
        """The request's final usage: what the items could not say exactly is taken from it.

        A relayed stream's items are events, and one event may carry several tokens (vLLM packs
        them): each event counted one token, a lower bound. The engine's completion count
        corrects ``output_tokens_total`` (and the output length) at the end; the tokens it adds
        arrived inside events already observed, with no latency of their own, so they are
        observed as inter-token latency 0 (the count and the sum of the histogram are then both
        exact). A count above the engine's cannot be taken back from a counter; it is logged.
        The prompt's size, when no item carried it (a worker reports it only in its usage), is
        recorded here.
        """
        m = self._metrics
        prompt = usage.prompt_tokens
        if prompt is not None and self.prompt_tokens is None:
            self.prompt_tokens = prompt
            m.input_sequence_tokens.labels(self.model).observe(prompt)
        completion = usage.completion_tokens
        if completion is None or completion == self.output_tokens:
            return
        missing = completion - self.output_tokens
        if missing < 0:
            log.debug(
                "%s %s: %d tokens counted, the engine reports %d",
                self.endpoint,
                self.model,
                self.output_tokens,
                completion,
            )
        elif self.first_token_at is not None:
            self._itl.observe(0.0, missing)
            self._output_tokens.value += missing
        else:
            m.output_tokens_total.labels(self.model).inc(missing)
        self.output_tokens = completion

    def release(self) -> None:
        """Settle the request: counted once, gauges given back. Idempotent."""
        if self._released:
            return
        self._released = True
        m = self._metrics
        outcome = self.outcome
        m.requests_total.labels(
            self.model, self.endpoint, self.request_type, outcome.status, outcome.value
        ).inc()
        if self.admitted:
            if self._queued:
                self._queued = False
                m.queued_requests.labels(self.model).dec()
            m.inflight_requests.labels(self.model).dec()
            m.request_duration_seconds.labels(self.model).observe(self._now() - self.started_at)
            if self.output_tokens > 0:
                m.output_sequence_tokens.labels(self.model).observe(self.output_tokens)
        if outcome is Outcome.SUCCESS:
            log.debug("request completed: %s %s", self.endpoint, self.model)
