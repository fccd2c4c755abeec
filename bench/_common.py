"""Helpers the benchmarks share: a pinned server process, CPU accounting, percentiles.

Import it from a script in ``bench/`` as ``import _common`` (the script's directory is on
``sys.path`` when it is run as ``python bench/<script>.py``).

- :func:`start_server` runs ``python -m dynamo_llm <args>`` pinned to one core, through
  :class:`dynamo_llm.testing.process.ServerProcess`, and returns once its readiness line names
  the URL (``--http-port 0`` is fine: the port is read, never guessed).
- :func:`pin_self` moves the load generator to another core, so the two never compete.
- :func:`proc_cpu_seconds` / :func:`self_cpu_seconds` read CPU time (user + system, every thread)
  at the edges of a measured window; :func:`core_ticks` / :func:`core_usage` say how busy each
  core was over it, all processes included (a noisy neighbour shows there).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
from collections.abc import Sequence

from dynamo_llm.testing.process import ServerProcess

CLK_TCK = os.sysconf("SC_CLK_TCK")
AVAILABLE_CPUS = frozenset(os.sched_getaffinity(0))
"""The cores this process could use when it started (before any :func:`pin_self`)."""


def start_server(args: Sequence[str], cpu: int, ready_within: float = 60.0) -> ServerProcess:
    """``python -m dynamo_llm *args`` pinned to ``cpu``; returns once it accepts connections."""
    check_cores(cpu)
    server = ServerProcess(args, cpus={cpu})
    try:
        server.wait_ready(ready_within)
    except BaseException:
        server.stop()
        raise
    got = os.sched_getaffinity(server.pid)
    if got != {cpu}:
        server.stop()
        raise RuntimeError(f"the server's affinity is {sorted(got)}, not [{cpu}]")
    return server


def check_cores(*cpus: int) -> None:
    missing = [c for c in cpus if c not in AVAILABLE_CPUS]
    if missing:
        raise SystemExit(f"cores {missing} are not available here (have {sorted(AVAILABLE_CPUS)})")


def pin_self(cpu: int) -> None:
    """Pin this process's main thread, and every thread it starts from now on, to ``cpu``."""
    check_cores(cpu)
    os.sched_setaffinity(0, {cpu})


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of every thread of process ``pid`` (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = data[data.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLK_TCK


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def core_ticks() -> dict[int, tuple[int, int, int]]:
    """Per core: (busy, steal, total) clock ticks since boot, from ``/proc/stat``."""
    out: dict[int, tuple[int, int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            v = [int(x) for x in values]
            idle = v[3] + v[4]  # idle + iowait
            steal = v[7] if len(v) > 7 else 0
            total = sum(v[:8])
            out[int(name[3:])] = (total - idle - steal, steal, total)
    return out


def core_usage(
    before: dict[int, tuple[int, int, int]], after: dict[int, tuple[int, int, int]], cpu: int
) -> tuple[float, float]:
    """(busy %, steal %) of ``cpu`` between two :func:`core_ticks` readings."""
    b0, s0, t0 = before[cpu]
    b1, s1, t1 = after[cpu]
    span = max(1, t1 - t0)
    return 100 * (b1 - b0) / span, 100 * (s1 - s0) / span


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
