"""Fixtures of the real-socket tier: a real etcd for the discovery tests.

Tests that need etcd skip (with the reason) when the ``etcd`` binary is absent, except in CI
(``CI=true``), where that is a failure: ``.ci/run`` installs Debian's ``etcd-server``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamo_llm.testing.etcd import EtcdServer, etcd_binary


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A fresh single-node etcd on ports the OS chose, with its own data directory."""
    if etcd_binary() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("etcd is not installed: .ci/run installs it (apt-get install etcd-server)")
        pytest.skip("etcd is not installed (apt-get install etcd-server; CI installs it)")
    with EtcdServer(tmp_path / "etcd") as server:
        yield server
