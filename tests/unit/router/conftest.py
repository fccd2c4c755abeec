"""The router's unit tests run on a fake clock: a test still running after 5 s is hung."""

import pytest


@pytest.fixture
def safety_net_seconds() -> float:
    return 5.0
