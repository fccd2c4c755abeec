"""What the whole suite shares: the ``--run-slow`` switch and the ``safety_net`` fixture.

Tests marked ``slow`` (the two 20-second soaks) are skipped unless ``--run-slow`` is given;
``.ci/run`` gives it. Skipped rather than deselected, so that running a file of slow tests alone
still reports what it did not run (and pytest exits 0, not 5).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Generator

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
def safety_net(safety_net_seconds: float) -> None:
    """Ask for it to fail a test that runs past ``safety_net_seconds`` (see the hook below)."""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Run an async test that asks for ``safety_net`` under ``asyncio.timeout``.

    A timeout entered in an async fixture guards the fixture's task, not the test's, so it could
    never fire; wrapping the test function itself puts the net around the test body, and the
    test fails with a clear message (not a bare cancellation) when the net fires.
    """
    if not isinstance(item, pytest.Function):
        return (yield)
    test = item.obj
    if "safety_net" in item.fixturenames and inspect.iscoroutinefunction(test):
        seconds = item.funcargs["safety_net_seconds"]
        assert isinstance(seconds, float | int)

        @functools.wraps(test)
        async def guarded(*args: object, **kwargs: object) -> object:
            async with asyncio.timeout(seconds) as net:
                try:
                    return await test(*args, **kwargs)
                except asyncio.CancelledError:
                    if net.expired():
                        pytest.fail(f"the {seconds:g} s safety net fired")
                    raise

        item.obj = guarded
        try:
            return (yield)
        finally:
            item.obj = test
    return (yield)
