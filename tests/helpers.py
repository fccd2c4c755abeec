"""Helpers that tests of both tiers use (``unit/`` and ``system/``)."""

import os
from pathlib import Path

from dynamo_llm.router import Worker, WorkerSet


def registered(workers: WorkerSet, url: str) -> Worker:
    """The worker ``url`` of ``workers``; fails the test if it is not registered."""
    worker = workers.get(url)
    assert worker is not None, f"{url} is not registered"
    return worker


def write(path: Path, text: str) -> None:
    """Rewrite the file and move its mtime on by a second, whatever the file system's
    timestamp granularity, so that the change is visible to a reload."""
    stamp = path.stat().st_mtime if path.exists() else 1_000_000.0
    path.write_text(text)
    os.utime(path, (stamp + 1, stamp + 1))
