"""Fixtures of the real-engine suite: the tiny model, two instances of each engine, frontends.

Run by ``scripts/test-engines`` (the fast suite never collects this folder: see
``norecursedirs`` in pyproject.toml). A case asks for ``fleet`` and is run once per engine kind
(``llama-server``, ``llama-cpp-python``, ``vllm``), or only for some with ``clients.only``. The
pair of one kind is started once, when its first case runs, and stopped when the run moves on
to the next kind (pytest groups the cases by the session-scoped parameter), so only one kind's
processes hold the CPU at a time. Cases marked ``destructive`` (they SIGKILL or SIGSTOP an
engine) run last within their kind, and the next case restarts whatever they left dead.

Logs: every engine's and frontend's output goes to ``DYN_ENGINES_LOG_DIR`` (default a pytest
temporary folder, printed at the end of the run).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engines.clients import close_clients, close_streams
from tests.engines.harness import FINDINGS, KINDS, VLLM_KV, Engine, Pair
from tests.engines.tiny_model import TinyModel, ensure_model

ENGINE_ENV = {
    "llama-server": "DYN_ENGINES_LLAMA_SERVER",
    "llama-cpp-python": "DYN_ENGINES_LLAMA_CPP_PYTHON",
    "vllm": "DYN_ENGINES_VLLM_PYTHON",
    VLLM_KV: "DYN_ENGINES_VLLM_PYTHON",
}
_started: dict[str, float] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "destructive: kills or pauses an engine; runs last")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def key(item: pytest.Item) -> tuple[int, int]:
        callspec = getattr(item, "callspec", None)
        kind = callspec.params.get("pair") if callspec else None
        rank = KINDS.index(kind) if kind in KINDS else len(KINDS)
        return rank, int(item.get_closest_marker("destructive") is not None)

    items.sort(key=key)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    log_dir = os.environ.get("_DYN_ENGINES_LOGS")
    if log_dir:
        terminalreporter.write_line(f"engine and frontend logs: {log_dir}")
    for kind, secs in _started.items():
        terminalreporter.write_line(f"{kind}: two instances ready in {secs:.1f} s")
    for finding in FINDINGS:
        terminalreporter.write_line(finding)


@pytest.fixture(scope="session")
def tiny_model() -> TinyModel:
    return ensure_model()


@pytest.fixture(scope="session", autouse=True)
def _openai_clients() -> Iterator[None]:
    yield
    close_clients()


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = Path(os.environ.get("DYN_ENGINES_LOG_DIR") or tmp_path_factory.mktemp("engine-logs"))
    path.mkdir(parents=True, exist_ok=True)
    os.environ["_DYN_ENGINES_LOGS"] = str(path)
    return path


@pytest.fixture(scope="session", params=KINDS)
def pair(request: pytest.FixtureRequest, tiny_model: TinyModel, log_dir: Path) -> Iterator[Pair]:
    kind: str = request.param
    if not os.environ.get(ENGINE_ENV[kind]):
        pytest.skip(f"{ENGINE_ENV[kind]} is not set: run scripts/test-engines")
    p = Pair(kind, [Engine(kind, i, tiny_model.path, log_dir) for i in range(2)], log_dir)
    t0 = time.monotonic()
    try:
        p.start()
        _started[kind] = time.monotonic() - t0
        yield p
    finally:
        p.stop()


@pytest.fixture
def fleet(pair: Pair) -> Iterator[Pair]:
    """The pair of the case's engine kind, both instances up (restarted if a case killed one)."""
    pair.ensure_running()
    yield pair
    close_streams()
