"""What the whole suite shares: the ``--run-slow`` switch and the ``safety_net`` fixture.

Tests marked ``slow`` (the two 20-second soaks) are skipped unless ``--run-slow`` is given;
``.ci/run`` gives it. Skipped rather than deselected, so that running a file of slow tests alone
still reports what it did not run (and pytest exits 0, not 5).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow", action="store_true", help="also run the tests marked slow (what CI runs)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@pytest.fixture
def safety_net_seconds() -> float:
    """How long ``safety_net`` lets a test run; a folder's conftest may override it."""
    return 10.0


@pytest.fixture
async def safety_net(safety_net_seconds: float) -> AsyncIterator[None]:
    """Fail a test that runs past ``safety_net_seconds``, and check that the net did not fire."""
    async with asyncio.timeout(safety_net_seconds) as net:
        yield
    assert not net.expired()
