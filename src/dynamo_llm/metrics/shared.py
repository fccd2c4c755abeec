"""One ``/metrics`` for several processes: prometheus_client's multiprocess files.

With ``--num-workers N`` every frontend process keeps updating its own lock-free families (the
per-token path costs what it costs in one process), and :class:`SharedMetrics` copies their
values into this process's files in a directory the processes share, in prometheus_client's
multiprocess format (one ``MmapedDict`` per metric type and process id). Whichever process
answers a scrape reads every file with prometheus_client's ``MultiProcessCollector``:

- counters and histograms are summed over every process that ever ran, so a process that died
  keeps its requests in ``requests_total``;
- gauges are summed over the live processes (mode ``livesum``): the parent calls
  :func:`forget_process` when a process dies, which deletes its gauge files, so its in-flight
  requests leave with it. A 0/1 flag (``model_ready``, ``worker_quarantined``) takes the
  largest value instead (``livemax``), and ``disconnected_clients``, a gauge that only counts up,
  keeps a dead process's count (``sum``).

When the files are written: every :data:`SHARE_INTERVAL` (and just before this process answers
a scrape), only the values that changed. So a scrape answered by one process sees a request
another process finished at most about 50 ms later; a process's own requests, at once.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from .families import Family

log = logging.getLogger("dynamo_llm.metrics")

SHARE_INTERVAL = 0.05
"""Seconds between two writes of this process's values to the shared files."""
_TYPES = ("counter", "gauge", "histogram")


class Sleeper(Protocol):
    async def sleep(self, seconds: float) -> None: ...


class SharedMetrics:
    """This process's values in the shared directory, and the registry that reads them all."""

    def __init__(
        self,
        directory: str,
        gauge_modes: dict[str, str],
        pid: int | None = None,
    ) -> None:
        """``gauge_modes`` maps a gauge family's name to its multiprocess mode (else
        ``livesum``)."""
        self.directory = directory
        self.pid = os.getpid() if pid is None else pid
        self._gauge_modes = gauge_modes
        self._files: dict[str, MmapedDict] = {}
        self._keys: dict[tuple[str, str, tuple[tuple[str, str], ...]], str] = {}
        self._written: dict[str, float] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(self.registry, path=directory)  # type: ignore[no-untyped-call]

    def _file(self, kind: str) -> MmapedDict:
        f = self._files.get(kind)
        if f is None:
            path = os.path.join(self.directory, f"{kind}_{self.pid}.db")
            f = self._files[kind] = MmapedDict(path)  # type: ignore[no-untyped-call]
        return f

    def _key(self, metric: str, sample: str, labels: dict[str, str], help_text: str) -> str:
        ident = (metric, sample, tuple(sorted(labels.items())))
        key = self._keys.get(ident)
        if key is None:
            key = self._keys[ident] = mmap_key(
                metric, sample, list(labels), list(labels.values()), help_text
            )
        return key

    def write(self, families: Iterable[Family]) -> None:
        """Copy the families' current values into this process's files."""
        for family in families:
            metric = family.collect()
            if metric.type not in _TYPES:
                continue
            if metric.type == "gauge":
                kind = "gauge_" + self._gauge_modes.get(metric.name, "livesum")
            else:
                kind = metric.type
            f = None
            below: dict[tuple[tuple[str, str], ...], float] = {}
            for sample in metric.samples:
                name, labels, value = sample.name, sample.labels, sample.value
                if metric.type == "histogram":
                    if name.endswith("_count") or name.endswith("_created"):
                        continue  # the collector counts the buckets itself
                    if name.endswith("_bucket"):
                        # The files hold each bucket's own count; exposition is cumulative.
                        rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
                        cumulative = value
                        value = cumulative - below.get(rest, 0.0)
                        below[rest] = cumulative
                key = self._key(metric.name, name, labels, metric.documentation)
                if self._written.get(key) != value:
                    if f is None:
                        f = self._file(kind)
                    f.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]
                    self._written[key] = value

    async def run(self, families: Callable[[], Iterable[Family]], clock: Sleeper) -> None:
        """Write the families every :data:`SHARE_INTERVAL`, forever."""
        while True:
            self.write(families())
            await clock.sleep(SHARE_INTERVAL)

    def close(self) -> None:
        for f in self._files.values():
            f.close()  # type: ignore[no-untyped-call]
        self._files.clear()


def forget_process(directory: str, pid: int) -> None:
    """A process died: its live gauges leave the totals (its counters stay)."""
    for path in glob.glob(os.path.join(directory, f"gauge_live*_{pid}.db")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
