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
- :class:`Profiler` samples a process with ``py-spy`` over a window (py-spy is not a project
  dependency: install it in a venv of your own, outside the checkout, and put it on ``PATH``).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynamo_llm.testing.process import ServerProcess

CLK_TCK = os.sysconf("SC_CLK_TCK")
AVAILABLE_CPUS = frozenset(os.sched_getaffinity(0))
"""The cores this process could use when it started (before any :func:`pin_self`)."""


def start_server(
    args: Sequence[str],
    cpu: int,
    ready_within: float = 60.0,
    *,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """``python -m dynamo_llm *args`` pinned to ``cpu`` (``env``: the child's environment);
    returns once it accepts connections."""
    check_cores(cpu)
    server = ServerProcess(args, cpus={cpu}, env=env)
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


class Profiler:
    """``py-spy record`` of process ``pid`` for ``duration`` seconds, in collapsed stacks.

    Python frames only and non-blocking by default (the target is not paused); ``native`` takes
    native frames too, pausing the target at each sample, so its proportions are skewed towards
    system calls. :meth:`finish` waits for py-spy and summarises the profile.
    """

    def __init__(
        self, pid: int, path: str, *, duration: float, rate: int = 250, native: bool = False
    ) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(exe).exists():
            raise RuntimeError("py-spy is not installed (pip install py-spy, in a venv of yours)")
        cmd = [
            exe,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(duration))),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            path,
            "--native" if native else "--nonblocking",
        ]
        self.path = path
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finish(self) -> dict[str, Any] | None:
        try:
            _, err = self._proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            _, err = self._proc.communicate()
        if self._proc.returncode != 0:
            print(
                f"warning: py-spy exited {self._proc.returncode}: {err.decode()[-500:]}",
                file=sys.stderr,
            )
        return summarise_collapsed(Path(self.path))


def _function(frame: str) -> str:
    """``"f (path/x.py:12)"`` -> ``"f (path/x.py)"``: one entry per function, lines merged."""
    head, sep, rest = frame.rpartition(":")
    return head + ")" if sep and rest.rstrip(")").isdigit() else frame


def summarise_collapsed(path: Path, top: int = 20) -> dict[str, Any] | None:
    """Own-time (leaf frame) and inclusive totals from py-spy's collapsed-stack output."""
    if not path.exists():
        return None
    own: Counter[str] = Counter()
    own_fn: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_s)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        own_fn[_function(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return None
    return {
        "samples": total,
        "file": str(path),
        "own": [(f, round(100 * c / total, 1)) for f, c in own.most_common(top)],
        "own_by_function": [(f, round(100 * c / total, 1)) for f, c in own_fn.most_common(top)],
        "inclusive": [(f, round(100 * c / total, 1)) for f, c in inclusive.most_common(top)],
    }


def print_profile(profile: dict[str, Any] | None, top: int = 20) -> None:
    """The top frames of a :func:`summarise_collapsed` summary, by own time and inclusive."""
    if profile is None:
        print("profile: no samples")
        return
    print(f"profile: {profile['samples']} samples in {profile['file']}")
    for title in ("own_by_function", "inclusive"):
        print(f"  {title.replace('_', ' ')}:")
        for frame, pct in profile[title][:top]:
            print(f"    {pct:5.1f} %  {frame}")
